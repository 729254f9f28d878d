"""One clustering step of cluster contrast at MSMT17 train size: seconds and peak memory.

The step is :func:`reid_core.clustering.cluster_features` (camera-centring, k-NN, the sparse
k-reciprocal Jaccard distance, DBSCAN) on synthetic features of the right size: 32,621 images of
1,041 identities over 15 cameras (MSMT17's train split), dimension 2048 (ResNet-50's global
feature), each feature its identity's centre plus a camera offset plus gaussian noise. The
reference in the same run is one exact k-NN search of the same features (faiss flat index, the
k1 + 1 neighbours): the least any k-reciprocal clustering must do. Each measurement runs in a
child process of its own, so peak resident sizes (``VmHWM``, inputs included) do not mix.

Targets (issue "Beyond the paper"): under 60 s and 4 GiB per clustering on this CPU.

    python bench/cluster_scale.py                     # msmt17 size
    python bench/cluster_scale.py --images 4000 --identities 400 --cameras 2   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.rerank_scale import measure  # noqa: E402

TARGET_SECONDS = 60.0
TARGET_GIB = 4.0


def make_features(
    images: int, identities: int, cameras: int, dim: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (N, dim) float32, identities (N,), cameras (N,))."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((identities, dim), dtype=np.float32)
    offsets = 0.5 * rng.standard_normal((cameras, dim), dtype=np.float32)
    pids = rng.integers(0, identities, images)
    cams = rng.integers(0, cameras, images)
    noise = 0.9 * rng.standard_normal((images, dim), dtype=np.float32)
    return centres[pids] + offsets[cams] + noise, pids, cams


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    data = np.load(args.work / "inputs.npz")
    features, cams = torch.from_numpy(data["features"]), data["cams"]
    if args.child == "knn":
        from reid_core.evaluation.search import build_index, knn_search

        def search() -> Any:
            return knn_search(build_index(features, "cosine"), features, args.k1 + 1)

        _, m = measure(search)
        return m
    from reid_core.clustering import cluster_features

    def step() -> Any:
        return cluster_features(
            features, cams, k1=args.k1, k2=args.k2, eps=args.eps, min_samples=4, knn=args.knn
        )

    clustering, m = measure(step)
    from sklearn.metrics import adjusted_rand_score

    labels = clustering.labels.copy()
    labels[labels < 0] = labels.max() + 1 + np.arange(int((labels < 0).sum()))
    m["ari_vs_truth"] = float(adjusted_rand_score(data["pids"], labels))
    m.update(clustering.stats.as_metrics())
    return m


def spawn(child: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        child,
        "--work",
        str(args.work),
        "--threads",
        str(args.threads),
        "--k1",
        str(args.k1),
        "--k2",
        str(args.k2),
        "--eps",
        str(args.eps),
        "--knn",
        args.knn,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=32_621)
    p.add_argument("--identities", type=int, default=1_041)
    p.add_argument("--cameras", type=int, default=15)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--k1", type=int, default=30)
    p.add_argument("--k2", type=int, default=6)
    p.add_argument("--eps", default="0.6")
    p.add_argument("--knn", default="auto", choices=["auto", "faiss", "exact"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=ROOT / "bench/results/cluster_scale.md")
    p.add_argument("--child", choices=["knn", "cluster"], help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.eps = args.eps if args.eps == "auto" else float(args.eps)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    with tempfile.TemporaryDirectory() as work:
        args.work = Path(work)
        features, pids, cams = make_features(
            args.images, args.identities, args.cameras, args.dim, args.seed
        )
        np.savez(args.work / "inputs.npz", features=features, pids=pids, cams=cams)
        input_gib = features.nbytes / 2**30
        del features
        knn = spawn("knn", args)
        ours = spawn("cluster", args)
    ratio = ours["wall_s"] / knn["wall_s"]
    lines = [
        "# One clustering step at MSMT17 train size (`bench/cluster_scale.py`)",
        "",
        f"`python bench/cluster_scale.py --images {args.images} --identities {args.identities} "
        f"--cameras {args.cameras} --dim {args.dim} --k1 {args.k1} --k2 {args.k2} "
        f"--eps {args.eps} --knn {args.knn}`; {platform.processor() or platform.machine()}, "
        f"{args.threads} threads; features {input_gib:.2f} GiB.",
        "",
        "| step | seconds | peak resident GiB | over the inputs GiB |",
        "|---|---|---|---|",
        f"| reference: exact k-NN search (faiss flat, k={args.k1 + 1}) | {knn['wall_s']:.1f} | "
        f"{knn['peak_gib']:.2f} | {knn['peak_over_before_gib']:.2f} |",
        f"| clustering: centring, k-NN, sparse Jaccard, DBSCAN | {ours['wall_s']:.1f} | "
        f"{ours['peak_gib']:.2f} | {ours['peak_over_before_gib']:.2f} |",
        "",
        f"- clustering / k-NN search: **{ratio:.2f}x**",
        f"- targets: {TARGET_SECONDS:.0f} s ({ours['wall_s'] / TARGET_SECONDS:.2f} of it), "
        f"{TARGET_GIB:.0f} GiB ({ours['peak_gib'] / TARGET_GIB:.2f} of it): "
        + (
            "met"
            if ours["wall_s"] < TARGET_SECONDS and ours["peak_gib"] < TARGET_GIB
            else "NOT met"
        ),
        f"- what it found: {ours['cluster/clusters']:.0f} clusters, "
        f"{100 * ours['cluster/outlier_fraction']:.1f}% outliers, eps {ours['cluster/eps']:.3f}, "
        f"adjusted Rand against the synthetic identities {ours['ari_vs_truth']:.3f}",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
