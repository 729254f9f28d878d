"""Benchmark of reid_core.evaluation on Market-1501 sized synthetic data.

Times the vectorised :func:`evaluate_rank` against the plain per-query reference of
:mod:`bench.eval_reference` (and checks they agree), times k-reciprocal re-ranking on a smaller
problem, and prints the re-ranking memory estimate at the full size. Writes a markdown report.

    python bench/eval_speed.py --queries 3368 --gallery 15913 --ids 751 --seed 0 --reps 1
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.eval_reference import reference_evaluate_rank, reference_re_rank  # noqa: E402
from bench.report import Transcript, command_line, write_report  # noqa: E402
from reid_core.evaluation import (  # noqa: E402
    compute_distance,
    estimate_rerank_memory,
    evaluate_features,
    evaluate_rank,
    re_rank,
)

GIB = float(1024**3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--queries", type=int, default=3368, help="query images (Market: 3368)")
    p.add_argument("--gallery", type=int, default=15913, help="gallery images (Market: 15913)")
    p.add_argument("--ids", type=int, default=751, help="identities (Market test: 751)")
    p.add_argument("--cams", type=int, default=6, help="cameras (Market: 6)")
    p.add_argument("--dim", type=int, default=256, help="feature dimension of the synthetic data")
    p.add_argument("--noise", type=float, default=2.0, help="feature noise around id centres")
    p.add_argument(
        "--distractors", type=float, default=0.17, help="fraction of pid-0 gallery distractors"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=1, help="repetitions of our evaluate_rank")
    p.add_argument(
        "--reference-queries",
        type=int,
        default=None,
        help="run the (slow) reference on the first N queries only and compare on that subset",
    )
    p.add_argument("--rerank-queries", type=int, default=500)
    p.add_argument("--rerank-gallery", type=int, default=2000)
    p.add_argument("--rerank-noise", type=float, default=2.0, help="noise of the re-ranking data")
    p.add_argument(
        "--rerank-check",
        type=int,
        nargs=2,
        default=(100, 400),
        metavar=("Q", "G"),
        help="size of the re-ranking comparison with the dense reference",
    )
    p.add_argument(
        "--rerank-full",
        action="store_true",
        help="also time re-ranking (distances included) on the full-size data",
    )
    p.add_argument("--output", type=Path, default=REPO_ROOT / "bench/results/eval_speed.md")
    return p.parse_args(argv)


def make_data(
    num_q: int,
    num_g: int,
    num_ids: int,
    num_cams: int,
    dim: int,
    noise: float,
    distractors: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Market-like labels (pids 1..ids, pid 0 gallery distractors, uniform cameras) and
    features = identity centre + gaussian noise (distractors: pure noise around 0)."""
    centres = rng.normal(size=(num_ids + 1, dim)).astype(np.float32)
    centres[0] = 0.0
    q_pids = rng.integers(1, num_ids + 1, num_q)
    g_pids = rng.integers(1, num_ids + 1, num_g)
    g_pids[rng.random(num_g) < distractors] = 0
    q_cams = rng.integers(0, num_cams, num_q)
    g_cams = rng.integers(0, num_cams, num_g)
    qf = centres[q_pids] + noise * rng.normal(size=(num_q, dim)).astype(np.float32)
    gf = centres[g_pids] + noise * rng.normal(size=(num_g, dim)).astype(np.float32)
    return {
        "qf": qf,
        "gf": gf,
        "q_pids": q_pids,
        "g_pids": g_pids,
        "q_cams": q_cams,
        "g_cams": g_cams,
    }


@dataclass
class Timing:
    """Wall-clock and process CPU seconds of each repetition."""

    wall: list[float]
    cpu: list[float]

    @property
    def best(self) -> float:
        return min(self.wall)

    @property
    def best_cpu(self) -> float:
        return min(self.cpu)


def timed(fn: Callable[[], Any], reps: int = 1) -> tuple[Any, Timing]:
    timing, out = Timing([], []), None
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        timing.wall.append(time.perf_counter() - w0)
        timing.cpu.append(time.process_time() - c0)
    return out, timing


def max_diff(ours: Any, ref: dict[str, Any]) -> dict[str, float]:
    return {
        "mAP": abs(ours.mAP - ref["mAP"]),
        "mINP": abs(ours.mINP - ref["mINP"]),
        "CMC": float(np.abs(ours.cmc - ref["cmc"]).max()),
    }


def machine_info(load: tuple[float, float, float]) -> list[tuple[str, str]]:
    busy = " (other processes were using the CPU: timings are noisy)" if load[0] > 0.5 else ""
    return [
        ("platform", platform.platform()),
        ("processor", platform.processor() or platform.machine()),
        ("os.cpu_count()", str(os.cpu_count())),
        (
            "load average at start (1/5/15 min)",
            " / ".join(f"{x:.2f}" for x in load) + busy,
        ),
        ("torch threads", str(torch.get_num_threads())),
        ("python", platform.python_version()),
        ("numpy / torch", f"{np.__version__} / {torch.__version__}"),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = os.getloadavg()
    command = command_line("eval_speed.py", argv)
    rng = np.random.default_rng(args.seed)
    transcript = Transcript()
    say = transcript.say

    # --- evaluate_rank at full size -------------------------------------------------------
    data = make_data(
        args.queries,
        args.gallery,
        args.ids,
        args.cams,
        args.dim,
        args.noise,
        args.distractors,
        rng,
    )
    labels = (data["q_pids"], data["g_pids"], data["q_cams"], data["g_cams"])
    distmat, t_dist = timed(lambda: compute_distance(data["qf"], data["gf"], "cosine"))
    say(
        f"distance matrix {args.queries} x {args.gallery} (cosine, dim {args.dim}): "
        f"{t_dist.best:.2f} s"
    )
    ours, t_ours = timed(lambda: evaluate_rank(distmat, *labels), args.reps)
    say(
        f"ours:      {t_ours.best:.3f} s wall, {t_ours.best_cpu:.3f} s CPU (best of {args.reps}) "
        f"-> {ours}"
    )

    n_ref = (
        args.queries
        if args.reference_queries is None
        else min(args.reference_queries, args.queries)
    )
    subset = n_ref < args.queries
    sub_labels = (data["q_pids"][:n_ref], labels[1], data["q_cams"][:n_ref], labels[3])
    ref, t_ref = timed(lambda: reference_evaluate_rank(distmat[:n_ref], *sub_labels))
    ours_sub, t_ours_sub = (
        timed(lambda: evaluate_rank(distmat[:n_ref], *sub_labels), args.reps)
        if subset
        else (ours, t_ours)
    )
    scope = f"the first {n_ref} queries (subset)" if subset else f"all {n_ref} queries"
    say(f"reference: {t_ref.best:.3f} s wall, {t_ref.best_cpu:.3f} s CPU on {scope}")
    ratio = t_ref.best / t_ours_sub.best
    cpu_ratio = t_ref.best_cpu / t_ours_sub.best_cpu
    diffs = max_diff(ours_sub, ref)
    say(f"speed ratio reference / ours on {scope}: {ratio:.1f}x wall, {cpu_ratio:.1f}x CPU time")
    say(
        "largest |ours - reference|: "
        + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
        + f"; valid queries {ours_sub.num_valid_queries} vs {ref['num_valid_queries']}"
    )

    # --- re-ranking ------------------------------------------------------------------------
    rq, rg = args.rerank_queries, args.rerank_gallery
    rr_ids = min(args.ids, max(2, rg // 10))
    small = make_data(rq, rg, rr_ids, args.cams, args.dim, args.rerank_noise, 0.1, rng)
    s_labels = (small["q_pids"], small["g_pids"], small["q_cams"], small["g_cams"])
    (qg, qq, gg), t_sdist = timed(
        lambda: tuple(
            compute_distance(a, b, "euclidean")
            for a, b in ((small["qf"], small["gf"]), (small["qf"], small["qf"]), (small["gf"],) * 2)
        )
    )
    reranked, t_rr = timed(lambda: re_rank(qg, qq, gg, k1=20, k2=6, lambda_value=0.3), args.reps)
    before, after = evaluate_rank(qg, *s_labels), evaluate_rank(reranked, *s_labels)
    say(
        f"re-ranking {rq} x {rg} (k1=20, k2=6, lambda=0.3, euclidean): {t_rr.best:.3f} s "
        f"(+ {t_sdist.best:.2f} s for the 3 distance matrices); "
        f"mAP {before.mAP:.4f} -> {after.mAP:.4f}, rank-1 {before.r1:.4f} -> {after.r1:.4f}"
    )
    cq, cg = args.rerank_check
    cq, cg = min(cq, rq), min(cg, rg)
    ours_small = re_rank(qg[:cq, :cg], qq[:cq, :cq], gg[:cg, :cg])
    ref_small, t_rref = timed(lambda: reference_re_rank(qg[:cq, :cg], qq[:cq, :cq], gg[:cg, :cg]))
    rr_diff = float(np.abs(ours_small - ref_small).max())
    say(
        f"re-ranking check vs dense reference at {cq} x {cg}: largest |diff| {rr_diff:.2e} "
        f"(reference {t_rref.best:.2f} s)"
    )
    full_row: list[tuple[str, str, str]] = []
    if args.rerank_full:
        del qg, qq, gg, reranked, distmat
        full, t_full = timed(
            lambda: evaluate_features(data["qf"], data["gf"], *labels, "cosine", rerank=True)
        )
        say(
            f"re-ranking at full size {args.queries} x {args.gallery} (cosine, distances "
            f"included, evaluation included): {t_full.best:.2f} s; mAP {ours.mAP:.4f} (cosine, "
            f"no re-ranking) -> {full.mAP:.4f}, rank-1 {ours.r1:.4f} -> {full.r1:.4f}"
        )
        full_row = [
            (
                "re-ranking + distances + evaluate_rank",
                f"{args.queries} x {args.gallery}",
                f"{t_full.best:.2f} s (mAP {full.mAP:.4f})",
            )
        ]
    est = estimate_rerank_memory(args.queries, args.gallery)
    say(
        f"re-ranking memory estimate at {args.queries} x {args.gallery}: {est / GIB:.2f} GiB "
        f"({est} bytes)"
    )

    # --- markdown report ---------------------------------------------------------------------
    rows = [
        ("distance matrix (cosine)", f"{args.queries} x {args.gallery}", f"{t_dist.best:.2f} s"),
        (
            "evaluate_rank (ours, vectorised)",
            f"{args.queries} x {args.gallery}",
            f"{t_ours.best:.3f} s wall, {t_ours.best_cpu:.3f} s CPU (best of {args.reps})",
        ),
        (
            "evaluate_rank (per-query reference)",
            f"{n_ref} x {args.gallery}",
            f"{t_ref.best:.3f} s wall, {t_ref.best_cpu:.3f} s CPU",
        ),
        ("speed ratio reference / ours", scope, f"{ratio:.1f}x wall, {cpu_ratio:.1f}x CPU"),
        ("max abs diff mAP", scope, f"{diffs['mAP']:.2e}"),
        ("max abs diff mINP", scope, f"{diffs['mINP']:.2e}"),
        ("max abs diff CMC (50 ranks)", scope, f"{diffs['CMC']:.2e}"),
        (
            "mAP / mINP / rank-1 (ours)",
            "synthetic",
            f"{ours.mAP:.4f} / {ours.mINP:.4f} / {ours.r1:.4f}",
        ),
        ("re_rank (k1=20, k2=6, lambda=0.3)", f"{rq} x {rg}", f"{t_rr.best:.3f} s"),
        (
            "re-ranking mAP before -> after",
            f"{rq} x {rg}",
            f"{before.mAP:.4f} -> {after.mAP:.4f}",
        ),
        ("re_rank max abs diff vs dense reference", f"{cq} x {cg}", f"{rr_diff:.2e}"),
        *full_row,
        ("re-ranking memory estimate", f"{args.queries} x {args.gallery}", f"{est / GIB:.2f} GiB"),
    ]
    md = ["# Evaluation speed", "", f"Command: `{command}`", "", "## Machine", ""]
    md += ["| item | value |", "| --- | --- |"]
    md += [f"| {k} | {v} |" for k, v in machine_info(load_at_start)]
    md += ["", "## Results", "", "| measurement | size | value |", "| --- | --- | --- |"]
    md += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    md += [""]
    write_report(args.output, md, transcript)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
