"""Graceful stop on SIGTERM, SIGINT and SIGHUP.

The first signal only sets a flag: the loop finishes the step it is in, writes a checkpoint
and exits. SAELens's handler raises wherever the code happens to be, which can leave the
state half-updated; a flag cannot. A second signal exits at once: safe, because every file
that matters is committed by rename and a half-written checkpoint is never loaded.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any

from lenslab.contract import EXIT_SECOND_SIGNAL

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
EXIT_ON_SECOND_SIGNAL = EXIT_SECOND_SIGNAL


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> None:
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Put back the handlers ``install`` replaced (lenslab-train may run inside another program)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None:
            sys.stderr.write(f"\nlenslab-train: second {signal.Signals(signum).name}, exiting now\n")
            os._exit(EXIT_ON_SECOND_SIGNAL)
        self.signal_name = signal.Signals(signum).name
        sys.stderr.write(
            f"\nlenslab-train: {self.signal_name} received; finishing this step and saving a checkpoint "
            "(send it again to exit at once)\n"
        )
