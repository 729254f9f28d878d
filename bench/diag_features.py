"""How well a feature retrieves the same person, against hidden labels (analysis only).

For the features of a trained model (``model_final.pt`` or a checkpoint), of the same
architecture untrained (``init``: the run's config, seed 0) or of colour histograms (``hsv``:
:func:`reid_core.data.colour.stripe_colour_histograms`, 4 stripes), on a Market-layout folder it
prints:

* on the train split, :func:`diag_memory.neighbour_stats`: ``p@1`` / ``p@10`` (share of the
  nearest other images with the same identity) and ``xcam p@10`` (among the other cameras'
  images only), and the mean pairwise cosine ``cos``;
* on query/gallery, mAP / R1 / R10 (Market protocol), plain and with each camera's mean feature
  (over query + gallery) subtracted before the cosine ("camera-centred"), which removes what a
  feature says about the camera alone.

Same-camera neighbours of the train split are mostly adjacent frames of one walk past the
camera: a feature that cannot find them has not learnt appearance; cross-camera ones are what
re-ID is evaluated on.

    python bench/diag_features.py --data ../shared/data/cuhk03-pair1 hsv
    python bench/diag_features.py --data ../shared/data/cuhk03-pair1 outputs/run/model_final.pt
    python bench/diag_features.py --data ... init --config reid_core/presets/cuhk03_cpu.yaml
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from diag_memory import neighbour_stats  # noqa: E402

from reid_core.config import load_config  # noqa: E402
from reid_core.data import ImageRecord, read_market_layout  # noqa: E402
from reid_core.data.colour import stripe_colour_histograms  # noqa: E402
from reid_core.data.loaders import build_eval_loader  # noqa: E402
from reid_core.evaluation import evaluate_features, extract_features  # noqa: E402
from reid_core.presets import preset_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("features", help="hsv | init | a model file (model_final.pt or a checkpoint)")
    p.add_argument("--data", type=Path, default=os.environ.get("REID_BENCH_DATA"))
    p.add_argument("--config", type=Path, default=preset_path("cuhk03_cpu"))
    p.add_argument("--feature", choices=["global", "concat"], default="global")
    args = p.parse_args(argv)
    if args.data is None:
        p.error("--data (or REID_BENCH_DATA) is required")
    splits = read_market_layout(args.data)

    if args.features == "hsv":

        def features(records: list[ImageRecord]) -> torch.Tensor:
            return stripe_colour_histograms([r.path for r in records], stripes=4)

    else:
        from reid_core.model_io import load_model
        from reid_core.models import ReIDModel

        if args.features == "init":
            cfg = load_config(args.config)
            torch.manual_seed(0)
            model = ReIDModel(cfg.model, with_patch_branch=True)
        else:
            model, cfg = load_model(args.features)

        def features(records: list[ImageRecord]) -> torch.Tensor:
            loader = build_eval_loader(records, cfg.data, 128)
            cameras = [r.camid for r in records]  # read by a model with camera normalisation
            return extract_features(model, loader, "cpu", feature=args.feature, cameras=cameras)

    train = splits.train
    stats = neighbour_stats(
        features(train),
        torch.tensor([r.pid for r in train]),
        torch.tensor([r.camid for r in train]),
    )
    print(f"{args.features}: train split " + ", ".join(f"{k}={v:.3f}" for k, v in stats.items()))
    qf, gf = features(splits.query), features(splits.gallery)

    def column(records: list[ImageRecord], attr: str) -> np.ndarray:
        return np.array([getattr(r, attr) for r in records])

    q_pids, g_pids = column(splits.query, "pid"), column(splits.gallery, "pid")
    q_cams, g_cams = column(splits.query, "camid"), column(splits.gallery, "camid")
    for name, centred in {"plain": False, "camera-centred": True}.items():
        r = evaluate_features(
            qf, gf, q_pids, g_pids, q_cams, g_cams, camera_centred=centred
        ).as_dict(percent=True)
        print(
            f"{args.features}: query/gallery {name}: mAP {r['mAP']:.2f} R1 {r['r1']:.2f} R10 {r['r10']:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
