"""How fast a backbone learns re-ID from scratch WITH identity labels (a reference, not the method).

Trains ``ReIDModel`` (global branch only) of the config's data and model settings, with
``--backbone``/``--last-stride`` swapped in, by cross-entropy over the train identities through a
cosine classifier (scale 16) on both training views, Adam ``--lr``; after every epoch it prints
query/gallery mAP and R1 (Market protocol). The unsupervised method cannot beat what this reaches
in the same epochs, so it tells a weak backbone from a weak training signal.

    python bench/supervised_reference.py --data ../shared/data/cuhk03-pair1 --backbone resnet18
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reid_core.config import load_config  # noqa: E402
from reid_core.data import ImageRecord, read_market_layout  # noqa: E402
from reid_core.data.loaders import build_eval_loader, build_train_loader  # noqa: E402
from reid_core.data.samplers import EpochShuffleSampler  # noqa: E402
from reid_core.evaluation import evaluate_features, extract_features  # noqa: E402
from reid_core.models.reid_model import ReIDModel  # noqa: E402
from reid_core.presets import preset_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=os.environ.get("REID_BENCH_DATA"))
    p.add_argument("--config", type=Path, default=preset_path("cuhk03_cpu"))
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--last-stride", type=int, choices=[1, 2], default=1)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=3.5e-4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.data is None:
        p.error("--data (or REID_BENCH_DATA) is required")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.config)
    cfg.model.backbone, cfg.model.last_stride = args.backbone, args.last_stride
    splits = read_market_layout(args.data)
    pids = sorted({r.pid for r in splits.train})
    label_of = {pid: i for i, pid in enumerate(pids)}
    labels = torch.tensor([label_of[r.pid] for r in splits.train])
    model = ReIDModel(cfg.model, with_patch_branch=False)
    weights = torch.nn.Parameter(torch.randn(len(pids), model.global_dim) * 0.01)
    optimizer = torch.optim.Adam(
        [*model.parameters(), weights], args.lr, weight_decay=cfg.optim.weight_decay
    )
    loader = build_train_loader(splits.train, cfg.data, seed=0)
    sampler = loader.sampler
    assert isinstance(sampler, EpochShuffleSampler)

    def column(records: Sequence[ImageRecord], attr: str) -> np.ndarray:
        return np.array([getattr(r, attr) for r in records])

    def evaluate() -> dict[str, float]:
        model.eval()
        qf, gf = (
            extract_features(model, build_eval_loader(rs, cfg.data, 128), "cpu", feature="global")
            for rs in (splits.query, splits.gallery)
        )
        model.train()
        q, g = splits.query, splits.gallery
        return evaluate_features(
            qf, gf, column(q, "pid"), column(g, "pid"), column(q, "camid"), column(g, "camid")
        ).as_dict(percent=True)

    start = time.perf_counter()
    print(f"{args.backbone} (last stride {args.last_stride}), {len(pids)} identities", flush=True)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for view0, view1, index in loader:
            out = model(torch.cat([view0, view1]))
            logits = 16.0 * out.global_features @ F.normalize(weights, dim=1).T
            loss = F.cross_entropy(logits, torch.cat([labels[index], labels[index]]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        r = evaluate()
        print(
            f"epoch {epoch + 1}: loss {loss.item():.3f} mAP {r['mAP']:.2f} R1 {r['r1']:.2f} "
            f"({(time.perf_counter() - start) / 60:.1f} min)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
