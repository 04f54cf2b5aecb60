"""lenslab.toml: a malformed file is one line naming file and field, exit 2, no traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lenslab_testkit import lenslab

from lenslab import config
from lenslab.errors import ConfigError

BASE = '[box]\nname = "gpu1"\nprovider = "ssh"\nhost = "203.0.113.7"\nuser = "ubuntu"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BASE + "port = 70000\n", "{path}: box.port: Input should be less than or equal to 65535"),
        (BASE + "colour = 1\n", "{path}: box.colour: unknown field"),
        (BASE + 'gpu = "maybe"\n', "{path}: box.gpu: Input should be 'required', 'optional' or 'none' (got 'maybe')"),
        ('[box]\nname = "gpu1"\nprovider = "ssh"\nuser = "u"\n', "{path}: box: provider 'ssh' needs box.host"),
        ('[box]\nprovider = "local"\n', "{path}: box.name: required field is missing"),
        (
            BASE + 'api_key = "sk-123"\n',
            "{path}: box.api_key: secrets do not belong in lenslab.toml; "
            "set it in the environment or a chmod 600 file instead",
        ),
        ("[box\n", "{path}: not valid TOML (Expected ']' at the end of a table declaration (at line 1, column 5))"),
        ("", "{path}: missing [box] table; run `lenslab init` for a commented example"),
    ],
    ids=["port", "unknown", "gpu", "no-host", "no-name", "secret", "toml", "no-box"],
)
def test_malformed_config_is_one_line_naming_file_and_field(project: Path, text: str, expected: str) -> None:
    path = project / "lenslab.toml"
    path.write_text(text)
    result = lenslab("status")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"lenslab: error: {expected.format(path=path)}\n"


def test_no_config_anywhere_says_to_run_init(project: Path) -> None:
    result = lenslab("up")
    assert (result.returncode, result.stderr) == (
        2,
        f"lenslab: error: no lenslab.toml in {project} or its parents; run `lenslab init` to write one\n",
    )


def test_init_writes_a_starter_that_loads_and_a_0600_key(project: Path, home: Path) -> None:
    result = lenslab("init", "--name", "gpu1", "--provider", "local")
    assert result.returncode == 0, result.stderr
    cfg = config.load(project / "lenslab.toml")
    assert (cfg.box.name, cfg.box.provider, cfg.box.alias) == ("gpu1", "local", "lenslab-gpu1")
    key = home / ".ssh" / "lenslab" / "id_ed25519"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert (key.parent / "id_ed25519.pub").read_text().startswith("ssh-ed25519 ")
    again = lenslab("init")
    assert again.returncode == 2
    assert again.stderr == (
        f"lenslab: error: {project / 'lenslab.toml'} already exists; edit it, or delete it to start over\n"
    )


def test_config_is_found_from_a_subdirectory(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (project / "lenslab.toml").write_text('[box]\nname = "here"\nprovider = "local"\n')
    sub = project / "a" / "b"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    assert config.find_config() == project / "lenslab.toml"


def test_secret_files_must_be_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LENSLAB_TEST_SECRET", raising=False)
    secret_file = tmp_path / "key"
    secret_file.write_text("s3cret\n")
    os.chmod(secret_file, 0o644)
    with pytest.raises(ConfigError, match=r"readable by others \(mode 644\); run `chmod 600"):
        config.secret("LENSLAB_TEST_SECRET", secret_file)
    os.chmod(secret_file, 0o600)
    assert config.secret("LENSLAB_TEST_SECRET", secret_file) == "s3cret"
    monkeypatch.setenv("LENSLAB_TEST_SECRET", "from-env")
    assert config.secret("LENSLAB_TEST_SECRET", secret_file) == "from-env"


@pytest.mark.parametrize(
    ("extra", "field", "value"),
    [
        ('host = "fe80::1"\n', "host", "fe80::1"),
        ('host = "gpu-box.example.com."\n', "host", "gpu-box.example.com."),
        ('user = "first.last"\n', "user", "first.last"),
        ('identity_file = "~/keys/o\'brien key"\n', "identity_file", "~/keys/o'brien key"),
        ('root = "~"\n', "root", "~"),
        ('root = "/data/lab #1"\n', "root", "/data/lab #1"),
        (
            'image = "ghcr.io/org/lenslab:1.2@sha256:' + "a" * 64 + '"\n',
            "image",
            "ghcr.io/org/lenslab:1.2@sha256:" + "a" * 64,
        ),
        ('image = "localhost:5000/lab"\n', "image", "localhost:5000/lab"),
        (
            'build_args = { BASE_IMAGE = "nvidia/cuda:12.8.1 runtime" }\n',
            "build_args",
            {"BASE_IMAGE": "nvidia/cuda:12.8.1 runtime"},
        ),
        ('gpu_types = ["gpu_1x_a100_sxm4"]\n', "gpu_types", ["gpu_1x_a100_sxm4"]),
        ("boot_timeout_minutes = 15\n", "boot_timeout_minutes", 15.0),
    ],
)
def test_unusual_but_valid_values_load(project: Path, extra: str, field: str, value: object) -> None:
    """The checks refuse what breaks a config or a command line, not what users really write."""
    (project / "lenslab.toml").write_text(BASE.replace(f"{field} = ", "# ") + extra)
    assert getattr(config.load(project / "lenslab.toml").box, field) == value


def test_the_starter_loads_for_every_provider(project: Path) -> None:
    for provider in ("ssh", "local", "lambda"):
        path = project / f"{provider}.toml"
        config.write_starter(path, "gpu1", provider, "optional")
        if provider == "ssh":
            path.write_text(path.read_text().replace('# host = "203', 'host = "203').replace('# user = "', 'user = "'))
        assert config.load(path).box.provider == provider


@pytest.mark.parametrize(
    "field", ["budget_usd", "max_price_per_hour", "min_vram_gb", "idle_minutes", "boot_timeout_minutes"]
)
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_numbers_are_refused_in_one_line(tmp_path: Path, field: str, value: str) -> None:
    path = tmp_path / "lenslab.toml"
    path.write_text(BASE + f"{field} = {value}\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert str(caught.value).startswith(f"{path}: box.{field}: Input should be a finite number")
    assert "\n" not in str(caught.value)
