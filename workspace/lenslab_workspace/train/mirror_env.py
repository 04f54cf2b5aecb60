"""The mirror's credentials, handed over beside the run file.

``lenslab train`` uploads the values of the variables ``[box] mirror_env`` names (e.g.
AWS_ACCESS_KEY_ID) as a JSON object to a mode-600 file beside the run file: a detached run's
supervisor does not inherit the instance's environment, and argv is readable by every process.
They are set here before the mirror is opened (fsspec/s3fs reads them); no value is ever logged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lenslab.contract import ENV_NAME, MIRROR_ENV_FILE
from lenslab_workspace.train.errors import RunConfigError

MAX_BYTES = 64 * 1024


def apply(run_file: Path) -> list[str]:
    """Set the variables of the file beside ``run_file`` (if there is one); their names."""
    path = run_file.parent / MIRROR_ENV_FILE
    try:
        raw = path.read_bytes()[: MAX_BYTES + 1]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RunConfigError(
            f"{path}: cannot read the mirror's credentials ({exc.strerror}); upload them again"
        ) from exc
    try:
        data = json.loads(raw) if len(raw) <= MAX_BYTES else None
    except ValueError:
        data = None
    valid = isinstance(data, dict) and all(
        isinstance(k, str) and ENV_NAME.fullmatch(k) and isinstance(v, str) and "\x00" not in v for k, v in data.items()
    )
    if not valid or not isinstance(data, dict):
        # Neither the contents nor a value is quoted: they may be secrets.
        raise RunConfigError(
            f"{path}: not a JSON object of environment variables; run `lenslab train` again to rewrite it"
        )
    os.environ.update(data)
    return sorted(data)
