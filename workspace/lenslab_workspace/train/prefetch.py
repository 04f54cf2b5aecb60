"""A background thread that runs ahead of the trainer, as SAELens's ``prefetch_llm_batches`` does.

SAELens wraps its whole ``ActivationsStore`` in a ``PrefetchingIterator``: the model's forward
passes run in a thread while the SAE trains. Here the thread makes the model's batches of
activations only (a pure function of the token rows it reads), and the trainer's thread still
does the mixing, so the global RNG is drawn in the same order as without prefetch. A
checkpoint therefore holds the position of what the trainer *consumed*; whatever was in flight
is simply made again after a resume, to the same values.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

# How often a waiting producer looks whether it was asked to stop.
POLL_SECONDS = 0.1
# How long an exiting process waits for each thread to notice it was asked to stop.
EXIT_JOIN_SECONDS = 2.0

_open: weakref.WeakSet[Prefetcher[object]] = weakref.WeakSet()


class Prefetcher(Generic[T]):
    """Calls ``produce`` in a daemon thread and queues up to ``depth`` results.

    ``produce(stop)`` returns the next item, or ``None`` once ``stop`` is set while it waits.
    An exception in the thread is raised by the next ``take`` in the consumer's thread.
    """

    def __init__(self, produce: Callable[[threading.Event], T | None], depth: int, name: str) -> None:
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self._produce = produce
        self._queue: queue.Queue[tuple[T | None, BaseException | None]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        _open.add(self)  # type: ignore[arg-type]
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._produce(self._stop)
                if item is None:
                    return
                self._put((item, None))
        except BaseException as exc:
            self._put((None, exc))

    def _put(self, entry: tuple[T | None, BaseException | None]) -> None:
        while not self._stop.is_set():  # a full queue must not keep close() waiting
            try:
                self._queue.put(entry, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue

    def take(self) -> T:
        """The next item, in order; waits for the thread when it has none ready."""
        while True:
            try:
                item, error = self._queue.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread ended without a result") from None
                continue
            if error is not None:
                self.close()
                raise error
            assert item is not None
            return item

    def close(self, timeout: float | None = None) -> None:
        """Stop the thread and drop what it made; waits for at most one ``produce`` call (or
        ``timeout`` seconds: the thread is a daemon, and an exit must not wait on a stalled read)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        while not self._queue.empty():
            self._queue.get_nowait()


@atexit.register
def _close_all() -> None:
    # A forward pass still running while the interpreter shuts down can crash it noisily.
    # Bounded: a tokenizer stuck in a streamed dataset's read must not keep an interrupted trainer
    # (its checkpoint already written) from exiting within a spot instance's grace period.
    for prefetcher in list(_open):
        prefetcher.close(timeout=EXIT_JOIN_SECONDS)
