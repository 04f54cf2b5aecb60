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

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
EXIT_ON_SECOND_SIGNAL = 130


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> None:
        for sig in HANDLED:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None:
            sys.stderr.write(f"\nlenslab-train: second {signal.Signals(signum).name}, exiting now\n")
            os._exit(EXIT_ON_SECOND_SIGNAL)
        self.signal_name = signal.Signals(signum).name
        sys.stderr.write(
            f"\nlenslab-train: {self.signal_name} received; finishing this step and saving a checkpoint "
            "(send it again to exit at once)\n"
        )
