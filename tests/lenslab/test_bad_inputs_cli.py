"""A corpus of broken lenslab.toml files and CLI invocations: each is one stderr line that names
the file and the field (or the argument), a usage exit code, no traceback, and the user's files
(lenslab.toml, ~/.ssh/config, lenslab's ssh config, an earlier pull) stay byte-identical.

Run in-process through ``lenslab.cli.main`` (the same code the console script runs), so the
whole corpus takes about a second; a few cases go through the real console script too.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lenslab_testkit import LENSLAB

from lenslab import sshconfig
from lenslab.cli import main

GOOD = '[box]\nname = "gpu1"\nprovider = "ssh"\nhost = "203.0.113.7"\nuser = "ubuntu"\n'
USER_SSH_CONFIG = "Host work\n    HostName work.example\n"

# (id, extra lines under [box] or a whole document, the field the error line must name)
TOML_CASES: list[tuple[str, str, str]] = [
    ("port-string", GOOD + 'port = "22"\n', "box.port: Input should be a valid integer (got '22')"),
    ("port-range", GOOD + "port = 70000\n", "box.port: Input should be less than or equal to 65535"),
    ("port-zero", GOOD + "port = 0\n", "box.port: Input should be greater than or equal to 1"),
    ("port-float", GOOD + "port = 22.0\n", "box.port: Input should be a valid integer"),
    ("bool-string", GOOD + 'autostop_poweroff = "yes"\n', "box.autostop_poweroff: Input should be a valid boolean"),
    ("int-float", GOOD + "min_free_gb = 5.5\n", "box.min_free_gb: Input should be a valid integer"),
    ("float-string", GOOD + 'boot_timeout_minutes = "15"\n', "box.boot_timeout_minutes: Input should be a valid"),
    ("gpu-bool", GOOD + "gpu = true\n", "box.gpu: Input should be 'required', 'optional' or 'none' (got True)"),
    ("provider", GOOD.replace('"ssh"', '"aws"'), "box.provider: 'aws' is not a provider: use one of"),
    ("name-upper", GOOD.replace('"gpu1"', '"Gpu_1"'), "box.name: 'Gpu_1' is not a box name"),
    ("name-int", GOOD.replace('"gpu1"', "5"), "box.name: Input should be a valid string (got 5)"),
    ("host-newline", GOOD.replace('"203.0.113.7"', '"h\\nMatch exec \\"touch /tmp/x\\""'), "box.host: 'h\\nMatch"),
    ("host-option", GOOD.replace('"203.0.113.7"', '"-oProxyCommand=sh"'), "box.host: '-oProxyCommand=sh' is not"),
    ("host-space", GOOD.replace('"203.0.113.7"', '"a b"'), "box.host: 'a b' is not a host name"),
    ("host-bad-ipv6", GOOD.replace('"203.0.113.7"', '"fe80::1::2"'), "box.host: 'fe80::1::2' is not a host name"),
    ("host-nul", GOOD.replace('"203.0.113.7"', '"h\\u0000"'), "box.host: 'h\\x00' is not"),
    ("user-newline", GOOD.replace('"ubuntu"', '"root\\nHost *"'), "box.user: 'root\\nHost *' is not a user name"),
    ("user-option", GOOD.replace('"ubuntu"', '"-lroot"'), "box.user: '-lroot' is not a user name"),
    ("key-newline", GOOD + 'identity_file = "/k\\n    Match exec x"\n', "box.identity_file: '/k\\n    Match"),
    ("key-quote", GOOD + "identity_file = '/keys/my\"key'\n", "box.identity_file: '/keys/my\"key' holds \""),
    ("key-percent", GOOD + 'identity_file = "/keys/%h"\n', "box.identity_file: '/keys/%h' holds %"),
    ("key-env", GOOD + 'identity_file = "/keys/${HOME}"\n', "box.identity_file: '/keys/${HOME}' holds $"),
    ("key-tab", GOOD + 'identity_file = "/keys/a\\tb"\n', "box.identity_file: '/keys/a\\tb' holds the control"),
    ("root-relative", GOOD + 'root = "lenslab"\n', "box.root: 'lenslab' is not an absolute path"),
    ("root-u2028", GOOD + 'root = "/x\\u2028y"\n', "box.root: '/x\\u2028y' holds the control or whitespace"),
    ("root-dotdot", GOOD + 'root = "/srv/../etc"\n', "box.root: '/srv/../etc' holds a '..' component"),
    ("root-tilde-user", GOOD + 'root = "~other/x"\n', "box.root: '~other/x' is not an absolute path"),
    ("root-zero-width", GOOD + 'root = "/srv/\\u200blab"\n', "box.root: '/srv/\\u200blab' holds the control"),
    ("image", GOOD + 'image = "Bad Image!"\n', "box.image: 'Bad Image!' is not a Docker image reference"),
    ("image-newline", GOOD + 'image = "lenslab:latest\\n"\n', "box.image: 'lenslab:latest\\n' is not a Docker"),
    ("build-arg-key", GOOD + 'build_args = { "A B" = "1" }\n', "box.build_args.'A B': 'A B' is not a build"),
    ("build-arg-value", GOOD + 'build_args = { A = "x\\ny" }\n', "box.build_args.A: 'x\\ny' holds the control"),
    ("build-arg-int", GOOD + "build_args = { A = 1 }\n", "box.build_args.A: Input should be a valid string (got 1)"),
    ("build-context", GOOD + 'build_context = "ctx\\r"\n', "box.build_context: 'ctx\\r' holds the control"),
    ("gpu-types-item", GOOD + 'gpu_types = ["A100", "x y"]\n', "box.gpu_types.1: 'x y' is not a GPU type"),
    ("gpu-types-empty", GOOD + "gpu_types = []\n", "box.gpu_types: List should have at least 1 item"),
    ("regions-item", GOOD + 'regions = ["US East"]\n', "box.regions.0: 'US East' is not a region name"),
    ("budget", GOOD + "budget_usd = -1\n", "box.budget_usd: Input should be greater than 0"),
    ("fingerprint", GOOD + 'host_key_fingerprint = "MD5:00"\n', "box.host_key_fingerprint: String should match"),
    ("unknown-field", GOOD + "colour = 1\n", "box.colour: unknown field"),
    ("unknown-table", GOOD + "[lambda]\nx = 1\n", "unknown table [lambda] at the top level"),
    ("top-level-key", 'name = "x"\n' + GOOD, "unknown key name at the top level"),
    ("nested-table", GOOD + "[box.extra]\nx = 1\n", "box.extra: unknown field"),
    ("box-string", 'box = "x"\n', "box: must be a table, written [box]"),
    ("box-array", "[[box]]\nname = 'x'\n", "box: must be a table, written [box]"),
    ("secret-nested", GOOD + "[box.build_args]\nHF_TOKEN = 'x'\n", "box.build_args.HF_TOKEN: secrets do not belong"),
    ("duplicate-key", GOOD + 'user = "other"\n', "not valid TOML (Cannot overwrite a value"),
    ("no-box", "", "missing [box] table"),
]


@pytest.fixture
def tree(home: Path, project: Path) -> Path:
    """The files a user already has: ~/.ssh/config, lenslab's ssh config with one box, an
    earlier pull under runs/. Returns the root whose bytes must not change."""
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700)
    (ssh / "config").write_text(USER_SSH_CONFIG)
    sshconfig.add(sshconfig.Entry("lenslab-old", "198.51.100.1", 22, "me", Path("/keys/id")))
    final = project / "runs" / "tiny" / "final"
    final.mkdir(parents=True)
    (final / "cfg.json").write_text('{"d_in": 16}')
    (final / "sae_weights.safetensors").write_bytes(os.urandom(256))
    return home.parent


def _digest(root: Path) -> dict[str, str]:
    """Every file's bytes and every entry's kind and mode; lenslab's lock file aside (it is
    lenslab's own, created empty the first time any command takes the lock)."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if path.name == ".lock":
            continue
        kind = "l" if path.is_symlink() else "d" if path.is_dir() else "f"
        body = hashlib.sha256(path.read_bytes()).hexdigest() if kind == "f" else ""
        out[str(path.relative_to(root))] = f"{kind} {path.lstat().st_mode:o} {body}"
    return out


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def _one_line(err: str, *needles: str) -> None:
    assert err.startswith("lenslab: error: ") and err.endswith("\n"), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(("text", "field"), [c[1:] for c in TOML_CASES], ids=[c[0] for c in TOML_CASES])
@pytest.mark.parametrize("command", ["status", "up", "pull tiny"])
def test_broken_lenslab_toml(tree: Path, project: Path, text: str, field: str, command: str) -> None:
    config = project / "lenslab.toml"
    config.write_text(text)
    before = _digest(tree)
    code, out, err = run_cli(*command.split())
    assert (code, out) == (2, "")
    _one_line(err, f"{config}: {field}")
    assert _digest(tree) == before


# (id, argv, the argument the line names, what it says)
ARG_CASES: list[tuple[str, list[str], str]] = [
    ("pull-dotdot", ["pull", "../x"], "argument NAME: '../x' is not a run name"),
    ("pull-slash", ["pull", "a/b"], "argument NAME: 'a/b' is not a run name"),
    ("pull-hidden", ["pull", ".hidden"], "argument NAME: '.hidden' is not a run name"),
    ("pull-empty", ["pull", ""], "argument NAME: '' is not a run name"),
    ("pull-long", ["pull", "a" * 65], "is not a run name (1-64 letters"),
    ("logs-space", ["logs", "a b"], "argument NAME: 'a b' is not a run name"),
    ("logs-newline", ["logs", "a\nb"], "argument NAME: 'a\\nb' is not a run name"),
    ("stop-escape", ["stop", "x\x1b[2J"], "argument NAME: 'x\\x1b[2J' is not a run name"),
    ("train-name", ["train", "run.toml", "--name", "x/y"], "argument --name: 'x/y' is not a run name"),
    ("init-name", ["init", "--name", "Bad Name"], "argument --name: 'Bad Name' is not a box name"),
    ("init-name-newline", ["init", "--name", "a\nb"], "argument --name: 'a\\nb' is not a box name"),
    ("init-provider", ["init", "--provider", "aws"], "argument --provider: invalid choice: 'aws'"),
    ("no-command", [], "the following arguments are required: COMMAND"),
    ("unknown-option", ["status", "--bogus"], "unrecognized arguments: --bogus"),
    ("jupyter-port", ["jupyter", "--port", "abc"], "argument --port: invalid int value: 'abc'"),
]


@pytest.mark.parametrize(("argv", "says"), [c[1:] for c in ARG_CASES], ids=[c[0] for c in ARG_CASES])
def test_bad_arguments(tree: Path, project: Path, argv: list[str], says: str) -> None:
    (project / "lenslab.toml").write_text(GOOD)
    before = _digest(tree)
    code, out, err = run_cli(*argv)
    assert (code, out) == (2, "")
    _one_line(err, says)
    assert _digest(tree) == before


def test_config_that_is_a_directory_or_a_device(tree: Path, project: Path) -> None:
    before = _digest(tree)
    for path, says in ((project, "is a directory"), (Path("/dev/zero"), "not a regular file")):
        code, _, err = run_cli("--config", str(path), "status")
        assert code == 2
        _one_line(err, f"{path}: {says}")
    assert _digest(tree) == before


def test_non_utf8_config_through_the_console_script(tree: Path, project: Path) -> None:
    (project / "lenslab.toml").write_bytes(b'[box]\nname = "caf\xe9"\n')
    before = _digest(tree)
    result = subprocess.run([LENSLAB, "status"], capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 2
    _one_line(result.stderr, f"{project / 'lenslab.toml'}: not UTF-8 text (byte 0xe9 at offset 17)")
    assert _digest(tree) == before


def test_unreadable_config(tree: Path, project: Path) -> None:
    """Root reads any file, so as root the command runs as nobody (who cannot reach the file)."""
    config = project / "lenslab.toml"
    config.write_text(GOOD)
    before = _digest(tree)
    config.chmod(0o000)
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    result = subprocess.run(
        [*drop, LENSLAB, "--config", str(config), "status"],
        capture_output=True, text=True, check=False, timeout=60, cwd="/",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    _one_line(result.stderr, f"{config}: cannot read it (Permission denied)")
    config.chmod(0o644)
    assert _digest(tree) == before


def test_init_with_ssh_dir_a_file_or_home_unwritable(
    home: Path, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (home / ".ssh").write_text("not a directory\n")
    code, _, err = run_cli("init", "--name", "gpu1")
    assert code == 6
    _one_line(err, f"{home / '.ssh'} is not a directory")
    assert not (project / "lenslab.toml").exists()  # nothing half-made
    # A HOME that cannot hold ~/.ssh (here: below a file, which even root cannot write into).
    monkeypatch.setenv("HOME", str(home / ".ssh" / "home"))
    code, _, err = run_cli("init", "--name", "gpu1")
    assert code == 6
    _one_line(err, f"cannot create {home / '.ssh' / 'home' / '.ssh'} (Not a directory)")
    assert not (project / "lenslab.toml").exists()
    assert (home / ".ssh").read_text() == "not a directory\n"


def test_unexpected_error_is_one_line_and_a_crash_log(
    tree: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anything that is no LenslabError (a bug) still ends as one line; the traceback goes to
    a log under $XDG_STATE_HOME/lenslab that the line names."""
    from lenslab.cli import project as project_commands

    def broken(args: object) -> int:
        return {"a": 1}["b"]  # a KeyError, as a bug would raise it

    state = tmp_path_factory.mktemp("state")  # outside the user's tree, which must not change
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    monkeypatch.setattr(project_commands, "init", broken)
    before = _digest(tree)
    code, out, err = run_cli("init")
    assert (code, out) == (1, "")
    _one_line(err, "unexpected KeyError: 'b'; this is a bug in lenslab: the traceback is in ")
    log = Path(err.rstrip("\n").rsplit(" ", 1)[1])
    assert log.parent == state / "lenslab" and log.name.startswith("crash-")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "KeyError: 'b'" in text
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    assert _digest(tree) == before


def test_unexpected_error_without_a_writable_state_dir(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lenslab.cli import project as project_commands

    blocker = tmp_path / "state-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_STATE_HOME", str(blocker))
    monkeypatch.setattr(project_commands, "init", lambda args: 1 // 0)
    code, _, err = run_cli("init")
    assert code == 1
    _one_line(err, "unexpected ZeroDivisionError: integer division or modulo by zero (a bug in lenslab; its traceback")


def test_interrupt_stays_130(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lenslab.cli import project as project_commands

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(project_commands, "init", interrupted)
    assert run_cli("init")[0::2] == (130, "lenslab: interrupted\n")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot read the run file (No such file or directory)"),
        (b'name = "caf\xe9"\n', "the run file is not UTF-8 text (offset 11); save it as UTF-8"),
        (b"name = [\n", "not valid TOML"),
        (b'name = "../x"\nmodel_name = "m"\n', "field 'name'"),
    ],
    ids=["missing", "not-utf8", "not-toml", "name"],
)
def test_broken_run_files(tree: Path, project: Path, content: bytes | None, says: str) -> None:
    (project / "lenslab.toml").write_text(GOOD)
    run_file = project / "run.toml"
    if content is not None:
        run_file.write_bytes(content)
    before = _digest(tree)
    code, out, err = run_cli("train", str(run_file))
    assert (code, out) == (2, "")
    _one_line(err, f"{run_file}: {says}")
    assert _digest(tree) == before


def test_a_broken_workspace_install_is_said_not_skipped(
    tree: Path, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lenslab-workspace present but not importable (e.g. Python 3.10 without tomli): one line,
    rather than a lighter check in silence."""
    monkeypatch.setitem(sys.modules, "lenslab_workspace.train.config", None)
    run_file = project / "run.toml"
    run_file.write_text('name = "x"\n')
    code, _, err = run_cli("train", str(run_file))
    assert code == 1
    _one_line(err, "lenslab-workspace is installed here but cannot be imported")
