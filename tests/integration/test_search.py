"""Gallery search on the tiny synthetic data: the index agrees with ``reid eval``; ``reid search``.

The model is a random-weight ResNet-18: its features tell the synthetic people apart well enough
for distinct rankings (the tiny trained MobileNet's features are nearly all equal, so its rankings
are decided by ties, which faiss and a stable sort break differently).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from reid_core.cli import main
from reid_core.data import EvalSet, ImageRecord, ReIDSplits, build_test_transform
from reid_core.data.datasets import Synthetic
from reid_core.engine.exit_codes import ExitCode
from reid_core.evaluation import compute_distance, evaluate_features, extract_features
from reid_core.inference.embedder import Embedder
from reid_core.inference.search import GalleryIndex
from reid_core.model_io import load_model, save_model
from reid_core.models import ReIDModel
from tests.integration.conftest import IDENTITIES, IMAGES_PER_IDENTITY, tiny_config

pytest.importorskip("faiss", reason="faiss is not installed (the `cpu` or `gpu` extra)")


@pytest.fixture(scope="module")
def model_final(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> Path:
    """A random-weight ResNet-18 (seeded) saved like a trained model."""
    folder = tmp_path_factory.mktemp("random-model")
    cfg = tiny_config(folder, synthetic_root, "model.backbone=resnet18")
    torch.manual_seed(0)
    return save_model(ReIDModel(cfg.model), cfg, folder / "model_final.pt")


@pytest.fixture(scope="module")
def synthetic(synthetic_root: Path) -> Synthetic:
    """The data set the tiny run was trained and evaluated on."""
    return Synthetic(
        synthetic_root, num_identities=IDENTITIES, images_per_identity=IMAGES_PER_IDENTITY
    )


@pytest.fixture(scope="module")
def splits(synthetic: Synthetic) -> ReIDSplits:
    return synthetic.load()


def test_build_embeds_every_gallery_image_in_order_and_reports_progress(
    model_final: Path, splits: ReIDSplits
) -> None:
    embedder = Embedder.from_file(model_final)
    calls: list[tuple[int, int]] = []
    index = GalleryIndex.build(
        embedder,
        splits.gallery,
        model_ref="tiny",
        batch_size=5,
        progress=lambda done, total: calls.append((done, total)),
    )
    n = len(splits.gallery)
    assert n % 5 != 0, "a partial last batch is part of the test"
    assert calls == [(min(done, n), n) for done in range(5, n + 5, 5)]
    stored = index.index.reconstruct_n(0, n)
    expected = embedder.embed_files([r.path for r in splits.gallery])
    np.testing.assert_allclose(stored, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)
    assert index.records == splits.gallery and index.model_ref == "tiny"


def test_rank1_from_search_equals_reid_eval(
    model_final: Path,
    splits: ReIDSplits,
    synthetic: Synthetic,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Same model, same query/gallery: rank-1 from the index's searches is the rank-1 of
    ``evaluate_features`` on ``reid eval``'s features, and of ``reid eval`` itself."""
    embedder = Embedder.from_file(model_final)
    index = GalleryIndex.build(embedder, splits.gallery)
    qf = embedder.embed_files([r.path for r in splits.query])
    ours = index.rank1(qf, splits.query)

    # reid eval's way: the test transform and model.extract, not the embedder
    model, cfg = load_model(model_final)

    def features(records: list[ImageRecord]) -> torch.Tensor:
        loader = DataLoader(EvalSet(records, build_test_transform(cfg.data)), batch_size=16)
        return extract_features(model, loader, "cpu")

    ref_qf, ref_gf = features(splits.query), features(splits.gallery)
    q_pids, g_pids = (np.array([r.pid for r in rs]) for rs in (splits.query, splits.gallery))
    q_cams, g_cams = (np.array([r.camid for r in rs]) for rs in (splits.query, splits.gallery))
    reference = evaluate_features(ref_qf, ref_gf, q_pids, g_pids, q_cams, g_cams)
    assert ours.num_valid_queries == reference.num_valid_queries > 0
    assert 0.0 < ours.r1 < 1.0, "the rankings decide rank-1: neither all right nor all wrong"
    assert ours.r1 == pytest.approx(reference.r1, abs=1e-12)

    # query by query: correct exactly when the nearest valid gallery item shares the identity
    dist = np.asarray(compute_distance(ref_qf, ref_gf, "cosine"), dtype=np.float64)
    dist[(q_pids[:, None] == g_pids) & (q_cams[:, None] == g_cams)] = np.inf
    nearest = dist.argmin(axis=1)
    has_match = ((q_pids[:, None] == g_pids) & np.isfinite(dist)).any(axis=1)
    np.testing.assert_array_equal(ours.correct, has_match & (g_pids[nearest] == q_pids))

    argv = ["eval", "--checkpoint", str(model_final), "--device", "cpu"]
    assert main([*argv, "--data", f"market_folder:{synthetic.folder()}"]) == ExitCode.OK
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["r1"] == pytest.approx(100 * ours.r1, abs=1e-3)


# ---- reid search ----------------------------------------------------------------------------


def _hits(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_search_cli_builds_the_index_then_reuses_it(
    model_final: Path,
    splits: ReIDSplits,
    synthetic: Synthetic,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    queries = [str(r.path) for r in splits.query[:2]]
    argv = ["search", "--checkpoint", str(model_final), "--device", "cpu", "-k", "3"]
    argv += ["--gallery", f"market_folder:{synthetic.folder()}", "--index-dir", str(tmp_path)]
    assert main([*argv, *queries]) == ExitCode.OK
    built = capsys.readouterr()
    assert "saved the index of 16 images" in built.err
    assert GalleryIndex.exists(tmp_path)

    rows = _hits(built.out)
    assert [row["query"] for row in rows] == queries
    embedder = Embedder.from_file(model_final)
    expected = GalleryIndex.build(embedder, splits.gallery).search(
        embedder.embed_files(queries), k=3
    )
    for row, hits in zip(rows, expected, strict=True):
        assert [h["position"] for h in row["hits"]] == [h.position for h in hits]
        assert [h["path"] for h in row["hits"]] == [h.path for h in hits]
        assert [(h["pid"], h["camid"]) for h in row["hits"]] == [(h.pid, h.camid) for h in hits]
        np.testing.assert_allclose(
            [h["score"] for h in row["hits"]], [h.score for h in hits], atol=1e-5
        )

    assert main([*argv, *queries]) == ExitCode.OK
    reused = capsys.readouterr()
    assert f"loaded the index of 16 images from {tmp_path}" in reused.err
    assert reused.out == built.out


def test_search_cli_on_a_plain_folder_returns_the_whole_gallery_for_a_large_k(
    model_final: Path, synthetic: Synthetic, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = synthetic.folder() / "bounding_box_test"
    query = sorted((synthetic.folder() / "query").glob("*.jpg"))[0]
    argv = ["search", "--checkpoint", str(model_final), "--device", "cpu", "-k", "100"]
    assert main([*argv, "--gallery", str(folder), str(query)]) == ExitCode.OK
    (row,) = _hits(capsys.readouterr().out)
    gallery = sorted(str(p) for p in folder.glob("*.jpg"))
    assert sorted(h["path"] for h in row["hits"]) == gallery
    scores = [h["score"] for h in row["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert {h["pid"] for h in row["hits"]} == {-1}  # a plain folder has no identities
    assert all(h["camid"] >= 0 for h in row["hits"])  # cameras from the c<N> in the names


def test_search_cli_refuses_an_index_of_another_model_or_gallery(
    model_final: Path,
    synthetic: Synthetic,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    query = str(sorted((synthetic.folder() / "query").glob("*.jpg"))[0])
    argv = ["search", "--checkpoint", str(model_final), "--device", "cpu"]
    argv += ["--index-dir", str(tmp_path)]
    gallery = ["--gallery", f"market_folder:{synthetic.folder()}"]
    assert main([*argv, *gallery, query]) == ExitCode.OK
    capsys.readouterr()

    # other features: the global feature alone
    assert main([*argv, *gallery, "--feature", "global", query]) == ExitCode.BAD_CONFIG
    assert "feature=global" in capsys.readouterr().err
    other = ["--gallery", str(synthetic.folder() / "query")]
    assert main([*argv, *other, query]) == ExitCode.BAD_CONFIG
    assert "built from another gallery" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "named"),
    [(["-k", "0"], "-k must be >= 1, got 0"), (["--gallery", "nonsense"], "--gallery 'nonsense'")],
)
def test_search_cli_bad_arguments_exit_2_naming_the_value(
    model_final: Path,
    synthetic: Synthetic,
    extra: list[str],
    named: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    query = str(sorted((synthetic.folder() / "query").glob("*.jpg"))[0])
    argv = ["search", "--checkpoint", str(model_final), "--device", "cpu"]
    argv += ["--gallery", f"market_folder:{synthetic.folder()}", *extra, query]
    assert main(argv) == ExitCode.BAD_CONFIG
    assert named in capsys.readouterr().err


# ---- a model trained with camera normalisation ------------------------------------------------


@pytest.fixture(scope="module")
def camera_norm_model(
    tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path, splits: ReIDSplits
) -> Path:
    """The random ResNet-18 with ``model.camera_norm``, calibrated on its training images."""
    folder = tmp_path_factory.mktemp("camera-norm-model")
    cfg = tiny_config(folder, synthetic_root, "model.backbone=resnet18", "model.camera_norm=true")
    torch.manual_seed(0)
    model = ReIDModel(cfg.model)
    model.use_camera_norm([r.camid for r in splits.train])
    loader = DataLoader(EvalSet(splits.train, build_test_transform(cfg.data)), batch_size=16)
    cameras = torch.tensor([r.camid for r in splits.train])
    model.calibrate_camera_norm((images, cameras[positions]) for images, positions in loader)
    return save_model(model.eval(), cfg, folder / "model_final.pt")


def test_camera_norm_gallery_and_queries_use_their_cameras_and_match_reid_eval(
    camera_norm_model: Path,
    splits: ReIDSplits,
    synthetic: Synthetic,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The index embeds each gallery image with its camera's statistics; queries embedded with
    theirs give the rank-1 that ``reid eval`` (which passes every image's camera) reports."""
    embedder = Embedder.from_file(camera_norm_model)
    index = GalleryIndex.build(embedder, splits.gallery, batch_size=5)
    paths = [r.path for r in splits.gallery]
    with_cameras = embedder.embed_files(paths, cameras=[r.camid for r in splits.gallery])
    stored = index.index.reconstruct_n(0, len(paths))
    np.testing.assert_allclose(stored, with_cameras, atol=1e-5)  # batches grouped otherwise
    assert not np.allclose(stored, embedder.embed_files(paths), atol=1e-3)  # pooled differs

    q_cams = [r.camid for r in splits.query]
    qf = embedder.embed_files([r.path for r in splits.query], cameras=q_cams)
    ours = index.rank1(qf, splits.query)
    argv = ["eval", "--checkpoint", str(camera_norm_model), "--device", "cpu"]
    assert main([*argv, "--data", f"market_folder:{synthetic.folder()}"]) == ExitCode.OK
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["r1"] == pytest.approx(100 * ours.r1, abs=1e-3)

    with pytest.raises(ValueError, match="1 cameras given for at least 2 images"):
        embedder.embed_files(paths[:2], cameras=[0])
    with pytest.raises(ValueError, match="3 cameras given for 2 images"):
        embedder.embed_files(paths[:2], cameras=[0, 0, 0])


def test_search_cli_camera_option_embeds_the_queries_with_that_camera(
    camera_norm_model: Path,
    splits: ReIDSplits,
    synthetic: Synthetic,
    capsys: pytest.CaptureFixture[str],
) -> None:
    query = splits.query[0]
    argv = ["search", "--checkpoint", str(camera_norm_model), "--device", "cpu", "-k", "16"]
    argv += ["--gallery", f"market_folder:{synthetic.folder()}"]
    scores = {}
    for camera in (None, query.camid):
        option = [] if camera is None else ["--camera", str(camera)]
        assert main([*argv, *option, str(query.path)]) == ExitCode.OK
        (row,) = _hits(capsys.readouterr().out)
        scores[camera] = {h["position"]: h["score"] for h in row["hits"]}
    embedder = Embedder.from_file(camera_norm_model)
    gallery = GalleryIndex.build(embedder, splits.gallery)
    (hits,) = gallery.search(embedder.embed_files([query.path], cameras=[query.camid]), k=16)
    for hit in hits:
        assert scores[query.camid][hit.position] == pytest.approx(hit.score, abs=1e-5)
    assert any(abs(scores[None][p] - scores[query.camid][p]) > 1e-4 for p in scores[query.camid])


def test_camera_norm_model_exports_to_onnx_with_its_ordinary_statistics(
    camera_norm_model: Path, tmp_path: Path
) -> None:
    """The ONNX graph is the embedder without cameras: ONNX Runtime agrees with it, and not with
    the features of a camera's own statistics."""
    pytest.importorskip("onnxruntime", reason="the `onnx` extra is not installed")
    pytest.importorskip("onnxscript", reason="the `onnx` extra is not installed")
    import onnxruntime as ort

    from reid_core.inference.export import check_onnx, export_onnx

    embedder = Embedder.from_file(camera_norm_model)
    path = export_onnx(embedder, tmp_path / "model.onnx")
    assert check_onnx(embedder, path) <= 1e-4
    images = torch.rand(2, 3, *embedder.input_size)
    (onnx_features,) = ort.InferenceSession(str(path)).run(None, {"images": images.numpy()})
    with torch.inference_mode():
        own_camera = embedder(images, cameras=[0, 0]).numpy()
    assert not np.allclose(onnx_features, own_camera, atol=1e-3)
