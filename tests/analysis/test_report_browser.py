"""report.html in a real headless Chromium: it renders, searches, paginates, and asks the network for nothing."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lenslab_workspace.analysis import plots, report
from lenslab_workspace.analysis.reducers import HistogramResult
from tests.analysis.browser import RecordingProxy, run

WORDS = ["sparse", "feature", "<b>bold</b>", "token", "layer", "résumé", "the cat"]


def records(n: int = 45) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    out = []
    for feature in range(n):
        contexts = []
        for c in range(3 if feature % 9 else 0):  # every 9th feature never fired: no card
            tokens = [f" {WORDS[(feature + c + i) % len(WORDS)]}" for i in range(6)]
            acts = rng.random(6).round(4).tolist()
            contexts.append({"value": max(acts), "sequence": c, "position": 3, "focus": 3, "tokens": tokens,
                             "activations": acts})  # fmt: skip
        out.append({"feature": feature, "density": 0.01 * (feature % 5), "mean_activation": 0.5,
                    "max_activation": 1.0, "contexts": contexts})  # fmt: skip
    return out


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("report")
    recs = records()
    density = np.array([r["density"] for r in recs])
    hist = HistogramResult(np.linspace(0, 1, 11), np.arange(10), np.int64(0), np.int64(0))
    acts = HistogramResult(np.linspace(-4, 3, 61), np.ones((2, 60), dtype=np.int64), np.zeros(2), np.zeros(2))
    pngs = plots.write_plots(out, density, hist, acts, [1, 2])
    summary = {"run": "demo", "sae": "runs/demo/final", "hook_name": "blocks.0.hook_resid_post",
               "tokens_source": "held-out", "versions": {"sae-lens": "x"},
               "metrics": {"ce_loss_score": 0.91, "l0": 16.0, "explained_variance": 0.8, "dead_fraction": 0.25,
                           "tokens_evaluated": 20480}}  # fmt: skip
    return report.write_report(out, summary, recs, pngs), recs


def cards(dom: str) -> list[int]:
    return [int(m) for m in re.findall(r'<div class="card" data-feature="(\d+)"', dom)]


def count(dom: str) -> int:
    match = re.search(r'id="count" data-count="(\d+)"', dom)
    assert match, "the page's script did not run"
    return int(match.group(1))


def expected_matches(recs: list[dict[str, Any]], query: str) -> list[int]:
    return [r["feature"] for r in recs if r["contexts"]
            and query.lower() in "\n".join("".join(c["tokens"]) for c in r["contexts"]).lower()]  # fmt: skip


def test_report_renders_metrics_plots_and_paginated_cards(
    page: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    path, recs = page
    with RecordingProxy() as proxy:
        dom = run(path, tmp_path / "profile", proxy, "--dump-dom")
        shot = tmp_path / "shot.png"
        run(path, tmp_path / "profile2", proxy, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    assert re.search(r'<tr data-metric="ce_loss_score"><th>CE loss recovered</th><td class="v">0.91</td>', dom)
    assert '<tr data-metric="dead_fraction">' in dom and "20,480" in dom
    assert dom.count('src="data:image/png;base64,') == 3
    with_cards = [r["feature"] for r in recs if r["contexts"]]
    assert count(dom) == len(with_cards) == 40
    assert cards(dom) == with_cards[:20]  # first page of 20
    assert "page 1 of 2" in dom
    assert "&lt;b&gt;bold&lt;/b&gt;" in dom and "<b>bold</b>" not in dom.split('id="feature-data"')[0]
    assert proxy.page_requests == []


@pytest.mark.parametrize("query", ["the cat", "RÉSUMÉ", "layer token", "17", "nothing-like-this"])
def test_search_filters_the_cards(page: tuple[Path, list[dict[str, Any]]], tmp_path: Path, query: str) -> None:
    path, recs = page
    with RecordingProxy() as proxy:
        dom = run(path, tmp_path / "profile", proxy, "--dump-dom", fragment="q=" + urllib.parse.quote(query))
    expected = [17] if query == "17" else expected_matches(recs, query)
    assert count(dom) == len(expected)
    assert cards(dom) == expected[:20]
    assert f'data-query="{query}"' in dom or query == "RÉSUMÉ"
    assert proxy.page_requests == []


def test_the_network_check_sees_a_page_that_does_make_requests(tmp_path: Path) -> None:
    # The same check on a page that loads a remote image must fail: the check is not blind.
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="http://lenslab-check.invalid/x.png"></body></html>')
    with RecordingProxy() as proxy:
        run(bad, tmp_path / "profile", proxy, "--dump-dom")
    assert any("lenslab-check.invalid" in line for line in proxy.page_requests), proxy.requests
