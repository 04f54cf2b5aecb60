"""Progress: a bar on a terminal, plain log lines otherwise (container logs, files)."""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from typing import Any

log = logging.getLogger("lenslab.train")

LOG_EVERY_SECONDS = 10.0
# tokens_per_second and eta_seconds cover this much recent time.
RATE_WINDOW_SECONDS = 30.0


class Progress:
    def __init__(self, total_tokens: int, done_tokens: int, interactive: bool | None = None) -> None:
        self.total = total_tokens
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._bar: Any = None
        self._last_log = time.monotonic()
        if self.interactive:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_tokens, initial=done_tokens, unit="tok", unit_scale=True, desc="training")
        self._shown = done_tokens

    def update(self, done_tokens: int, step: int, losses: dict[str, float], tokens_per_second: float | None) -> None:
        if self._bar is not None:
            self._bar.update(done_tokens - self._shown)
            self._shown = done_tokens
            if step % 20 == 0:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in list(losses.items())[:3]}, refresh=False)
            return
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_SECONDS:
            self._last_log = now
            rate = f"{tokens_per_second:,.0f} tok/s" if tokens_per_second else "-"
            loss_text = " ".join(f"{k}={v:.4g}" for k, v in losses.items())
            log.info(
                "step %d  %d/%d tokens (%.1f%%)  %s  %s",
                step,
                done_tokens,
                self.total,
                100.0 * done_tokens / max(self.total, 1),
                rate,
                loss_text,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class RateWindow:
    """Tokens per second over the last ``seconds`` (not since launch): after a slow start
    (tokenizing, the norm estimate, a resume) the rate and the ETA follow the current pace."""

    def __init__(self, now: float, tokens: int, seconds: float = RATE_WINDOW_SECONDS) -> None:
        self.seconds = seconds
        self._samples: deque[tuple[float, int]] = deque([(now, tokens)])

    def rate(self, now: float, tokens: int) -> float | None:
        """The rate between the oldest sample still in the window and now; None at first."""
        self._samples.append((now, tokens))
        # Keep one sample at or before the window's start, so the window is always covered.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.seconds:
            self._samples.popleft()
        then, before = self._samples[0]
        if now <= then:
            return None
        return (tokens - before) / (now - then)
