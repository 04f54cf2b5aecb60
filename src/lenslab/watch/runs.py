"""The runs a watcher keeps going: seen on the box, and restarted the way `lenslab train` does.

``RunControl`` is what the watcher needs from a box's lab; ``LabRuns`` is the real one, through
``remote.labs.open_lab`` (the same lab backend `lenslab train`, `runs` and `stop` use). A restart
is `lenslab train` again with the same run file and name: the run resumes from its newest
checkpoint on the persistent root (or the mirror), exactly.

Runs found unfinished on the box are added to the watcher's record, with a copy of the run
file `lenslab train` uploaded (``runs-config/<name>/`` on the persistent root; ``runcopy``), so
a watcher that was told about no run still restarts every run it found.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from lenslab.errors import LenslabError
from lenslab.watch.runcopy import copy_run_file
from lenslab.watch.state import WatchedRun, WatchState

if TYPE_CHECKING:
    from lenslab.config import Config
    from lenslab.remote.labs import LabBackend

# Run states after which a run needs nothing more (status.json's words).
DONE_STATES = frozenset({"finished", "failed"})
START_WAIT_SECONDS = 300.0
# A started trainer writes the step it resumed from once it trains (restored from its checkpoint,
# or the mirror's): waited for this long, so each recovery records where the run resumed.
RESUMED_WAIT_SECONDS = 120.0


class RunControl(Protocol):
    def observe(self, state: WatchState) -> bool:
        """Update the runs' steps and whether they finished, adding runs found unfinished on the
        box; False when the box could not be asked."""

    def prepare(self) -> None:
        """Make a new (or resumed) instance ready as `lenslab up` does (the box's own autostop
        watcher included), before its runs restart."""

    def restart(self, state: WatchState) -> dict[str, int | None]:
        """Start the unfinished runs again; the step each resumed from."""

    def stop(self, state: WatchState) -> list[str]:
        """Stop the live runs gracefully (each writes a checkpoint); their names."""


class LabRuns:
    """``RunControl`` through the lab backend of ``lenslab train``."""

    def __init__(self, cfg: Config, attempts: int = 1, say: Callable[[str], None] = print) -> None:
        self.cfg, self.attempts, self.say = cfg, attempts, say

    def _lab(self) -> contextlib.AbstractContextManager[LabBackend]:
        from lenslab.remote.labs import open_lab

        return open_lab(self.cfg, attempts=self.attempts)

    def prepare(self) -> None:
        from lenslab.errors import ProviderError
        from lenslab.providers.base import provider_for
        from lenslab.remote import labs

        provider = provider_for(self.cfg.box)
        box = provider.get(self.cfg.box)
        if box is None:
            raise ProviderError(f"box {self.cfg.box.name} is not running", "the watcher launches it again")
        labs.make_ready(self.cfg, provider, box, lambda: provider.connect(box), _Quiet(), False)

    def observe(self, state: WatchState) -> bool:
        try:
            with self._lab() as lab:
                for status in lab.list_runs():
                    self._seen(state, lab, status)
        except LenslabError:
            return False
        return True

    def _seen(self, state: WatchState, lab: LabBackend, status: dict[str, object]) -> None:
        name, run_state = str(status.get("name") or ""), str(status.get("state") or "")
        if not name:
            return
        known = state.run(name)
        if known is None:
            if run_state in DONE_STATES:
                return
            known = WatchedRun(name=name, run_file=copy_run_file(lab, state.box, name, self.say))
            state.runs.append(known)
        step = status.get("step")
        if isinstance(step, int):
            known.step = step
        known.finished = run_state in DONE_STATES

    def restart(self, state: WatchState) -> dict[str, int | None]:
        from lenslab import runfile, runstart
        from lenslab.remote.training import RunAlreadyRunning

        resumed: dict[str, int | None] = {}
        with self._lab() as lab:
            for run in state.unfinished():
                if not run.run_file:
                    continue  # found on the box without a run file: nothing to start it from
                # Started as `lenslab train` starts it (the box's mirror and its credentials too).
                # Already running: the box's supervisor restarted it (a resumed instance), or an
                # earlier watcher did before it was killed.
                with contextlib.suppress(RunAlreadyRunning):
                    runstart.start_run(lab, runfile.load(Path(run.run_file), run.name), self.cfg.box)
                status = self._training(lab, run.name, lab.wait_started(run.name, START_WAIT_SECONDS))
                step = status.get("resumed_from_step")
                resumed[run.name] = step if isinstance(step, int) else None
        return resumed

    @staticmethod
    def _training(lab: LabBackend, name: str, status: dict[str, object]) -> dict[str, object]:
        """The run's status once it is past "starting"; as it was when that takes too long."""
        deadline = time.monotonic() + RESUMED_WAIT_SECONDS
        while status.get("state") == "starting" and time.monotonic() < deadline:
            time.sleep(1.0)
            status = next((s for s in lab.list_runs() if s.get("name") == name), status)
        return status

    def stop(self, state: WatchState) -> list[str]:
        stopped = []
        with self._lab() as lab:
            for run in state.unfinished():
                if lab.stop_run(run.name) is not None:
                    stopped.append(run.name)
        return stopped


class _Quiet:
    """`lenslab up`'s progress display, silent: the watcher logs its own lines."""

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        yield
