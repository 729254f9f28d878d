"""Feature extraction over a data loader, and evaluation of query/gallery features."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence, Sized
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reid_core.evaluation.distance import Metric, check_metric, compute_distance
from reid_core.evaluation.metrics import LabelArray, RankResult, evaluate_rank
from reid_core.evaluation.rerank import DEFAULT_RERANK_MAX_MEMORY_BYTES, re_rank_features

FeatureKind = Literal["concat", "global"]
#: One loader item: ``(images (B, C, H, W), dataset indices (B,))``; extra fields are ignored.
Batch = Sequence[Any]


def _examples(values: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def extract_features(
    model: nn.Module,
    loader: Iterable[Batch],
    device: torch.device | str,
    feature: FeatureKind = "concat",
    flip: bool = False,
    cameras: Sequence[int] | np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """Features of every sample of ``loader``, as a float32 CPU tensor in dataset order.

    ``model.extract(images, feature)`` must return (B, D) features; with ``cameras`` (the camera
    id of every dataset position) it is called as ``model.extract(images, feature, cameras=c)``
    with the batch's cameras, which a model with camera normalisation reads. ``loader`` yields
    ``(images, indices)`` with ``indices`` the positions of the images in the dataset. Row i
    of the result is the feature of dataset position i; every position 0..n-1 must be yielded
    exactly once (n = ``len(loader.dataset)`` when the loader has a dataset, else the largest
    index + 1).

    The model runs in eval mode under ``torch.inference_mode()``; its previous train/eval mode
    is restored afterwards. With ``flip``, the feature is ``normalize((f(x) + f(mirror(x))) /
    2)``, ``mirror`` flipping the width axis and ``normalize`` L2-normalising each row.
    """
    if not callable(getattr(model, "extract", None)):
        raise TypeError(f"{type(model).__name__} has no extract(images, feature) method")
    if feature not in ("concat", "global"):
        raise ValueError(f"feature must be 'concat' or 'global', got {feature!r}")
    device = torch.device(device)
    camera_of = None if cameras is None else torch.as_tensor(np.asarray(cameras), dtype=torch.long)

    def extract(images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        run = cast(Callable[..., torch.Tensor], model.extract)
        if camera_of is None:
            return run(images, feature)
        return run(images, feature, cameras=camera_of[indices])

    chunks: list[torch.Tensor] = []
    positions: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                images, indices = batch[0], batch[1]
                images = images.to(device, non_blocking=True)
                idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).cpu()
                if camera_of is not None and (idx.min() < 0 or idx.max() >= len(camera_of)):
                    raise ValueError(
                        f"{len(camera_of)} cameras given, but the loader yields dataset index "
                        f"{int(idx.max()) if idx.max() >= len(camera_of) else int(idx.min())}"
                    )
                feats = extract(images, idx).float()
                if flip:
                    mirrored = extract(images.flip(dims=[-1]), idx).float()
                    feats = F.normalize((feats + mirrored) / 2, p=2.0, dim=1)
                if idx.numel() != feats.shape[0]:
                    raise ValueError(
                        f"a batch has {feats.shape[0]} features but {idx.numel()} indices"
                    )
                chunks.append(feats.cpu())
                positions.append(idx)
    finally:
        model.train(was_training)

    if not chunks:
        raise ValueError("the loader yielded no batch: nothing to extract")
    feats_all = torch.cat(chunks)
    idx_all = torch.cat(positions).numpy()
    dataset = getattr(loader, "dataset", None)
    num = len(dataset) if isinstance(dataset, Sized) else int(idx_all.max()) + 1
    if idx_all.min() < 0 or idx_all.max() >= num:
        bad = idx_all[(idx_all < 0) | (idx_all >= num)]
        raise ValueError(f"dataset indices outside 0..{num - 1}: {_examples(bad)}")
    counts = np.bincount(idx_all, minlength=num)
    if (counts != 1).any():
        dup, missing = np.flatnonzero(counts > 1), np.flatnonzero(counts == 0)
        raise ValueError(
            f"the loader must yield every dataset index 0..{num - 1} exactly once; "
            f"{len(dup)} repeated {_examples(dup)}, {len(missing)} missing {_examples(missing)}"
        )
    out = torch.empty_like(feats_all)
    out[torch.from_numpy(idx_all)] = feats_all
    return out


def centre_per_camera(
    features: torch.Tensor | np.ndarray, cameras: torch.Tensor | np.ndarray | Sequence[int]
) -> torch.Tensor:
    """Rows L2-normalised, each camera's mean row subtracted, rows L2-normalised again.

    ``x_i <- n(n(x_i) - mean_{j: cam_j = cam_i} n(x_j))`` with ``n`` the L2 normalisation; the
    images of an unknown camera (-1) form one group. What is left is how an image differs from
    the rest of its camera's, without the camera's colour cast or viewpoint.

    Returns float32 rows of norm 1, except that an image alone in its camera (its row is its
    camera's mean; so is any row equal to its camera's mean) becomes a zero row, of cosine 0 to
    every row.
    """
    x = F.normalize(torch.as_tensor(features).float(), dim=1)
    if isinstance(cameras, torch.Tensor):
        cams = cameras.to(device=x.device, dtype=torch.long)
    else:
        cams = torch.as_tensor(np.asarray(cameras), dtype=torch.long, device=x.device)
    if cams.shape != (x.shape[0],):
        raise ValueError(f"{cams.numel()} camera ids given for {x.shape[0]} feature rows")
    groups, inverse = torch.unique(cams, return_inverse=True)
    sums = torch.zeros((len(groups), x.shape[1]), dtype=x.dtype, device=x.device)
    sums.index_add_(0, inverse, x)
    counts = torch.bincount(inverse, minlength=len(groups)).to(x.dtype)
    return F.normalize(x - (sums / counts[:, None])[inverse], dim=1)


def evaluate_features(
    qf: torch.Tensor | np.ndarray,
    gf: torch.Tensor | np.ndarray,
    q_pids: LabelArray,
    g_pids: LabelArray,
    q_camids: LabelArray,
    g_camids: LabelArray,
    metric: Metric = "cosine",
    camera_centred: bool = False,
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lam: float = 0.3,
    max_rerank_memory_bytes: int | None = DEFAULT_RERANK_MAX_MEMORY_BYTES,
    max_rank: int = 50,
) -> RankResult:
    """CMC/mAP/mINP of query features ``qf`` against gallery features ``gf``.

    Distances are :func:`compute_distance` with ``metric``; with ``rerank``, they are
    k-reciprocal re-ranked (``k1``, ``k2``, ``lam``), refused with RerankMemoryError when the
    estimate exceeds ``max_rerank_memory_bytes`` (checked before any distance is computed).
    With ``camera_centred``, each camera's mean feature over query and gallery is subtracted
    first (:func:`centre_per_camera`).
    """
    metric = check_metric(metric)
    if camera_centred:
        both = centre_per_camera(
            torch.cat([torch.as_tensor(qf), torch.as_tensor(gf)]),
            np.concatenate([np.asarray(q_camids), np.asarray(g_camids)]),
        )
        qf, gf = both[: len(qf)], both[len(qf) :]
    if rerank:
        distmat = re_rank_features(
            qf,
            gf,
            metric=metric,
            k1=k1,
            k2=k2,
            lambda_value=lam,
            max_memory_bytes=max_rerank_memory_bytes,
        )
    else:
        distmat = compute_distance(qf, gf, metric)
    return evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank)
