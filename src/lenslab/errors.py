"""lenslab's one exception tree.

Every failure a user can hit is a ``LenslabError``; its ``str()`` is one line that says what
went wrong and how to fix it, and its ``exit_code`` is what the CLI exits with. Exceptions from
paramiko, socket, the Docker SDK or pydantic are translated into these at one edge each
(``lenslab.remote.errmap`` for the SSH link, ``lenslab.config`` for the config file) with
``raise ... from exc``, so the original stays on ``__cause__`` for debugging.

    LenslabError                      exit 1
    ├── ConfigError                   exit 2   lenslab.toml missing or invalid (names field and file)
    ├── RemoteError                   exit 3   the SSH link
    │   ├── HostUnreachable                    DNS, refused, timed out, box still booting
    │   ├── AuthenticationRefused              the box refused our key
    │   ├── HostKeyChanged                     the box's key differs from the pinned one
    │   ├── ConnectionLost                     the session broke or the server spoke nonsense
    │   └── CommandFailed                      a remote command exited non-zero
    ├── BootstrapError                exit 4   provision/bootstrap.sh refused to go on
    │   ├── NoSudo
    │   ├── NoDockerPermission
    │   ├── DiskFull
    │   ├── UnsupportedOS
    │   └── GPURequired
    ├── ProviderError                 exit 5   a provider could not launch or find the box
    │   ├── BootFailed                         a launched instance never came up (lenslab terminated it)
    │   └── LambdaError                        the Lambda Cloud API refused, or answered nonsense
    │       ├── InsufficientCapacity, FileSystemInWrongRegion, QuotaExceeded, InvalidApiKey,
    │       │   AccountInactive, ObjectDoesNotExist, FileSystemInUse   (one per API error code)
    │       ├── UnexpectedReply                a reply of the wrong shape (HTML, null, missing field)
    │       └── OutcomeUnknown                 no usable reply to a call that spends or creates
    └── SSHConfigError                exit 6   ~/.ssh/config could not be updated safely
"""

from __future__ import annotations


class LenslabError(Exception):
    """A failure the user can act on; ``str()`` is the one line the CLI prints."""

    exit_code = 1

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(f"{message}; {fix}" if fix else message)


class ConfigError(LenslabError):
    exit_code = 2


class RemoteError(LenslabError):
    exit_code = 3


class HostUnreachable(RemoteError):
    pass


class AuthenticationRefused(RemoteError):
    pass


class HostKeyChanged(RemoteError):
    pass


class ConnectionLost(RemoteError):
    pass


class CommandFailed(RemoteError):
    def __init__(self, message: str, exit_status: int, fix: str | None = None) -> None:
        self.exit_status = exit_status
        super().__init__(message, fix)


class BootstrapError(LenslabError):
    exit_code = 4


class NoSudo(BootstrapError):
    pass


class NoDockerPermission(BootstrapError):
    pass


class DiskFull(BootstrapError):
    pass


class UnsupportedOS(BootstrapError):
    pass


class GPURequired(BootstrapError):
    pass


class ProviderError(LenslabError):
    exit_code = 5


class BootFailed(ProviderError):
    pass


class LambdaError(ProviderError):
    """An error from the Lambda Cloud API; ``code`` is its error code (``lenslab/...`` for ours)."""

    def __init__(self, message: str, fix: str | None = None, code: str = "") -> None:
        self.code = code
        super().__init__(message, fix)


class InsufficientCapacity(LambdaError):
    pass


class FileSystemInWrongRegion(LambdaError):
    pass


class QuotaExceeded(LambdaError):
    pass


class InvalidApiKey(LambdaError):
    pass


class AccountInactive(LambdaError):
    pass


class ObjectDoesNotExist(LambdaError):
    pass


class FileSystemInUse(LambdaError):
    pass


class UnexpectedReply(LambdaError):
    pass


class OutcomeUnknown(LambdaError):
    """A launch or create whose reply was lost or unreadable: it may or may not have happened,
    so the caller looks for what it asked for (by name) before asking again."""


class SSHConfigError(LenslabError):
    exit_code = 6
