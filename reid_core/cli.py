"""The ``reid`` command.

reid train --preset smoke | --config FILE.yaml [--set KEY=VALUE ...]
reid eval  --checkpoint outputs/run/model_final.pt --data market_folder:/data/market [--rerank]
           [--camera-centred | --no-camera-centred]
reid embed --checkpoint outputs/run/model_final.pt IMAGE [IMAGE ...] [--output feats.npy]
reid export --checkpoint outputs/run/model_final.pt --output model.onnx
reid search --checkpoint outputs/run/model_final.pt --gallery FOLDER|DATASET:ROOT [--index-dir D] QUERY...
"""

from __future__ import annotations

import argparse
import hashlib
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
from reid_core.inference.embedder import Embedder
from reid_core.inference.export import DEFAULT_OPSET

__all__ = ["main"]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _cmd_train(args: argparse.Namespace) -> int:
    from reid_core import train

    argv = ["--config", str(args.config)] if args.config else []
    if args.preset:
        argv += ["--preset", args.preset]
    for item in args.overrides:
        argv += ["--set", item]
    return train.main(argv)


def _parse_data(spec: str, option: str = "--data") -> tuple[str, Path]:
    name, sep, root = spec.partition(":")
    if not sep or not root:
        raise ConfigError(
            f"{option} {spec!r} must be DATASET:ROOT, e.g. market_folder:/data/market"
        )
    return name, Path(root)


def _embedder(args: argparse.Namespace, device: torch.device) -> Embedder:
    return Embedder.from_file(args.checkpoint, feature=args.feature, flip=args.flip).to(device)


def _check_images(paths: Sequence[str]) -> None:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"image(s) not found: {', '.join(missing)}")


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
        cameras = [r.camid for r in records]
        return extract_features(
            model, batches, device, feature=feature, flip=args.flip, cameras=cameras
        )

    qf, gf = features(splits.query), features(splits.gallery)
    result = evaluate_features(
        qf,
        gf,
        np.array([r.pid for r in splits.query]),
        np.array([r.pid for r in splits.gallery]),
        np.array([r.camid for r in splits.query]),
        np.array([r.camid for r in splits.gallery]),
        metric=args.distance or cfg.eval.distance,
        camera_centred=(
            cfg.eval.camera_centred if args.camera_centred is None else args.camera_centred
        ),
        rerank=args.rerank,
        max_rerank_memory_bytes=int(cfg.eval.rerank_max_memory_gb * 2**30),
    )
    metrics = result.as_dict(percent=True)
    print(json.dumps({k: round(float(v), 4) for k, v in metrics.items()}))
    return int(ExitCode.OK)


def _cmd_embed(args: argparse.Namespace) -> int:
    embedder = _embedder(args, _device(args.device))
    _check_images(args.images)
    paths = tqdm(args.images, desc="features", unit="image", leave=False)
    array = embedder.embed_files(
        paths, batch_size=args.batch_size, cameras=_cameras(args, len(args.images))
    )
    if args.output:
        np.save(args.output, array)
        print(f"wrote {array.shape[0]} x {array.shape[1]} features to {args.output}")
    else:
        for path, row in zip(args.images, array, strict=True):
            print(json.dumps({"image": path, "feature": [round(float(x), 6) for x in row]}))
    return int(ExitCode.OK)


def _cameras(args: argparse.Namespace, count: int) -> list[int] | None:
    """``--camera``, once per image, or ``None`` when not given."""
    return None if args.camera is None else [args.camera] * count


def _camera_option(p: argparse.ArgumentParser, images: str) -> None:
    p.add_argument(
        "--camera",
        type=int,
        metavar="ID",
        help=f"the camera id of the {images} (as the training data numbers its cameras): a model "
        "trained with model.camera_norm normalises them with that camera's statistics, the "
        "pooled ones without it",
    )


def _cmd_export(args: argparse.Namespace) -> int:
    from reid_core.inference.export import OnnxMismatchError, check_onnx, export_onnx

    embedder = _embedder(args, torch.device("cpu"))
    path = export_onnx(embedder, args.output, opset=args.opset)
    try:
        diff = check_onnx(embedder, path, tolerance=args.tolerance)
    except OnnxMismatchError as exc:
        print(f"error: {exc} (the model is kept at {path} for inspection)", file=sys.stderr)
        return int(ExitCode.CRASHED)
    height, width = embedder.input_size
    summary = {
        "onnx": str(path),
        "opset": args.opset,
        "input": ["N", 3, height, width],
        "feature_dim": embedder.feature_dim,
        "max_abs_diff": diff,
    }
    print(json.dumps(summary))
    return int(ExitCode.OK)


def _gallery_records(spec: str) -> list[ImageRecord]:
    """A folder of images (all of them), or ``DATASET:ROOT`` (its gallery split, or every image
    of a dataset without one)."""
    if Path(spec).is_dir():
        return build_dataset("image_folder", Path(spec)).train
    name, root = _parse_data(spec, "--gallery")
    splits = build_dataset(name, root)
    return splits.gallery if splits.has_eval else splits.train


def _model_ref(checkpoint: Path, embedder: Embedder) -> str:
    """Names the features an index holds: the checkpoint (its content: a moved file still
    matches), the feature kind and flip."""
    digest = hashlib.sha256()
    with checkpoint.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return (
        f"{checkpoint.name} sha256:{digest.hexdigest()[:16]} "
        f"feature={embedder.feature} flip={str(embedder.flip).lower()}"
    )


def _cmd_search(args: argparse.Namespace) -> int:
    from reid_core.inference.search import GalleryIndex

    if args.k < 1:
        raise ConfigError(f"-k must be >= 1, got {args.k}")
    embedder = _embedder(args, _device(args.device))
    _check_images(args.queries)
    model_ref = _model_ref(args.checkpoint, embedder)
    records = _gallery_records(args.gallery)
    if args.index_dir is not None and GalleryIndex.exists(args.index_dir):
        index = GalleryIndex.load(args.index_dir)
        if index.model_ref != model_ref:
            raise ConfigError(
                f"the index in {args.index_dir} holds features of {index.model_ref!r}, not of "
                f"{model_ref!r}: use another --index-dir or delete this one"
            )
        if [r.path for r in index.records] != [r.path for r in records]:
            raise ConfigError(
                f"the index in {args.index_dir} was built from another gallery ({len(index)} "
                f"images; {args.gallery} has {len(records)}): use another --index-dir or "
                "delete this one"
            )
        print(f"loaded the index of {len(index)} images from {args.index_dir}", file=sys.stderr)
    else:
        with tqdm(total=len(records), desc="gallery", unit="image", leave=False) as bar:

            def progress(done: int, total: int) -> None:
                bar.update(done - bar.n)

            index = GalleryIndex.build(
                embedder,
                records,
                model_ref=model_ref,
                batch_size=args.batch_size,
                progress=progress,
            )
        if args.index_dir is not None:
            index.save(args.index_dir)
            print(f"saved the index of {len(index)} images to {args.index_dir}", file=sys.stderr)

    features = embedder.embed_files(
        args.queries, batch_size=args.batch_size, cameras=_cameras(args, len(args.queries))
    )
    for query, hits in zip(args.queries, index.search(features, k=args.k), strict=True):
        rows = [{**hit.as_dict(), "score": round(hit.score, 6)} for hit in hits]
        print(json.dumps({"query": query, "hits": rows}))
    return int(ExitCode.OK)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reid", description=__doc__.split("\n")[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (same as python -m reid_core.train)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="a YAML config file")
    source.add_argument("--preset", help="a shipped config by name (reid_core/presets/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_train)

    def model_options(p: argparse.ArgumentParser, device: bool = True) -> None:
        p.add_argument(
            "--checkpoint", type=Path, required=True, help="model_final.pt or a checkpoint"
        )
        if device:
            p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
            p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--feature", choices=["concat", "global"], default=None)
        p.add_argument("--flip", action="store_true", help="average with the mirror image")

    p = sub.add_parser("eval", help="mAP/CMC of a trained model on a dataset's query/gallery")
    model_options(p)
    p.add_argument("--data", required=True, metavar="DATASET:ROOT")
    p.add_argument("--distance", choices=["cosine", "euclidean"], default=None)
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
    p.add_argument(
        "--camera-centred",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="remove each camera's mean feature (query + gallery) before the distances "
        "(default: the model's eval.camera_centred)",
    )
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("embed", help="L2-normalised features of images (rows of norm 1)")
    model_options(p)
    p.add_argument("images", nargs="+")
    p.add_argument("--output", type=Path, help=".npy file (default: JSON lines on stdout)")
    _camera_option(p, "images")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser(
        "export", help="the model as ONNX (images in [0, 1] -> unit features), checked with ORT"
    )
    model_options(p, device=False)
    p.add_argument("--output", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest |ONNX - PyTorch| accepted"
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("search", help="the gallery images most similar to query images (JSON)")
    model_options(p)
    p.add_argument(
        "--gallery",
        required=True,
        metavar="FOLDER|DATASET:ROOT",
        help="a folder of images, or a dataset (its gallery split when it has one)",
    )
    p.add_argument(
        "--index-dir",
        type=Path,
        help="reuse the gallery index saved here, or save it here after building it",
    )
    p.add_argument("-k", type=int, default=10, help="hits per query")
    p.add_argument("queries", nargs="+", metavar="QUERY_IMAGE")
    _camera_option(p, "query images")
    p.set_defaults(func=_cmd_search)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.BAD_CONFIG)


if __name__ == "__main__":
    sys.exit(main())
