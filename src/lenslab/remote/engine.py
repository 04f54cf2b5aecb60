"""The box's Docker Engine, reached through lenslab's own SSH link.

docker-py's ``ssh://`` transport opens its own paramiko client from ``~/.ssh/config`` and the
system known_hosts, which would bypass lenslab's pinned host keys. Instead every HTTP connection
here is an exec channel on the already-verified link running ``docker system dial-stdio``
(what the docker CLI's ssh transport does), and docker-py's SSH connection pool is handed that
link's transport. The base URL stays ``http+docker://ssh`` so docker-py reads streamed
responses (logs, attach) from the channel the way it does for its own SSH transport.

``engine_errors`` is the one edge where docker SDK and requests exceptions become lenslab errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from lenslab.errors import ConnectionLost, DiskFull, LenslabError, RemoteError

if TYPE_CHECKING:
    import docker

    from lenslab.remote.bootstrap import Runner

# Below any version a box bootstrapped by lenslab runs; only used for the first request, after
# which the client speaks the engine's own API version.
MIN_API_VERSION = "1.41"
BASE_URL = "http+docker://ssh"
TIMEOUT_SECONDS = 120
TOOLKIT_FIX = (
    "configure the NVIDIA Container Toolkit on the box: "
    "sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker"
)


class EngineError(LenslabError):
    """The box's Docker Engine refused or failed a request."""

    exit_code = 7


class ImageBuildFailed(EngineError):
    pass


class GPUNotVisible(EngineError):
    pass


def open_engine(runner: Runner) -> docker.DockerClient:
    """A Docker client for the box behind ``runner``: over the SSH link, or the local engine."""
    import docker

    from lenslab.remote.ssh import SSHLink

    with engine_errors():
        if not isinstance(runner, SSHLink):
            return docker.from_env(timeout=TIMEOUT_SECONDS)
        from docker.transport.sshconn import SSHHTTPAdapter

        # No connection is made here: the URL is replaced by the adapter below before any request.
        client = docker.DockerClient(base_url="tcp://127.0.0.1:2375", version=MIN_API_VERSION)
        api = client.api
        adapter = SSHHTTPAdapter.__new__(SSHHTTPAdapter)
        _init_adapter(adapter, runner)
        api.mount(BASE_URL, adapter)
        api._unmount("http://", "https://")
        api.base_url = BASE_URL
        api._version = _server_api_version(runner)
        return client


def _server_api_version(link: Runner) -> str:
    """Asked with the docker CLI first: when the engine is unreachable (not installed, no
    permission) dial-stdio only closes the channel, while the CLI says why."""
    result = link.run("docker version --format '{{.Server.APIVersion}}'")
    version = result.stdout.strip()
    if result.exit_status != 0 or not version:
        why = _first_line(result.stderr or result.stdout)
        raise EngineError(f"cannot reach Docker on the box ({why})", "run `lenslab up` to bootstrap it")
    return version


def _init_adapter(adapter: Any, link: Any) -> None:
    """docker-py's SSHHTTPAdapter, minus the paramiko client it would open on its own."""
    from docker import constants
    from docker.transport.basehttpadapter import BaseHTTPAdapter
    from docker.transport.sshconn import SSHConnectionPool
    from urllib3._collections import RecentlyUsedContainer

    class _LinkClient:
        # SSHConnectionPool asks its "client" only for the transport.
        def get_transport(self) -> Any:
            return link._transport()

    BaseHTTPAdapter.__init__(adapter)
    adapter.ssh_client = _LinkClient()
    adapter.ssh_host = "lenslab"
    adapter.timeout = TIMEOUT_SECONDS
    adapter.max_pool_size = constants.DEFAULT_MAX_POOL_SIZE
    adapter.pools = RecentlyUsedContainer(constants.DEFAULT_NUM_POOLS, dispose_func=lambda p: p.close())
    adapter._connect = lambda: None

    def get_connection(url: str, proxies: Any = None) -> Any:
        with adapter.pools.lock:
            pool = adapter.pools.get(url)
            if pool is None:
                pool = SSHConnectionPool(ssh_client=adapter.ssh_client, timeout=TIMEOUT_SECONDS)
                adapter.pools[url] = pool
        return pool

    adapter.get_connection = get_connection
    # The link belongs to the caller; closing the Docker client must not close it.
    adapter.close = lambda: adapter.pools.clear()


_NO_SPACE = re.compile(r"no space left on device", re.IGNORECASE)
_NO_GPU_DRIVER = re.compile(r"could not select device driver|nvidia-container-cli|unknown runtime", re.IGNORECASE)


@contextmanager
def engine_errors() -> Iterator[None]:
    """Docker SDK and requests exceptions in the block become lenslab errors (``from exc``)."""
    import docker.errors
    import requests.exceptions
    import urllib3.exceptions

    try:
        yield
    except LenslabError:
        raise
    except docker.errors.APIError as exc:
        raise translate_api_error(exc) from exc
    except docker.errors.DockerException as exc:
        raise EngineError(f"Docker on the box: {_first_line(str(exc))}") from exc
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, EOFError, OSError) as exc:
        raise ConnectionLost(
            f"lost the connection to the box's Docker Engine ({type(exc).__name__}: {_first_line(str(exc))})",
            "check the box is up (lenslab status) and try again",
        ) from exc


def translate_api_error(exc: Any) -> LenslabError:
    text = _first_line(str(getattr(exc, "explanation", None) or exc))
    if _NO_SPACE.search(text):
        return DiskFull(f"the box's disk is full ({text})", "free space on the box, e.g. `docker system prune`")
    if _NO_GPU_DRIVER.search(text):
        return GPUNotVisible(f"the box has a GPU but Docker cannot give it to containers ({text})", TOOLKIT_FIX)
    return EngineError(f"Docker on the box refused: {text}")


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else "no detail"


__all__ = ["EngineError", "GPUNotVisible", "ImageBuildFailed", "RemoteError", "engine_errors", "open_engine"]
