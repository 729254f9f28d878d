"""What only a GPU shows, in one short run: a training step of each objective with AMP, the
clustering's k-NN with faiss on the GPU against faiss on the CPU for the same features, a gallery
build whose index lives on the GPU, and images per second.

``--dry`` runs every check on the CPU with tiny sizes (what the test suite does), so the script
is known to work before a GPU session spends its minutes on it. Results go to
``bench/results/gpu_check.md`` (``--dry``: ``--output`` or a temporary file).

    bash bench/gpu_check.sh            # on a GPU machine, under 8 minutes
    bash bench/gpu_check.sh --dry      # anywhere
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reid_core.clustering.knn import _self_first, nearest_neighbours  # noqa: E402
from reid_core.config import load_config  # noqa: E402
from reid_core.data import build_splits  # noqa: E402
from reid_core.engine.exit_codes import ExitCode  # noqa: E402
from reid_core.evaluation.search import build_index, is_gpu_index, knn_search  # noqa: E402
from reid_core.inference.embedder import Embedder  # noqa: E402
from reid_core.inference.search import GalleryIndex  # noqa: E402
from reid_core.model_io import load_model  # noqa: E402
from reid_core.presets import preset_path  # noqa: E402
from reid_core.train import run  # noqa: E402

OBJECTIVES = {
    "instance_memory (the paper)": [],
    "cluster_contrast + camera proxies": [
        "loss.objective=cluster_contrast",
        "loss.camera.enabled=true",
        "loss.camera.inter_from_epoch=0",
        "cluster.eps=auto",
        "cluster.min_samples=2",
        "cluster.instances_per_cluster=4",
    ],
}


def train_check(name: str, extra: list[str], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    size = ["data.height=96", "data.width=48", "model.backbone=resnet18"] if args.dry else []
    overrides = [
        "data.dataset=synthetic",
        f"data.root={args.work / 'synthetic'}",
        f"data.synthetic_identities={8 if args.dry else 64}",
        "data.synthetic_images_per_identity=8",
        f"data.batch_size={16 if args.dry else 64}",
        "data.num_workers=0" if args.dry else "data.num_workers=4",
        "model.pretrained=none",
        f"runtime.device={'cpu' if args.dry else 'cuda'}",
        "runtime.amp=true",
        "runtime.progress_bar=false",
        f"runtime.output_dir={out}",
        "schedule.epochs=1",
        f"schedule.max_steps_per_epoch={2 if args.dry else 30}",
        "eval.every_n_epochs=1",
        "checkpoint.resume=none",
        *size,
        *extra,
    ]
    cfg = load_config(preset_path("market1501"), overrides)
    start = time.perf_counter()
    code = run(cfg)
    if code != ExitCode.OK:
        raise SystemExit(f"{name}: training exited with {code!r}; see {out}/train.log")
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "images_per_second": record["images_per_second"],
        "seconds": time.perf_counter() - start,
        "losses": {k: round(v, 4) for k, v in record.items() if k.startswith("loss/")},
        "mAP": record.get("eval/mAP"),
    }


def knn_check(args: argparse.Namespace) -> dict[str, Any]:
    n, dim, k = (2000, 128, 31) if args.dry else (32_621, 2048, 31)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t = time.perf_counter()
    # the clustering's search: neighbours and farthest rows, on the GPU when faiss sees one
    # (CPU fallback, warned)
    found = nearest_neighbours(torch.from_numpy(x), k, "faiss")
    assert found is not None
    gpu = found.ids
    gpu_s = time.perf_counter() - t
    t = time.perf_counter()
    cpu_index = build_index(x, "cosine", use_gpu=False)
    _, ids = knn_search(cpu_index, x, k)
    knn_search(cpu_index, -x, 1)
    cpu = _self_first(ids)
    cpu_s = time.perf_counter() - t
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(gpu, cpu, strict=True)])
    return {"images": n, "dim": dim, "default_s": gpu_s, "cpu_s": cpu_s, "overlap": float(overlap)}


def gallery_check(model_file: Path) -> dict[str, Any]:
    model, cfg = load_model(model_file)
    embedder = Embedder.from_config(model, cfg)
    records = build_splits(cfg.data).gallery
    t = time.perf_counter()
    gallery = GalleryIndex.build(embedder, records, use_gpu=None)
    return {
        "images": len(records),
        "seconds": time.perf_counter() - t,
        "index_on_gpu": bool(is_gpu_index(gallery.index)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry", action="store_true", help="everything on the CPU, tiny sizes")
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "gpu_check")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible: run with --dry, or on a GPU machine")
    output = args.output or (
        args.work / "gpu_check.md" if args.dry else ROOT / "bench" / "results" / "gpu_check.md"
    )
    device = "CPU (dry run)" if args.dry else torch.cuda.get_device_name(0)
    lines = [f"# GPU check (`bench/gpu_check.sh{' --dry' if args.dry else ''}`)", "", device, ""]
    lines += ["| check | result |", "|---|---|"]
    last_model = None
    for i, (name, extra) in enumerate(OBJECTIVES.items()):
        out = args.work / f"train{i}"
        r = train_check(name, extra, args, out)
        last_model = out / "model_final.pt"
        lines.append(
            f"| training step, {name}, AMP | {r['images_per_second']:.1f} img/s, losses {r['losses']} |"
        )
    k = knn_check(args)
    lines.append(
        f"| clustering k-NN, {k['images']} x {k['dim']}: default index vs faiss CPU | "
        f"{k['default_s']:.2f} s vs {k['cpu_s']:.2f} s, neighbour overlap {k['overlap']:.4f} |"
    )
    assert last_model is not None
    g = gallery_check(last_model)
    lines.append(
        f"| gallery build, {g['images']} images | {g['seconds']:.1f} s, index on the GPU: "
        f"{g['index_on_gpu']} |"
    )
    text = "\n".join(lines) + "\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
