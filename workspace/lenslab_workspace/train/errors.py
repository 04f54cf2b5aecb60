"""Errors a user of ``lenslab-train`` can cause or meet, each shown as one line.

LenslabTrainError            base: the CLI prints ``str(exc)`` without a traceback
├── RunConfigError           the run file is malformed or names something impossible
├── ConfigChangedError       resuming would be wrong: resume-relevant fields changed
├── CheckpointError          no usable checkpoint although one was expected, disk full, ...
├── DataError                the dataset cannot be read or is too small
└── UnexpectedError          anything else (a bug or the machine): one line naming the
                             log file that holds the traceback
"""

from __future__ import annotations

from lenslab.contract import EXIT_FAILED, EXIT_USAGE


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (at most 500 characters), or its type's name."""
    return " ".join(str(exc).split())[:500] or type(exc).__name__


class LenslabTrainError(Exception):
    """Base class; the message is complete, one line, and says how to fix it."""

    exit_code = EXIT_FAILED


class RunConfigError(LenslabTrainError):
    exit_code = EXIT_USAGE


class ConfigChangedError(LenslabTrainError):
    exit_code = EXIT_USAGE


class CheckpointError(LenslabTrainError):
    pass


class DataError(LenslabTrainError):
    exit_code = EXIT_USAGE


class UnexpectedError(LenslabTrainError):
    pass
