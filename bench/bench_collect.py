"""Benchmark lenslab's collection API and lenslab-eval against their baselines.

  throughput  collect() with the top-k reducer vs a hand-written TransformerLens hook loop doing
              the same work (encode with the SAE, per-feature torch.topk merged per batch);
              target: collect >= 0.9x the loop's tokens/s. The tiny random model of the quick
              start (workspace/configs/tiny.toml), a TopK SAE with 512 features, CPU.
  memory      peak RSS of a process running collect() over 100k vs 1M tokens (a memory-mapped
              token file; each size in its own subprocess); target: ratio <= 1.2.
  eval        lenslab-eval over 200k tokens of the tiny run, next to SAELens's run_evals on the
              same tokens (RUN_DIR with --run, else the tiny run is trained first, ~1-2 min).

Usage: python bench/bench_collect.py [throughput|memory|eval|all] [--run RUN_DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
HOOK = "blocks.0.hook_resid_post"
K = 10
BATCH = 32
TARGETS = {"throughput": 0.9, "memory": 1.2}


def tiny_model() -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=257, n_ctx=128, act_fn="gelu",
        normalization_type="LN", seed=0, device="cpu",
    )  # fmt: skip
    return HookedTransformer(cfg).eval()


def tiny_sae() -> Any:
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    return TopKSAE(TopKSAEConfig(d_in=64, d_sae=512, k=16)).eval()


def tokens(n_tokens: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).integers(0, 256, size=(n_tokens // 64, 64))
    rows[:, 0] = 256
    return rows


@torch.no_grad()
def hand_loop(model: Any, sae: Any, rows: np.ndarray) -> torch.Tensor:
    """What one writes by hand: a hook storing into an outer variable, then the same top-k merge."""
    best_values: torch.Tensor | None = None
    captured: dict[str, torch.Tensor] = {}

    def grab(activations: torch.Tensor, hook: Any) -> None:
        captured["acts"] = activations

    for start in range(0, rows.shape[0], BATCH):
        batch = torch.from_numpy(rows[start : start + BATCH])
        model.run_with_hooks(batch, fwd_hooks=[(HOOK, grab)], stop_at_layer=1, return_type=None)
        features = sae.encode(captured["acts"])
        seq_len = features.shape[1]
        flat = features.reshape(-1, features.shape[-1]).float()
        values, index = torch.topk(flat.T, K, dim=1)
        sequence, position = index // seq_len + start, index % seq_len
        if best_values is None:
            best_values, best_seq, best_pos = values, sequence, position
        else:
            best_values, pick = torch.topk(torch.cat([best_values, values], 1), K, dim=1)
            best_seq = torch.gather(torch.cat([best_seq, sequence], 1), 1, pick)
            best_pos = torch.gather(torch.cat([best_pos, position], 1), 1, pick)
    assert best_values is not None
    return best_values


def throughput(n_tokens: int = 100_000, repeats: int = 3) -> bool:
    from lenslab_workspace.analysis import TopKContexts, collect

    torch.set_num_threads(1)  # one thread each: fair on a shared machine, and no oversubscription
    model, sae, rows = tiny_model(), tiny_sae(), tokens(n_tokens)
    timings: dict[str, list[float]] = {"collect": [], "hand loop": []}
    for _ in range(repeats):  # interleaved, best of each: both see the same machine load
        start = time.perf_counter()
        ours = collect(model, rows, {HOOK: TopKContexts(K, sae=sae)}, batch_size=BATCH)[HOOK]
        timings["collect"].append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs = hand_loop(model, sae, rows)
        timings["hand loop"].append(time.perf_counter() - start)
    assert np.allclose(ours.values, theirs.numpy()), "the two do different work"
    rates = {name: rows.size / min(t) for name, t in timings.items()}
    ratio = rates["collect"] / rates["hand loop"]
    print(f"throughput over {rows.size:,} tokens (best of {repeats}):")
    for name, rate in rates.items():
        print(f"  {name:10s} {rate:12,.0f} tokens/s")
    ok = ratio >= TARGETS["throughput"]
    print(f"  ratio {ratio:.3f} (target >= {TARGETS['throughput']}) {'OK' if ok else 'MISSED'}")
    return ok


def memory_child(n_tokens: int, path: str) -> None:
    """In a fresh process: collect over a memory-mapped token file; print the peak RSS (KiB)."""
    from lenslab_workspace.analysis import FeatureStats, MeanVar, TopKContexts, collect

    model, sae = tiny_model(), tiny_sae()
    rows = np.load(path, mmap_mode="r")[: n_tokens // 64]
    collect(model, rows, {HOOK: TopKContexts(K, sae=sae), "blocks.1.hook_resid_post": MeanVar()}, batch_size=BATCH)
    collect(model, rows, {HOOK: FeatureStats(sae=sae)}, batch_size=BATCH)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def memory() -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.npy"
        np.save(path, tokens(1_000_000).astype(np.int32))
        peaks = {}
        for n in (100_000, 1_000_000):
            out = subprocess.run(
                [sys.executable, __file__, "memory-child", str(n), str(path)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            peaks[n] = int(out.stdout.strip().splitlines()[-1])
    ratio = peaks[1_000_000] / peaks[100_000]
    print("peak RSS of collect (top-k + mean/var, then feature stats):")
    for n, kib in peaks.items():
        print(f"  {n:>9,} tokens  {kib / 1024:8.1f} MiB")
    ok = ratio <= TARGETS["memory"]
    print(f"  ratio {ratio:.3f} (target <= {TARGETS['memory']}) {'OK' if ok else 'MISSED'}")
    return ok


def tiny_run(run: Path | None) -> Path:
    if run is not None:
        return run
    runs = Path(tempfile.mkdtemp(prefix="lenslab-bench-eval-"))
    subprocess.run(
        [sys.executable, "-m", "lenslab_workspace.train.cli", str(REPO / "workspace" / "configs" / "tiny.toml"),
         "--runs-dir", str(runs)],
        check=True, capture_output=True,
    )  # fmt: skip
    return runs / "tiny"


def evaluation(run: Path | None, n_tokens: int = 200_000) -> bool:
    from sae_lens.evals import run_evals

    from lenslab_workspace.analysis import evaluate, runs

    run_dir = tiny_run(run)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "lenslab_workspace.analysis.cli", str(run_dir), "--tokens", str(n_tokens), "--json"],
        check=True, capture_output=True,
    )  # fmt: skip
    ours = time.perf_counter() - start
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())["metrics"]

    opened = runs.open_run(run_dir, "cpu")
    sae, scaler = runs.load_sae(run_dir / "final", "cpu")
    batch = int(opened.runner["store_batch_size_prompts"])
    rows, batch = evaluate.whole_batches(runs.eval_tokens(opened, n_tokens, None).rows, batch)
    start = time.perf_counter()
    run_evals(
        sae,
        evaluate.TokenRows(rows, batch, "cpu"),  # type: ignore[arg-type]
        opened.model,
        scaler,
        evaluate.saelens_eval_config(rows.shape[0] // batch, batch),
        exclude_special_tokens=runs.special_tokens(opened),
    )
    theirs = time.perf_counter() - start
    print(f"evaluation of the tiny run over {metrics['tokens_evaluated']:,} tokens:")
    print(f"  lenslab-eval (whole command: load, SAELens metrics, features, plots, report) {ours:7.1f} s")
    print(f"  SAELens run_evals (metrics only, model already loaded)                       {theirs:7.1f} s")
    return True


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "memory-child":
        memory_child(int(sys.argv[2]), sys.argv[3])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="all", choices=("throughput", "memory", "eval", "all"))
    parser.add_argument("--run", type=Path, help="a finished tiny run (default: train one)")
    args = parser.parse_args()
    ok = True
    if args.what in ("throughput", "all"):
        ok &= throughput()
    if args.what in ("memory", "all"):
        ok &= memory()
    if args.what in ("eval", "all"):
        ok &= evaluation(args.run)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
