"""Search a gallery of images for the people in query images, with a trained model.

:class:`GalleryIndex` holds the features of a gallery (one row per :class:`ImageRecord`) in an
exact faiss inner-product index, on GPU 0 when faiss sees a GPU, else on the CPU. The features
are the :class:`~reid_core.inference.embedder.Embedder`'s, L2-normalised, so a hit's score is the cosine
similarity ``s = q . g`` (larger = closer) and the ranking is the one ``reid eval`` uses::

    embedder = Embedder.from_file("outputs/run/model_final.pt")
    index = GalleryIndex.build(embedder, records, model_ref="outputs/run/model_final.pt")
    hits = index.search(embedder.embed_files(["query.jpg"]), k=5)  # hits[0][0].path: best

``nearest_from_other_cameras(positions, k)`` answers, for indexed images, their nearest images
seen by other cameras (the pairs a person is asked to judge). ``save(dir)`` writes
``dir/index.faiss`` and ``dir/gallery.json`` (paths, camera ids, pids, feature dimension, the
caller's model reference); ``GalleryIndex.load(dir)`` reads them back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from reid_core.atomic_write import write_atomic
from reid_core.data import UNKNOWN, EvalSet, ImageRecord
from reid_core.evaluation.search import build_index, knn_search, load_index, save_index
from reid_core.inference.embedder import Embedder

__all__ = [
    "GALLERY_FORMAT",
    "GalleryIndex",
    "ProgressCallback",
    "Rank1Result",
    "SearchHit",
    "market_rank1",
]

logger = logging.getLogger(__name__)

GALLERY_FORMAT = "reid_core.gallery/1"
INDEX_FILE = "index.faiss"
META_FILE = "gallery.json"

#: ``progress(done, total)``: called after each batch of gallery images is embedded.
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One gallery image found for a query.

    ``score`` is the cosine similarity to the query (larger = closer); ``position`` is the
    image's row in the gallery (its index in the records the gallery was built from); ``pid``
    and ``camid`` are ``-1`` when unknown.
    """

    path: str
    score: float
    camid: int
    pid: int
    position: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "score": self.score,
            "camid": self.camid,
            "pid": self.pid,
            "position": self.position,
        }


@dataclass(frozen=True)
class Rank1Result:
    """Rank-1 accuracy of a query split, Market-1501 protocol (see :func:`market_rank1`).

    ``correct[i]`` says whether query ``i``'s first valid hit has its identity (False for the
    skipped queries); ``r1`` is the mean over the valid queries, a fraction in [0, 1].
    """

    r1: float
    num_valid_queries: int
    num_skipped_queries: int
    correct: np.ndarray


def _labels(values: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.int64).reshape(-1)
    if (arr == UNKNOWN).any():
        raise ValueError(
            f"rank-1 needs every identity and camera: {int((arr == UNKNOWN).sum())} of the "
            f"{name} are unknown (-1)"
        )
    return arr


def market_rank1(
    hit_positions: np.ndarray,
    query_pids: Sequence[int] | np.ndarray,
    query_camids: Sequence[int] | np.ndarray,
    gallery_pids: Sequence[int] | np.ndarray,
    gallery_camids: Sequence[int] | np.ndarray,
) -> Rank1Result:
    """Rank-1 accuracy from ranked search results, with the Market-1501 protocol of
    :mod:`reid_core.evaluation.metrics`.

    For query ``i`` (identity ``p_i``, camera ``c_i``) the gallery items with ``pid == p_i`` and
    ``camid == c_i`` are ignored; the query is valid when some other gallery item has ``pid ==
    p_i``, and then it counts as correct when its first non-ignored hit has ``pid == p_i``.
    ``r1 = mean_{valid i} correct_i``.

    Args:
        hit_positions: (num_queries, k) gallery positions per query, best first. ``k`` must
            exceed the number of ignored items of every query (else the first valid hit may lie
            beyond the list); :meth:`GalleryIndex.rank1` picks that ``k``.
        query_pids, query_camids, gallery_pids, gallery_camids: known labels (no ``-1``).
    """
    q_pids, q_cams = _labels(query_pids, "query pids"), _labels(query_camids, "query cameras")
    g_pids = _labels(gallery_pids, "gallery pids")
    g_cams = _labels(gallery_camids, "gallery cameras")
    positions = np.asarray(hit_positions, dtype=np.int64)
    if positions.ndim != 2 or positions.shape[0] != q_pids.shape[0]:
        raise ValueError(
            f"hit_positions must be (num_queries={q_pids.shape[0]}, k), got {positions.shape}"
        )
    same_pid = q_pids[:, None] == g_pids[None, :]
    ignored_all = same_pid & (q_cams[:, None] == g_cams[None, :])
    valid = (same_pid & ~ignored_all).any(axis=1)
    needed = ignored_all.sum(axis=1) + 1
    short = valid & (needed > positions.shape[1])
    if short.any():
        i = int(np.flatnonzero(short)[0])
        raise ValueError(
            f"query {i} has {needed[i] - 1} ignored gallery items (same pid and camera) but only "
            f"{positions.shape[1]} hits: search with k >= {needed.max()}"
        )

    hit_pids, rows = g_pids[positions], np.arange(positions.shape[0])
    ignored = ignored_all[rows[:, None], positions]
    first = np.argmax(~ignored, axis=1)  # first non-ignored hit (exists for valid queries)
    correct = valid & (hit_pids[rows, first] == q_pids)
    num_valid = int(valid.sum())
    r1 = float(correct.sum() / num_valid) if num_valid else 0.0
    return Rank1Result(r1, num_valid, int((~valid).sum()), correct)


class GalleryIndex:
    """Features of gallery images in a faiss inner-product index, with the images' records.

    Build it with :meth:`build` (from an embedder and records) or :meth:`from_features`, read it
    with :meth:`load`. ``model_ref`` names the model the features come from (a checkpoint path,
    ``models:/reid/3``, ...): features of another model are not comparable, so keep it with the
    index and check it before searching with a new model's query features.
    """

    def __init__(self, index: Any, records: Sequence[ImageRecord], model_ref: str = "") -> None:
        if index.ntotal != len(records):
            raise ValueError(f"the index holds {index.ntotal} features for {len(records)} records")
        self.index = index
        self.records = list(records)
        self.model_ref = model_ref
        self._pids = np.array([r.pid for r in self.records], dtype=np.int64)
        self._camids = np.array([r.camid for r in self.records], dtype=np.int64)

    # ---- building -------------------------------------------------------------------------

    @classmethod
    def from_features(
        cls,
        features: np.ndarray | torch.Tensor,
        records: Sequence[ImageRecord],
        model_ref: str = "",
        use_gpu: bool | None = None,
    ) -> GalleryIndex:
        """An index of ``features`` (n, d), row ``i`` being the image ``records[i]``.

        ``use_gpu`` as in :func:`reid_core.evaluation.build_index` (None: a GPU when faiss sees
        one). Rows are L2-normalised by the index.
        """
        if len(features) != len(records):
            raise ValueError(f"{len(features)} feature rows for {len(records)} records")
        if len(records) == 0:
            raise ValueError("the gallery is empty: there is nothing to index")
        return cls(build_index(features, metric="cosine", use_gpu=use_gpu), records, model_ref)

    @classmethod
    def build(
        cls,
        embedder: Embedder,
        records: Sequence[ImageRecord],
        model_ref: str = "",
        batch_size: int = 64,
        num_workers: int = 0,
        progress: ProgressCallback | None = None,
        use_gpu: bool | None = None,
    ) -> GalleryIndex:
        """Embed the images of ``records`` with ``embedder`` and index their features.

        Images are read by a :class:`~torch.utils.data.DataLoader` (``num_workers`` processes);
        an unreadable image raises :class:`~reid_core.data.CorruptImageError` naming it.
        ``progress(done, total)`` is called after every batch. ``use_gpu`` as in
        :meth:`from_features`.
        """
        if not records:
            raise ValueError("the gallery is empty: there is nothing to index")
        dataset = EvalSet(records, embedder.preprocess, on_corrupt="raise")
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
        features = np.empty((len(records), embedder.feature_dim), dtype=np.float32)
        cameras = torch.tensor([r.camid for r in records])  # for camera normalisation
        done = 0
        with torch.inference_mode():
            for images, positions in loader:
                feats = embedder(images.to(embedder.device), cameras[positions])
                features[positions.numpy()] = feats.cpu().numpy()
                done += len(positions)
                if progress is not None:
                    progress(done, len(records))
        return cls.from_features(features, records, model_ref=model_ref, use_gpu=use_gpu)

    # ---- persistence ----------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss`` and ``gallery.json`` into ``directory`` (created); returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_index(self.index, directory / INDEX_FILE)
        meta = {
            "format": GALLERY_FORMAT,
            "model_ref": self.model_ref,
            "feature_dim": self.feature_dim,
            "metric": "cosine",
            "paths": [str(r.path) for r in self.records],
            "camids": self._camids.tolist(),
            "pids": self._pids.tolist(),
        }
        write_atomic(directory / META_FILE, json.dumps(meta))
        return directory

    @classmethod
    def exists(cls, directory: str | Path) -> bool:
        """Whether ``directory`` holds a saved index (both of its files)."""
        directory = Path(directory)
        return (directory / INDEX_FILE).is_file() and (directory / META_FILE).is_file()

    @classmethod
    def load(cls, directory: str | Path, use_gpu: bool | None = None) -> GalleryIndex:
        """Read an index written by :meth:`save`; ``use_gpu`` as in :meth:`from_features`."""
        directory = Path(directory)
        meta_file = directory / META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"no gallery index in {directory} ({META_FILE} is missing)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != GALLERY_FORMAT:
            raise ValueError(
                f"{meta_file} has format {meta.get('format')!r}, expected {GALLERY_FORMAT!r}"
            )
        paths, camids, pids = meta["paths"], meta["camids"], meta["pids"]
        if not len(paths) == len(camids) == len(pids):
            raise ValueError(
                f"{meta_file} is inconsistent: {len(paths)} paths, {len(camids)} camera ids, "
                f"{len(pids)} pids"
            )
        index = load_index(directory / INDEX_FILE, use_gpu=use_gpu)
        if index.d != meta["feature_dim"]:
            raise ValueError(
                f"{directory / INDEX_FILE} holds {index.d}-d features, {meta_file} says "
                f"{meta['feature_dim']}"
            )
        records = [
            ImageRecord(Path(p), pid=int(pid), camid=int(cam))
            for p, cam, pid in zip(paths, camids, pids, strict=True)
        ]
        return cls(index, records, model_ref=str(meta.get("model_ref", "")))

    # ---- search ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.records)

    @property
    def feature_dim(self) -> int:
        return int(self.index.d)

    def search(
        self, query_features: np.ndarray | torch.Tensor, k: int = 10
    ) -> list[list[SearchHit]]:
        """The ``k`` most similar gallery images of each query, best first.

        ``query_features`` is (num_queries, d), from the embedder the gallery was built with
        (rows are L2-normalised here). ``k`` larger than the gallery returns the whole gallery;
        an index on a GPU takes ``k <= 2048`` (faiss's limit).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores, positions = knn_search(self.index, query_features, min(k, len(self)))
        return [
            [self._hit(int(j), float(s)) for s, j in zip(row_scores, row_positions, strict=True)]
            for row_scores, row_positions in zip(scores, positions, strict=True)
        ]

    def nearest_from_other_cameras(
        self, positions: Sequence[int], k: int, chunk: int = 256
    ) -> list[list[SearchHit]]:
        """For each indexed image at ``positions``, its ``k`` most similar indexed images seen by
        another camera, best first (fewer when fewer exist).

        The image itself is never among them, nor another image of its camera; an unknown
        camera (``-1``) on either side counts as another camera. Scores are cosine similarities
        of the indexed features, compared ``chunk`` queries at a time against the whole gallery.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        wanted = np.asarray(positions, dtype=np.int64).reshape(-1)
        if wanted.size and not (wanted.min() >= 0 and wanted.max() < len(self)):
            raise ValueError(f"positions must be in 0..{len(self) - 1}, got {positions}")
        features = self.index.reconstruct_n(0, len(self))  # the stored rows: norm 1
        hits: list[list[SearchHit]] = []
        for start in range(0, wanted.size, chunk):
            rows = wanted[start : start + chunk]
            scores = features[rows] @ features.T
            cams = self._camids[rows, None]
            same_camera = (cams == self._camids[None, :]) & (cams != UNKNOWN)
            same_camera[np.arange(rows.size), rows] = True  # the image itself
            for row_scores, excluded in zip(scores, same_camera, strict=True):
                allowed = np.flatnonzero(~excluded)
                if allowed.size > k:
                    allowed = allowed[np.argpartition(-row_scores[allowed], k - 1)[:k]]
                best = allowed[np.argsort(-row_scores[allowed], kind="stable")]
                hits.append([self._hit(int(j), float(row_scores[j])) for j in best])
        return hits

    def _hit(self, position: int, score: float) -> SearchHit:
        return SearchHit(
            path=str(self.records[position].path),
            score=score,
            camid=int(self._camids[position]),
            pid=int(self._pids[position]),
            position=position,
        )

    def rank1(
        self, query_features: np.ndarray | torch.Tensor, query_records: Sequence[ImageRecord]
    ) -> Rank1Result:
        """Rank-1 accuracy of labelled queries against this (labelled) gallery, from searches,
        with the Market-1501 protocol (:func:`market_rank1`).

        Each query is searched deep enough to pass its ignored items (same pid and camera), so
        the result equals :func:`reid_core.evaluation.evaluate_features`'s ``r1`` on the same
        features (up to exact ties in score, which faiss may order differently).
        """
        if len(query_features) != len(query_records):
            raise ValueError(
                f"{len(query_features)} query feature rows for {len(query_records)} records"
            )
        q_pids = _labels([r.pid for r in query_records], "query pids")
        q_cams = _labels([r.camid for r in query_records], "query cameras")
        g_pids, g_cams = (
            _labels(self._pids, "gallery pids"),
            _labels(self._camids, "gallery cameras"),
        )
        ignored = (q_pids[:, None] == g_pids[None, :]) & (q_cams[:, None] == g_cams[None, :])
        k = min(len(self), int(ignored.sum(axis=1).max(initial=0)) + 1)
        _, positions = knn_search(self.index, query_features, k)
        return market_rank1(positions, q_pids, q_cams, g_pids, g_cams)
