"""The watcher: keeps a box's runs going through preemptions, with no one at the keyboard.

Every ``poll_seconds`` (15 s) it asks the provider for the box's instance and knocks on its
SSH port. The instance is *lost* when the provider says it stopped, was preempted (a spot pod
exited, a bid instance was outbid), was terminated or is gone, or when its SSH port has failed
``MIN_FAILED_KNOCKS`` knocks in a row spanning ``unreachable_seconds`` (45 s) of polling seen
here: a preemption is noticed within a minute, and a laptop that slept (its clock jumped, its
Wi-Fi still reconnecting) never counts the sleep as time the box did not answer.

Then it recovers: where the provider keeps the instance (``capabilities.stop_resume``) it asks
for it back (RunPod ``podBidResume``/``podResume``, vast.ai ``start``/a new bid) and waits for
it up to ``box.resume_wait_minutes``; otherwise, or after that, it terminates it (its cost goes
into the box's ledger) and launches the cheapest matching offer again (``interruptible``,
``max_price_per_hour``, ``fallback`` as `lenslab up`; no capacity: it tries again next poll),
on any provider with a key when the runs are mirrored (``relocate``; the box's new home is
written down first, ``providers.placement``), else on the box's own. RunPod's network volume is
mounted by the new pod; elsewhere the runs come back from the mirror. Then it restarts the same
runs the way `lenslab train` does, and they resume exactly.

Money: before every launch what the box spent (ledger: earlier instances and this one so far)
must leave ``budget_usd`` one hour of the price, else nothing is launched; while watching, a
budget reached stops the runs gracefully (a checkpoint each) and terminates the instance.

Each step is written to the state file before it is taken (``state``); launches are found
again by the instance's name, so a watcher killed anywhere and started again launches nothing
twice. Every preemption and recovery is appended to the box's event log (``events``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from lenslab.errors import LenslabError
from lenslab.providers import container_ledger as ledgers
from lenslab.providers import placement
from lenslab.providers.container_launch import BudgetReached
from lenslab.providers.offers import PREEMPTED, RUNNING, STARTING, STOPPED, CloudNoCapacity, Instance
from lenslab.watch import events, relocate
from lenslab.watch import state as states
from lenslab.watch.state import BUDGET, FINISHED, RECOVERING, WATCHING

if TYPE_CHECKING:
    from lenslab.config import Config
    from lenslab.providers.container_cloud import ContainerCloud
    from lenslab.watch.runs import RunControl

POLL_SECONDS = 15.0
UNREACHABLE_SECONDS = 45.0
# Failed knocks in a row before an instance the API calls running is given up: never one alone.
MIN_FAILED_KNOCKS = 3
KNOCK_TIMEOUT = 5.0
RECOVERY_POLL_SECONDS = 3.0
RESUME_RETRY_SECONDS = 30.0  # how often a resume the provider refused (no free GPU) is asked again
OBSERVE_EVERY = 4  # polls between looks at the runs (each opens an SSH connection)
_NOT_ASKED = object()  # the provider did not answer: nothing is decided this poll


def ssh_answers(host: str | None, port: int | None, timeout: float = KNOCK_TIMEOUT) -> bool:
    """Whether an SSH server greets on host:port (no login: cheap, and needs no key)."""
    if not host or not port:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(16).startswith(b"SSH-")
    except OSError:
        return False


class Watcher:
    def __init__(
        self,
        cfg: Config,
        provider: ContainerCloud,
        runs: RunControl,
        *,
        say: Callable[[str], None] = print,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        reachable: Callable[[str | None, int | None], bool] = ssh_answers,
        poll_seconds: float = POLL_SECONDS,
        unreachable_seconds: float = UNREACHABLE_SECONDS,
    ) -> None:
        self.cfg, self.box, self.provider, self.runs = cfg, cfg.box, provider, runs
        self.say, self.clock, self.sleep, self.reachable = say, clock, sleep, reachable
        self.poll_seconds, self.unreachable_seconds = poll_seconds, unreachable_seconds
        self.state = states.load(self.box.name, provider.name)
        relocate.settle_spending(self.box.name, provider.name)  # what a move broken off left behind
        self._polls = 0
        self._said_staying = False  # "no mirror: the box stays on its provider", said once

    # -- the loop --------------------------------------------------------------------------------

    def run(self, max_polls: int | None = None) -> str:
        """Poll until every run finished or the budget is reached; the final phase."""
        while max_polls is None or self._polls < max_polls:
            phase = self.tick()
            if phase in (FINISHED, BUDGET):
                return phase
            self.sleep(self.pause())
        return self.state.phase

    def pause(self) -> float:
        """Seconds to the next poll: shorter while recovering (a resumed instance is back soon)."""
        return self.poll_seconds if self.state.phase == WATCHING else min(self.poll_seconds, RECOVERY_POLL_SECONDS)

    def tick(self) -> str:
        self._polls += 1
        st = self.state
        if st.phase in (FINISHED, BUDGET):
            return st.phase
        found = self._current()
        if found is _NOT_ASKED:
            return st.phase
        instance = found if isinstance(found, Instance) else None
        if st.phase == WATCHING:
            lost = self._lost(instance)
            if lost is None:
                if instance is not None and instance.state == RUNNING:
                    self._healthy(instance)
                return st.phase
            self._preempted(instance, lost)
        self._recover(instance)
        return st.phase

    def _current(self) -> object:
        try:
            return self.provider.current(self.box)
        except LenslabError as exc:
            self.say(f"{self.provider.name} did not answer ({exc}); asking again in {self.poll_seconds:.0f} s")
            return _NOT_ASKED

    def _save(self) -> None:
        states.save(self.state)

    def _cost(self) -> float:
        return ledgers.read(self.provider.name, self.box.name).cost_now()

    def _record(self, kind: str, **fields: object) -> None:
        event = events.record(self.box.name, kind, provider=self.provider.name, cost_usd=self._cost(), **fields)
        self.say(events.describe(event))

    # -- watching --------------------------------------------------------------------------------

    def _lost(self, instance: Instance | None) -> str | None:
        """Why the instance is lost, or None while it is (or may still be) fine."""
        st = self.state
        if instance is None:
            return "terminated" if st.instance or st.last_reachable is not None else None
        if instance.state in (PREEMPTED, STOPPED):
            return f"{instance.state} ({instance.provider_status})"
        if st.instance and instance.id != st.instance and instance.state == RUNNING:
            st.instance = instance.id  # replaced outside the watcher (`lenslab up`): watch that one
        if instance.state == RUNNING and self.reachable(instance.ssh_host, instance.ssh_port):
            st.last_reachable, st.instance = self.clock(), instance.id
            st.failed_knocks, st.unreachable_for = 0, 0.0
            return None
        return self._unanswered(instance)

    def _unanswered(self, instance: Instance) -> str | None:
        """One more failed knock; why the instance is lost once enough of them were seen.

        Only polling seen here counts: the first failure starts the clock at zero, and each later
        one adds the time since the one before, at most one poll (and its knock): a laptop that
        slept between two knocks adds no more than that, however long it slept."""
        st, now = self.state, self.clock()
        if st.last_reachable is None:
            st.last_reachable = now  # seen once: should it vanish now, it was lost
        if st.failed_knocks and st.last_knock is not None:
            st.unreachable_for += min(max(now - st.last_knock, 0.0), self.poll_seconds + KNOCK_TIMEOUT)
        st.failed_knocks += 1
        st.last_knock = now
        if st.failed_knocks >= MIN_FAILED_KNOCKS and st.unreachable_for >= self.unreachable_seconds:
            return (f"unreachable for {st.unreachable_for:.0f} s, {st.failed_knocks} knocks in a row "
                    f"({instance.provider_status})")  # fmt: skip
        return None

    def _healthy(self, instance: Instance) -> None:
        st = self.state
        if st.restart_pending:
            self._restart()
        elif self._polls % OBSERVE_EVERY == 1 and self._observe():
            self._check_finished()
        if self.box.budget_usd is not None and self._cost() >= self.box.budget_usd:
            self._budget_stop(instance, reachable=True)
            return
        self._save()

    def _observe(self) -> bool:
        try:
            return self.runs.observe(self.state)
        except Exception as exc:  # a watcher outlives what one look at the runs ran into
            self.say(f"could not look at the runs ({type(exc).__name__}: {exc}); looking again later")
            return False

    def _check_finished(self) -> None:
        st = self.state
        if st.runs and not st.unfinished():
            st.phase = FINISHED
            self._save()
            self._record("finished", instance=st.instance, reason="every watched run finished")

    # -- recovering ------------------------------------------------------------------------------

    def _preempted(self, instance: Instance | None, how: str) -> None:
        st = self.state
        st.phase, st.preempted_at, st.preempted_state, st.resume_asked_at = RECOVERING, self.clock(), how, None
        self._save()
        self._record("preempted", instance=st.instance or (instance.id if instance else ""), state=how,
                     steps=st.steps())  # fmt: skip

    def _recover(self, instance: Instance | None) -> None:
        st, now = self.state, self.clock()
        if instance is not None and instance.state == RUNNING and self.reachable(instance.ssh_host, instance.ssh_port):
            self._back(instance.id, "resumed" if instance.id == st.instance else "relaunched")
            return
        waited = now - (st.preempted_at or now)
        in_time = waited < self.box.resume_wait_minutes * 60
        kept = instance is not None and instance.id == st.instance and self.provider.capabilities.stop_resume
        if kept and in_time and instance is not None:
            if instance.state in (PREEMPTED, STOPPED):
                self._ask_resume(instance)
            return  # starting again, or asked to: looked at next poll
        if instance is not None and instance.state in (RUNNING, STARTING) and instance.id != st.instance:
            self._launch(anywhere=False)  # launched by an earlier watcher (killed since): waited for
            return
        self._replace(instance)

    def _ask_resume(self, instance: Instance) -> None:
        st, now = self.state, self.clock()
        if st.resume_asked_at is not None and now - st.resume_asked_at < RESUME_RETRY_SECONDS:
            return
        st.resume_asked_at = now
        self._save()
        try:
            self.provider.resume(self.box, instance)
            self.say(f"asked {self.provider.name} to resume instance {instance.id}")
        except LenslabError as exc:
            self.say(f"instance {instance.id} not resumed yet ({exc}); asking again in {RESUME_RETRY_SECONDS:.0f} s")

    def _replace(self, instance: Instance | None) -> None:
        """Terminate the lost instance (its cost goes into the ledger), then launch another."""
        if instance is not None:
            old = self.provider.get(self.box)
            if old is not None:
                self.provider.terminate(old)
        self._launch()

    def _launch(self, anywhere: bool = True) -> None:
        st = self.state
        try:
            choice = self._where() if anywhere else None
            if choice is None:
                self.provider.launch(self.box)  # the provider's own choice (or its live instance)
            else:
                if choice.provider.name != self.provider.name:
                    self._move(choice.provider)
                self.provider.launch_offer(self.box, choice.offer)
        except BudgetReached as exc:
            st.phase = BUDGET
            self._save()
            self._record("budget", reason=str(exc).split(";")[0])
            return
        except CloudNoCapacity as exc:
            self.say(f"no offer to relaunch on yet ({exc}); trying again in {self.poll_seconds:.0f} s")
            return
        except LenslabError as exc:
            self.say(f"relaunch failed ({exc}); trying again in {self.poll_seconds:.0f} s")
            return
        found = self.provider.current(self.box)
        if found is not None and found.state == RUNNING:
            self._back(found.id, "relaunched" if found.id != st.instance else "resumed")

    def _where(self) -> relocate.Choice | None:
        """The cheapest matching offer on any provider the box may go to; None leaves the choice
        to the box's provider (no other provider has a key, no mirror, or no offer anywhere)."""
        others = [p for p in relocate.candidates(self.box) if p.name != self.provider.name]
        if not others:
            return None
        if not self.box.mirror:
            if not self._said_staying:
                self._said_staying = True
                elsewhere = ", ".join(p.name for p in others)
                self.say(f"box.mirror is not set, so the box stays on {self.provider.name}, where its runs are "
                         f"(set box.mirror to let it move to {elsewhere} when cheaper)")  # fmt: skip
            return None
        return relocate.cheapest(self.box, [self.provider, *others], self.provider.name, self.say)

    def _move(self, to: ContainerCloud) -> None:
        """The box moves to another provider. Its new home, then its spending, are written before
        anything launches there: a watcher killed now looks for it there, launching nothing twice,
        and carries the spending a kill between the two left behind (``settle_spending``). An
        instance still on the old provider (a launch retried after a failed one) is terminated
        first, so nothing bills where the box no longer lives and its hours reach the ledger."""
        old = self.provider.name
        left = self.provider.get(self.box)
        if left is not None:
            self.provider.terminate(left)
        placement.move(self.box, to.name)
        relocate.carry_spending(self.box.name, old, to.name)
        self.provider, self.state.provider = to, to.name
        self._save()
        self._record("moved", reason=f"from {old}: the cheapest matching offer is on {to.name}")

    def _back(self, instance_id: str, how: str) -> None:
        st = self.state
        down = self.clock() - (st.preempted_at or self.clock())
        ledger = ledgers.read(self.provider.name, self.box.name)
        st.phase, st.instance, st.last_reachable, st.preempted_at = WATCHING, instance_id, self.clock(), None
        st.failed_knocks, st.unreachable_for = 0, 0.0
        st.recoveries += 1
        st.restart_pending = True
        self._save()
        self._record(how, instance=instance_id, gpu=ledger.gpu, region=ledger.region, price=ledger.price_per_hour,
                     interruptible=ledger.interruptible, down_seconds=round(down, 1))  # fmt: skip
        self._restart()

    def _restart(self) -> None:
        """The box made ready as `lenslab up` does, then the unfinished runs started again."""
        st = self.state
        try:
            self.runs.prepare()
            resumed = self.runs.restart(st) if st.unfinished() else {}
        except Exception as exc:  # kept for the next poll: the runs must come back
            self.say(f"runs not restarted yet ({exc}); trying again next poll")
            return
        st.restart_pending = False
        self._save()
        if resumed:
            steps = {k: v for k, v in resumed.items() if v is not None}
            self._record("restarted", instance=st.instance, steps=steps, runs=sorted(resumed))

    def _budget_stop(self, instance: Instance, *, reachable: bool) -> None:
        """budget_usd reached: the runs stop with a checkpoint, the instance is terminated."""
        st = self.state
        stopped: list[str] = []
        if reachable:
            try:
                stopped = self.runs.stop(st)
            except LenslabError as exc:
                self.say(f"runs could not be stopped gracefully ({exc})")
        box = self.provider.get(self.box)
        if box is not None:
            self.provider.terminate(box)
        st.phase = BUDGET
        self._save()
        self._record("budget", instance=instance.id, runs=stopped, steps=st.steps(),
                     reason=f"box.budget_usd ${self.box.budget_usd:.2f} reached")  # fmt: skip
