"""`[box] mirror` and `[box] mirror_env`: the run file uploaded names the box's mirror, and the
mirror's credentials reach the trainer through a file, never argv or output."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from labkit import tiny_run

from lenslab import runfile, runmirror
from lenslab.config import BoxConfig
from lenslab.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

URL = "s3://bucket/lenslab"


def box(**fields: object) -> BoxConfig:
    return BoxConfig.model_validate({"name": "b", "provider": "vast", "mirror": URL, **fields})


def load(tmp_path: Path, edit: tuple[str, str] | None = None) -> runfile.RunFile:
    path = tiny_run(tmp_path / "run", training_tokens=1000, checkpoint_every_tokens=100)
    if edit is not None:
        path.write_text(path.read_text().replace(*edit))
    return runfile.load(path, "r")


def without_resilience(run: runfile.RunFile, top: str = "") -> runfile.RunFile:
    """``run`` with its [resilience] table (the file's last) cut off, and ``top`` added after its name."""
    text = run.text[: run.text.index("[resilience]")].replace('name = "r"\n', f'name = "r"\n{top}', 1)
    return runfile.RunFile(run.path, run.name, text, run.dataset)


def test_the_box_mirror_is_written_into_the_resilience_table(tmp_path: Path) -> None:
    run = runmirror.with_box_mirror(load(tmp_path), box())
    parsed = tomllib.loads(run.text)
    assert parsed["resilience"]["mirror"] == URL and parsed["resilience"]["checkpoint_every_tokens"] == 100
    assert runmirror.run_mirror(run) == URL


def test_a_run_without_resilience_gets_a_table_and_its_own_mirror_is_kept(tmp_path: Path) -> None:
    plain = without_resilience(load(tmp_path))
    assert "resilience" not in tomllib.loads(plain.text)
    assert tomllib.loads(runmirror.with_box_mirror(plain, box()).text)["resilience"] == {"mirror": URL}
    own = load(tmp_path, ("[resilience]\n", '[resilience]\nmirror = "file:///elsewhere"\n'))
    assert runmirror.with_box_mirror(own, box()).text == own.text
    assert runmirror.with_box_mirror(load(tmp_path), box(mirror=None)).text == load(tmp_path).text


def test_a_resilience_table_it_cannot_rewrite_is_one_clear_error(tmp_path: Path) -> None:
    dotted = without_resilience(load(tmp_path), "resilience.keep_last = 2\n")
    assert tomllib.loads(dotted.text)["resilience"] == {"keep_last": 2}
    with pytest.raises(ConfigError) as caught:
        runmirror.with_box_mirror(dotted, box())
    assert "cannot add the box's mirror" in str(caught.value) and URL in str(caught.value.fix)


def test_mirror_env_copies_the_named_variables_and_names_a_missing_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert runmirror.mirror_env(box()) is None
    data = runmirror.mirror_env(box(mirror_env=["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]))
    assert data is not None and json.loads(data) == {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "s3cret"}
    with pytest.raises(ConfigError) as caught:
        runmirror.mirror_env(box(mirror_env=["AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"]))
    assert "AWS_ENDPOINT_URL" in str(caught.value) and "s3cret" not in str(caught.value)
    with pytest.raises(ValueError):
        box(mirror_env=["not a name"])


def test_the_trainer_sets_the_variables_and_refuses_a_bad_file(tmp_path: Path) -> None:
    from lenslab_workspace.train import mirror_env
    from lenslab_workspace.train.errors import RunConfigError

    run_file = tmp_path / "run.toml"
    assert mirror_env.apply(run_file) == []
    beside = tmp_path / ".mirror-env.json"
    beside.write_text(json.dumps({"LENSLAB_TEST_MIRROR_SECRET": "v1"}))
    try:
        assert mirror_env.apply(run_file) == ["LENSLAB_TEST_MIRROR_SECRET"]
        assert os.environ["LENSLAB_TEST_MIRROR_SECRET"] == "v1"
    finally:
        os.environ.pop("LENSLAB_TEST_MIRROR_SECRET", None)
    beside.write_text(json.dumps({"lower case": "hidden-value"}))
    with pytest.raises(RunConfigError) as caught:
        mirror_env.apply(run_file)
    assert "hidden-value" not in str(caught.value) and "not a JSON object of environment variables" in str(caught.value)


def test_a_mirror_url_with_credentials_is_one_line_that_names_mirror_env(tmp_path: Path) -> None:
    from lenslab import config

    path = tmp_path / "lenslab.toml"
    path.write_text('[box]\nname = "b"\nprovider = "vast"\nmirror = "s3://AKIAX:s3cret@host/x"\n')
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    message = str(caught.value)
    assert "mirror" in message and "mirror_env" in message and "s3cret" not in message
    assert "\n" not in message
    path.write_text('[box]\nname = "b"\nprovider = "vast"\nmirror = "sftp://me@host/x"\n')
    assert config.load(path).box.mirror == "sftp://me@host/x"  # a user name alone is no secret
