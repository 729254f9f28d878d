"""The ``reid`` command.

reid train --config configs/smoke.yaml [--set KEY=VALUE ...]
reid eval  --checkpoint outputs/run/model_final.pt --data market_folder:/data/market [--rerank]
reid embed --checkpoint outputs/run/model_final.pt IMAGE [IMAGE ...] [--output feats.npy]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from reid_core.config import ConfigError
from reid_core.data import EvalSet, ImageRecord, build_dataset, build_test_transform
from reid_core.engine.exit_codes import ExitCode

__all__ = ["main"]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _cmd_train(args: argparse.Namespace) -> int:
    from reid_core import train

    argv = ["--config", str(args.config)] if args.config else []
    for item in args.overrides:
        argv += ["--set", item]
    return train.main(argv)


def _parse_data(spec: str) -> tuple[str, Path]:
    name, sep, root = spec.partition(":")
    if not sep or not root:
        raise ConfigError(f"--data {spec!r} must be DATASET:ROOT, e.g. market_folder:/data/market")
    return name, Path(root)


def _cmd_eval(args: argparse.Namespace) -> int:
    from reid_core.evaluation import evaluate_features, extract_features
    from reid_core.model_io import load_model

    device = _device(args.device)
    model, cfg = load_model(args.checkpoint)
    model.to(device)
    name, root = _parse_data(args.data)
    splits = build_dataset(name, root)
    if not splits.has_eval:
        raise ConfigError(f"dataset {name!r} at {root} has no query/gallery split to evaluate")
    transform = build_test_transform(cfg.data)
    feature = args.feature or cfg.eval.feature

    def features(records: list[ImageRecord]) -> torch.Tensor:
        loader = DataLoader(
            EvalSet(records, transform, on_corrupt="raise"), batch_size=args.batch_size
        )
        batches = tqdm(loader, desc=f"features ({len(records)} images)", leave=False)
        return extract_features(model, batches, device, feature=feature, flip=args.flip)

    qf, gf = features(splits.query), features(splits.gallery)
    result = evaluate_features(
        qf,
        gf,
        np.array([r.pid for r in splits.query]),
        np.array([r.pid for r in splits.gallery]),
        np.array([r.camid for r in splits.query]),
        np.array([r.camid for r in splits.gallery]),
        metric=args.distance or cfg.eval.distance,
        rerank=args.rerank,
        max_rerank_memory_bytes=int(cfg.eval.rerank_max_memory_gb * 2**30),
    )
    metrics = result.as_dict(percent=True)
    print(json.dumps({k: round(float(v), 4) for k, v in metrics.items()}))
    return int(ExitCode.OK)


def _cmd_embed(args: argparse.Namespace) -> int:
    from reid_core.evaluation import extract_features
    from reid_core.model_io import load_model

    device = _device(args.device)
    model, cfg = load_model(args.checkpoint)
    model.to(device)
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"image(s) not found: {', '.join(missing)}")
    records = [ImageRecord(Path(p)) for p in args.images]
    loader = DataLoader(
        EvalSet(records, build_test_transform(cfg.data), on_corrupt="raise"),
        batch_size=args.batch_size,
    )
    batches = tqdm(loader, desc=f"features ({len(records)} images)", leave=False)
    feats = extract_features(model, batches, device, feature=args.feature or cfg.eval.feature)
    array = feats.cpu().numpy().astype(np.float32)
    if args.output:
        np.save(args.output, array)
        print(f"wrote {array.shape[0]} x {array.shape[1]} features to {args.output}")
    else:
        for path, row in zip(args.images, array, strict=True):
            print(json.dumps({"image": path, "feature": [round(float(x), 6) for x in row]}))
    return int(ExitCode.OK)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reid", description=__doc__.split("\n")[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (same as python -m reid_core.train)")
    p.add_argument("--config", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_train)

    for name, func, help_text in (
        ("eval", _cmd_eval, "mAP/CMC of a trained model on a dataset's query/gallery"),
        ("embed", _cmd_embed, "L2-normalised features of images"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "--checkpoint", type=Path, required=True, help="model_final.pt or a checkpoint"
        )
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--feature", choices=["concat", "global"], default=None)
        p.set_defaults(func=func)
        if name == "eval":
            p.add_argument("--data", required=True, metavar="DATASET:ROOT")
            p.add_argument("--distance", choices=["cosine", "euclidean"], default=None)
            p.add_argument("--flip", action="store_true")
            p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
        else:
            p.add_argument("images", nargs="+")
            p.add_argument("--output", type=Path, help=".npy file (default: JSON lines on stdout)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.BAD_CONFIG)


if __name__ == "__main__":
    sys.exit(main())
