"""How well label-free signals rank models the way the true mAP does: Spearman's rank correlation
of each signal with mAP over models pooled from several runs and within each run, as Markdown
tables (shared by ``bench/cluster_signals.py`` and ``bench/label_free.py``).

A model is a point ``(signals, mAP)``: the signals measured of it without labels, name ->
value, and its mAP on the labelled query/gallery split. A signal a point lacks (the neighbour
stability of the first evaluation) leaves that point out of that signal's figures only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import spearmanr

__all__ = ["Point", "agreement_tables", "spearman"]

#: A model: its label-free signals (name -> value) and its mAP.
Point = tuple[dict[str, float], float]


def spearman(points: Sequence[Point], signal: str) -> float:
    """Spearman's rank correlation of ``signal`` with mAP over the points that have it; NaN
    below 3 points or when either is constant (no ranking to agree with)."""
    pairs = [(p[signal], m) for p, m in points if signal in p and math.isfinite(p[signal])]
    if len(pairs) < 3:
        return float("nan")
    values, maps = zip(*pairs, strict=True)
    if len(set(values)) < 2 or len(set(maps)) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(values, maps).statistic)


def _rho(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+.2f}"


def agreement_tables(per_run: Mapping[str, Sequence[Point]], signals: Sequence[str]) -> list[str]:
    """Markdown lines: one row per signal (models that have it, rho pooled over all runs, the
    mean of the runs' rho, the signal's range), then one row per run (its models, each
    signal's rho within it). Signals no model has are left out."""
    pooled = [point for points in per_run.values() for point in points]
    present = [s for s in signals if any(s in p for p, _ in pooled)]
    lines = [
        "| signal | models | pooled | mean within runs | range of the signal |",
        "|---|---|---|---|---|",
    ]
    for signal in present:
        values = [p[signal] for p, _ in pooled if signal in p]
        within = [spearman(points, signal) for points in per_run.values()]
        finite = [r for r in within if not math.isnan(r)]
        lines.append(
            f"| {signal} | {len(values)} | {_rho(spearman(pooled, signal))} "
            f"| {_rho(float(np.mean(finite)) if finite else math.nan)} "
            f"| {min(values):.3g} - {max(values):.3g} |"
        )
    lines += [
        "",
        "Within each run:",
        "",
        "| run | models | " + " | ".join(present) + " |",
        "|---|---|" + "---|" * len(present),
    ]
    for run, points in per_run.items():
        cells = " | ".join(_rho(spearman(points, signal)) for signal in present)
        lines.append(f"| `{run}` | {len(points)} | {cells} |")
    return lines
