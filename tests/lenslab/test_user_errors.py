"""Each failure a user will hit is one line with the fix, a non-zero exit, and no traceback."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from lenslab_testkit import VM, lenslab, write_config

NO_SUDO = "rm -f /etc/sudoers.d/90-cloud-users"


def _one_error_line(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    assert result.stderr == f"lenslab: error: {text}\n"


def test_host_unreachable(project: Path, keypair: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (project / "lenslab.toml").write_text(
        f'[box]\nname = "t"\nprovider = "ssh"\nhost = "127.0.0.1"\nuser = "debian"\nport = {port}\n'
    )
    _one_error_line(
        lenslab("ssh", "--", "true"),
        3,
        f"cannot reach 127.0.0.1:{port} (connection refused); check box.host and box.port in "
        "lenslab.toml and that the box is running",
    )
    status = lenslab("status")
    assert status.returncode == 3
    assert status.stdout.startswith(f"box t: unreachable: cannot reach 127.0.0.1:{port} (connection refused)")


def test_authentication_refused(vm_factory: type[VM], project: Path, keypair: Path) -> None:
    other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBgT0jRyIq0ndzJhKk2ZXpUUnBm5RqgGzmwY5uMUxLmb other"
    vm = vm_factory(authorized_key=other).start()
    write_config(project, vm)
    _one_error_line(
        lenslab("up"),
        3,
        f"debian@127.0.0.1:{vm.port} refused key {keypair}; add {keypair}.pub to ~/.ssh/authorized_keys "
        "on the box, or set box.identity_file in lenslab.toml",
    )


def test_missing_identity_file(vm: VM, project: Path) -> None:
    config = write_config(project, vm, identity_file="/nonexistent/id_ed25519")
    _one_error_line(
        lenslab("up"),
        2,
        f"{config}: box.identity_file: /nonexistent/id_ed25519 does not exist; run `lenslab init` to make "
        "lenslab's key, or point identity_file at your key",
    )


def test_no_docker_permission_without_sudo(vm: VM, project: Path) -> None:
    write_config(project, vm)
    vm.exec(NO_SUDO)
    _one_error_line(
        lenslab("up"),
        4,
        "user debian cannot use Docker and has no sudo; ask the box's admin to run: sudo usermod -aG docker debian",
    )


def test_no_sudo_when_the_root_needs_it(vm: VM, project: Path) -> None:
    write_config(project, vm, root="/srv/lenslab")
    # Docker access already granted, so the first thing needing root is creating /srv/lenslab.
    vm.exec('groupadd -g "$(stat -c %g /var/run/docker.sock)" docker && usermod -aG docker debian')
    vm.exec(NO_SUDO)
    _one_error_line(
        lenslab("up"),
        4,
        "user debian needs passwordless sudo to create /srv/lenslab; add 'debian ALL=(ALL) NOPASSWD:ALL' "
        "to /etc/sudoers.d/ or ask the box's admin",
    )


def test_disk_full(vm: VM, project: Path) -> None:
    write_config(project, vm, min_free_gb=10**6)
    free_kb = int(vm.exec("df -Pk /home/debian | awk 'NR == 2 {print $4}'").stdout)
    _one_error_line(
        lenslab("up"),
        4,
        f"only {free_kb // 1024 // 1024} GiB free on /home/debian, lenslab needs 1000000 GiB; "
        "free some space or set box.root to a bigger disk",
    )


def test_unsupported_os_without_docker(vm_factory: type[VM], project: Path) -> None:
    vm = vm_factory(with_docker=False).start()
    vm.exec("printf 'ID=fedora\\nVERSION_ID=40\\n' > /etc/os-release")
    write_config(project, vm)
    _one_error_line(
        lenslab("up"),
        4,
        "Docker is missing and lenslab installs it only on Ubuntu or Debian (this is fedora 40); "
        "install Docker Engine yourself, then re-run lenslab up",
    )


def test_gpu_required_on_a_box_without_one(vm: VM, project: Path) -> None:
    write_config(project, vm, gpu="required")
    _one_error_line(
        lenslab("up"),
        4,
        "no NVIDIA GPU found (nvidia-smi missing or sees none) and box.gpu is 'required'; use a GPU box, "
        'install the NVIDIA driver, or set gpu = "optional" in lenslab.toml',
    )


def test_unreadable_and_passphrase_protected_keys(vm: VM, project: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "not-a-key"
    garbage.write_text("hello\n")
    write_config(project, vm, identity_file=str(garbage))
    _one_error_line(
        lenslab("up"),
        3,
        f"cannot read private key {garbage} (ValueError); point box.identity_file at an OpenSSH private "
        "key (ed25519, ecdsa or rsa)",
    )
    protected = tmp_path / "protected"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "pass", "-f", str(protected)], check=True)
    write_config(project, vm, identity_file=str(protected))
    _one_error_line(
        lenslab("up"),
        3,
        f"key {protected} is protected by a passphrase, which lenslab cannot ask for; point "
        "box.identity_file at a key without one, e.g. lenslab's own (lenslab init)",
    )
