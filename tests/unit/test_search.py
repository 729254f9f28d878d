"""GalleryIndex on given features: search order and scores, persistence, Market-protocol rank-1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reid_core.data import ImageRecord
from reid_core.evaluation import evaluate_features
from reid_core.inference.search import GalleryIndex, SearchHit, market_rank1

pytest.importorskip("faiss", reason="faiss is not installed (the `cpu` or `gpu` extra)")


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def labelled_set(
    num: int, num_pids: int, num_cams: int, centres: np.ndarray, noise: float, seed: int
) -> tuple[np.ndarray, list[ImageRecord]]:
    """Features scattered around their identity's centre, with random identities and cameras."""
    rng = np.random.default_rng(seed)
    pids = rng.integers(1, num_pids + 1, num)
    cams = rng.integers(0, num_cams, num)
    feats = unit_rows(centres[pids] + noise * rng.standard_normal((num, centres.shape[1])))
    records = [
        ImageRecord(Path(f"/g/{seed}_{i:04d}.jpg"), pid=int(p), camid=int(c))
        for i, (p, c) in enumerate(zip(pids, cams, strict=True))
    ]
    return feats, records


@pytest.fixture
def gallery() -> tuple[np.ndarray, list[ImageRecord]]:
    centres = np.random.default_rng(0).standard_normal((11, 16))
    return labelled_set(60, num_pids=10, num_cams=3, centres=centres, noise=0.8, seed=1)


def test_search_ranks_by_cosine_similarity(gallery: tuple[np.ndarray, list[ImageRecord]]) -> None:
    feats, records = gallery
    index = GalleryIndex.from_features(feats, records, model_ref="m", use_gpu=False)
    # queries of any norm: the index L2-normalises them
    queries = 3.0 * np.random.default_rng(2).standard_normal((4, feats.shape[1]))
    hits = index.search(queries, k=7)

    similarities = unit_rows(queries) @ feats.T
    assert len(hits) == 4
    for row, query_hits in zip(similarities, hits, strict=True):
        expected = np.argsort(-row, kind="stable")[:7]
        assert [h.position for h in query_hits] == expected.tolist()
        np.testing.assert_allclose([h.score for h in query_hits], row[expected], atol=1e-5)
        for hit in query_hits:
            assert hit == SearchHit(
                path=str(records[hit.position].path),
                score=hit.score,
                camid=records[hit.position].camid,
                pid=records[hit.position].pid,
                position=hit.position,
            )


def test_search_k_beyond_the_gallery_returns_all_of_it(
    gallery: tuple[np.ndarray, list[ImageRecord]],
) -> None:
    feats, records = gallery
    index = GalleryIndex.from_features(feats[:5], records[:5], use_gpu=False)
    (hits,) = index.search(feats[:1], k=50)
    assert sorted(h.position for h in hits) == [0, 1, 2, 3, 4]
    assert hits[0].position == 0 and hits[0].score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        index.search(feats[:1], k=0)
    with pytest.raises(ValueError, match="dimension 3, the index holds 16"):
        index.search(np.ones((1, 3), dtype=np.float32), k=1)


def test_nearest_from_other_cameras_skips_the_image_and_its_camera(
    gallery: tuple[np.ndarray, list[ImageRecord]],
) -> None:
    feats, records = gallery
    index = GalleryIndex.from_features(feats, records, use_gpu=False)
    cams = np.array([r.camid for r in records])
    similarities = feats @ feats.T
    positions = [0, 7, 59, 7]
    found = index.nearest_from_other_cameras(positions, k=5, chunk=3)  # two chunks
    assert len(found) == 4
    for position, hits in zip(positions, found, strict=True):
        others = np.flatnonzero(cams != cams[position])
        expected = others[np.argsort(-similarities[position, others], kind="stable")[:5]]
        assert [h.position for h in hits] == expected.tolist()
        np.testing.assert_allclose(
            [h.score for h in hits], similarities[position, expected], atol=1e-5
        )
        best = records[int(expected[0])]
        assert (hits[0].path, hits[0].pid, hits[0].camid) == (str(best.path), best.pid, best.camid)


def test_nearest_from_other_cameras_with_unknown_cameras_and_few_images() -> None:
    """Cameras 0, 0, 1, unknown: image 0 may be paired with 2 and 3, never with 1."""
    feats = unit_rows(np.array([[1, 0], [1, 0.1], [0, 1], [1, 1]], dtype=np.float32))
    records = [
        ImageRecord(Path(f"/g/{i}.jpg"), pid=-1, camid=c) for i, c in enumerate([0, 0, 1, -1])
    ]
    index = GalleryIndex.from_features(feats, records, use_gpu=False)
    first, unknown = index.nearest_from_other_cameras([0, 3], k=5)
    assert [h.position for h in first] == [3, 2]  # fewer than k: all there are
    assert [h.position for h in unknown] == [1, 0, 2]  # an unknown camera is nobody's
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        index.nearest_from_other_cameras([0], k=0)
    with pytest.raises(ValueError, match="positions must be in 0..3"):
        index.nearest_from_other_cameras([4], k=1)


def test_save_then_load_gives_the_same_index(
    gallery: tuple[np.ndarray, list[ImageRecord]], tmp_path: Path
) -> None:
    feats, records = gallery
    index = GalleryIndex.from_features(feats, records, model_ref="models:/reid/3", use_gpu=False)
    index.save(tmp_path / "idx")

    meta = json.loads((tmp_path / "idx" / "gallery.json").read_text())
    assert meta["model_ref"] == "models:/reid/3"
    assert meta["feature_dim"] == 16
    assert meta["paths"] == [str(r.path) for r in records]
    assert meta["camids"] == [r.camid for r in records]
    assert meta["pids"] == [r.pid for r in records]
    assert GalleryIndex.exists(tmp_path / "idx") and not GalleryIndex.exists(tmp_path)

    loaded = GalleryIndex.load(tmp_path / "idx", use_gpu=False)
    assert loaded.model_ref == "models:/reid/3"
    assert loaded.records == records
    assert (len(loaded), loaded.feature_dim) == (60, 16)
    assert loaded.search(feats[:3], k=5) == index.search(feats[:3], k=5)


def test_load_refuses_a_missing_or_inconsistent_index(
    gallery: tuple[np.ndarray, list[ImageRecord]], tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError, match="gallery.json is missing"):
        GalleryIndex.load(tmp_path)
    feats, records = gallery
    GalleryIndex.from_features(feats, records, use_gpu=False).save(tmp_path)
    meta_file = tmp_path / "gallery.json"
    meta = json.loads(meta_file.read_text())

    meta_file.write_text(json.dumps({**meta, "feature_dim": 32}))
    with pytest.raises(ValueError, match="holds 16-d features, .* says 32"):
        GalleryIndex.load(tmp_path, use_gpu=False)
    meta_file.write_text(json.dumps({**meta, "pids": meta["pids"][:-1]}))
    with pytest.raises(ValueError, match="60 paths, 60 camera ids, 59 pids"):
        GalleryIndex.load(tmp_path, use_gpu=False)
    meta_file.write_text(json.dumps({**meta, "format": "other/1"}))
    with pytest.raises(ValueError, match="has format 'other/1'"):
        GalleryIndex.load(tmp_path, use_gpu=False)


def test_from_features_refuses_mismatched_rows(
    gallery: tuple[np.ndarray, list[ImageRecord]],
) -> None:
    feats, records = gallery
    with pytest.raises(ValueError, match="60 feature rows for 59 records"):
        GalleryIndex.from_features(feats, records[:-1], use_gpu=False)
    with pytest.raises(ValueError, match="the gallery is empty"):
        GalleryIndex.from_features(feats[:0], [], use_gpu=False)


def test_market_rank1_ignores_same_identity_same_camera() -> None:
    """Query pid 1 camera 0; gallery: 0 = (1, cam 0), 1 = (2, cam 1), 2 = (1, cam 1)."""
    g_pids, g_cams = [1, 2, 1], [0, 1, 1]
    # the same-camera match at the top is ignored: the first valid hit decides
    wrong = market_rank1(np.array([[0, 1, 2]]), [1], [0], g_pids, g_cams)
    right = market_rank1(np.array([[0, 2, 1]]), [1], [0], g_pids, g_cams)
    assert (wrong.r1, wrong.correct.tolist()) == (0.0, [False])
    assert (right.r1, right.correct.tolist()) == (1.0, [True])
    # pid 2 seen by camera 1 only: no valid match, the query is skipped
    skipped = market_rank1(np.array([[1, 0, 2], [0, 2, 1]]), [2, 1], [1, 0], g_pids, g_cams)
    assert (skipped.num_valid_queries, skipped.num_skipped_queries) == (1, 1)
    assert skipped.r1 == 1.0 and skipped.correct.tolist() == [False, True]
    # one hit cannot get past the ignored item at the top
    with pytest.raises(ValueError, match="search with k >= 2"):
        market_rank1(np.array([[0]]), [1], [0], g_pids, g_cams)


def test_rank1_from_search_equals_evaluate_features() -> None:
    """Same features, same protocol: the index's rank-1 is the evaluation's."""
    centres = np.random.default_rng(0).standard_normal((23, 32))
    gf, g_records = labelled_set(300, num_pids=20, num_cams=4, centres=centres, noise=1.5, seed=1)
    # identities 21 and 22 are not in the gallery: their queries are skipped
    qf, q_records = labelled_set(80, num_pids=22, num_cams=4, centres=centres, noise=1.5, seed=2)
    index = GalleryIndex.from_features(gf, g_records, use_gpu=False)

    ours = index.rank1(qf, q_records)
    reference = evaluate_features(
        qf,
        gf,
        np.array([r.pid for r in q_records]),
        np.array([r.pid for r in g_records]),
        np.array([r.camid for r in q_records]),
        np.array([r.camid for r in g_records]),
    )
    assert 0.2 < ours.r1 < 0.9, "a test set where rank-1 is neither trivial nor hopeless"
    assert ours.num_skipped_queries > 0
    assert ours.r1 == pytest.approx(reference.r1, abs=1e-12)
    assert ours.num_valid_queries == reference.num_valid_queries
    assert ours.num_skipped_queries == reference.num_skipped_queries


def test_rank1_needs_known_identities(gallery: tuple[np.ndarray, list[ImageRecord]]) -> None:
    feats, records = gallery
    index = GalleryIndex.from_features(feats, records, use_gpu=False)
    unknown = [ImageRecord(Path("/q.jpg"))]
    with pytest.raises(ValueError, match="1 of the query pids are unknown"):
        index.rank1(feats[:1], unknown)
