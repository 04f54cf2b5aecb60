"""Benchmark `lenslab offers` across three providers: concurrency, not a sum.

The Lambda, RunPod and vast.ai API emulators (tests/support) run on 127.0.0.1, each adding a
fixed latency to every call (default 200 ms). Measured, each as the median of repeated runs of
the installed console script (a fresh process every time, as a user runs it):
  - `lenslab offers` with only one provider's key, for each provider: the slowest of these is
    the slowest single provider's time;
  - `lenslab offers` with all three keys: the wall time.
Prints both and their ratio; the target is a ratio of at most 1.5 (three providers asked one
after the other would take about 3x). HOME is a temporary directory: no key file is read.

Usage: python bench/bench_offers.py [--runs N] [--latency SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.support.lambda_emulator import LambdaEmulator  # noqa: E402
from tests.support.runpod_emulator import RunPodEmulator  # noqa: E402
from tests.support.vast_emulator import VastEmulator  # noqa: E402

LENSLAB = str(Path(sys.executable).with_name("lenslab"))
TARGET_RATIO = 1.5
KEYS = ("LAMBDA_API_KEY", "RUNPOD_API_KEY", "VAST_API_KEY")


class SlowLambda(LambdaEmulator):
    """The Lambda emulator with the same fixed latency per call as the other two."""

    latency_seconds = 0.0

    def handle(self, method: str, path: str, auth: str | None, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        time.sleep(self.latency_seconds)  # outside the emulator's lock: calls overlap
        return super().handle(method, path, auth, body)


def offers_seconds(env: dict[str, str], runs: int) -> tuple[float, dict[str, Any]]:
    """Median wall time of `lenslab offers --json`, and the last run's reply."""
    times, data = [], {}
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run([LENSLAB, "offers", "--json"], env=env, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"lenslab offers failed: {result.stderr.strip()}")
        data = json.loads(result.stdout)
    return statistics.median(times), data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds added to every API call")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lam = SlowLambda(Path(tmp) / "fs")
        runpod, vast = RunPodEmulator(Path(tmp) / "volumes"), VastEmulator()
        for emulator in (lam, runpod, vast):
            emulator.latency_seconds = args.latency
            emulator.start()
        try:
            keyed = {
                "LAMBDA_API_KEY": {"LAMBDA_API_KEY": lam.api_key, "LAMBDA_API_URL": lam.url},
                "RUNPOD_API_KEY": {"RUNPOD_API_KEY": runpod.api_key, "RUNPOD_API_URL": runpod.graphql_url,
                                   "RUNPOD_REST_URL": runpod.rest_url},
                "VAST_API_KEY": {"VAST_API_KEY": vast.api_key, "VAST_API_URL": vast.url},
            }  # fmt: skip
            base = {**os.environ, "HOME": tmp, **dict.fromkeys(KEYS, "")}
            singles = {}
            for extra in keyed.values():
                seconds, data = offers_seconds({**base, **extra}, args.runs)
                answered = [p["provider"] for p in data["providers"] if p["status"] == "ok"]
                singles[answered[0]] = seconds
            everything = {k: v for extra in keyed.values() for k, v in extra.items()}
            wall, data = offers_seconds({**base, **everything}, args.runs)
        finally:
            for emulator in (lam, runpod, vast):
                emulator.stop()
    slowest_name = max(singles, key=lambda name: singles[name])
    slowest = singles[slowest_name]
    ratio = wall / slowest
    print(f"latency per API call: {args.latency * 1000:.0f} ms; median of {args.runs} runs each")
    for name, seconds in singles.items():
        print(f"  lenslab offers, {name} key only: {seconds:.3f} s")
    per_provider = ", ".join(f"{p['provider']} {p['seconds']:.3f} s" for p in data["providers"])
    print(f"  lenslab offers, all three keys: {wall:.3f} s ({len(data['offers'])} offers; {per_provider})")
    print(f"wall {wall:.3f} s / slowest single provider ({slowest_name}) {slowest:.3f} s = {ratio:.2f}x "
          f"(target <= {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'NOT met'})")  # fmt: skip
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
