"""Progress: a bar on a terminal, plain log lines otherwise (container logs, files)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("lenslab.train")

LOG_EVERY_SECONDS = 10.0


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
