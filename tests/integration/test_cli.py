"""The ``reid`` command (eval, embed, export) on one tiny model trained once per session."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from reid_core.cli import main
from reid_core.data import build_dataset, build_eval_loader, build_test_transform
from reid_core.data.datasets import Synthetic
from reid_core.engine.exit_codes import ExitCode
from reid_core.evaluation import centre_per_camera, evaluate_features, extract_features
from reid_core.model_io import load_model
from tests.integration.conftest import IDENTITIES, IMAGES_PER_IDENTITY, TrainedRun

METRIC_KEYS = {"mAP", "mINP", "r1", "r5", "r10", "num_valid_queries", "num_skipped_queries"}


@pytest.fixture(scope="module")
def model_final(trained_run: TrainedRun) -> Path:
    assert trained_run.code == ExitCode.OK
    return trained_run.model_final


@pytest.fixture(scope="module")
def tiny_folder(synthetic_root: Path) -> Path:
    """The Market-layout folder the trained run was evaluated on."""
    folder = Synthetic(
        synthetic_root, num_identities=IDENTITIES, images_per_identity=IMAGES_PER_IDENTITY
    ).folder()
    assert (folder / "query").is_dir()
    return folder


def _json_line(out: str) -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, "nothing printed on stdout"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def test_eval_on_synthetic_prints_metrics(
    model_final: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "--checkpoint", str(model_final), "--device", "cpu"]
    assert main([*argv, "--data", f"synthetic:{tmp_path / 'cache'}"]) == ExitCode.OK
    metrics = _json_line(capsys.readouterr().out)
    assert set(metrics) == METRIC_KEYS
    for key in ("mAP", "mINP", "r1", "r5", "r10"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["r1"] <= metrics["r5"] <= metrics["r10"]
    assert metrics["num_valid_queries"] > 0


def test_eval_matches_the_evaluation_during_training(
    trained_run: TrainedRun,
    model_final: Path,
    tiny_folder: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Same model, same query/gallery: ``reid eval`` reproduces the last epoch's metrics."""
    argv = ["eval", "--checkpoint", str(model_final), "--device", "cpu"]
    assert main([*argv, "--data", f"market_folder:{tiny_folder}"]) == ExitCode.OK
    metrics = _json_line(capsys.readouterr().out)
    during = trained_run.trainer.state.metrics
    assert during["epoch"] == trained_run.cfg.schedule.epochs
    for key in ("mAP", "mINP", "r1", "r5", "r10"):
        assert metrics[key] == pytest.approx(during[key], abs=1e-3), key


def test_eval_camera_centred_equals_evaluating_centred_features(
    model_final: Path, tiny_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "--checkpoint", str(model_final), "--device", "cpu"]
    argv += ["--data", f"market_folder:{tiny_folder}", "--camera-centred"]
    assert main(argv) == ExitCode.OK
    metrics = _json_line(capsys.readouterr().out)
    model, cfg = load_model(model_final)
    splits = build_dataset("market_folder", tiny_folder)
    qf, gf = (
        extract_features(model, build_eval_loader(records, cfg.data, 16), "cpu", feature="concat")
        for records in (splits.query, splits.gallery)
    )
    cams = np.array([r.camid for r in splits.query + splits.gallery])
    both = centre_per_camera(torch.cat([qf, gf]), cams)
    want = evaluate_features(
        both[: len(qf)],
        both[len(qf) :],
        np.array([r.pid for r in splits.query]),
        np.array([r.pid for r in splits.gallery]),
        cams[: len(qf)],
        cams[len(qf) :],
    ).as_dict(percent=True)
    for key in ("mAP", "mINP", "r1", "r5", "r10"):
        assert metrics[key] == pytest.approx(want[key], abs=1e-3), key
    # the flag changes the figures on this data (so the comparison above can tell)
    assert main(argv[:-1]) == ExitCode.OK
    assert _json_line(capsys.readouterr().out)["mAP"] != pytest.approx(want["mAP"], abs=1e-3)


def test_embed_writes_one_row_per_image(
    model_final: Path, tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = sorted((tiny_folder / "query").glob("*.jpg"))[:2]
    output = tmp_path / "x.npy"
    argv = ["embed", "--checkpoint", str(model_final), "--device", "cpu"]
    assert main([*argv, *map(str, images), "--output", str(output)]) == ExitCode.OK
    assert str(output) in capsys.readouterr().out

    feats = np.load(output)
    model, cfg = load_model(model_final)
    assert feats.dtype == np.float32
    assert feats.shape == (2, model.feature_dim("concat"))
    # the Embedder's features: rows of norm 1, i.e. concat(global, P patches) (every block
    # L2-normalised, a row of norm sqrt(1 + P)) divided by sqrt(1 + P)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    transform = build_test_transform(cfg.data)
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    concat = model.extract(batch).numpy() / math.sqrt(1 + cfg.model.num_patches)
    np.testing.assert_allclose(feats, concat, rtol=1e-5, atol=1e-6)

    # without --output: one JSON line per image, the same features
    assert main([*argv, *map(str, images)]) == ExitCode.OK
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [r["image"] for r in rows] == [str(p) for p in images]
    np.testing.assert_allclose(np.array([r["feature"] for r in rows]), feats, atol=1e-5)


def test_embed_missing_image_fails_naming_the_path(
    model_final: Path, tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = sorted((tiny_folder / "query").glob("*.jpg"))[0]
    missing = tmp_path / "no-such-image.jpg"
    output = tmp_path / "x.npy"
    argv = ["embed", "--checkpoint", str(model_final), "--device", "cpu"]
    code = main([*argv, str(real), str(missing), "--output", str(output)])
    err = capsys.readouterr().err
    assert code != ExitCode.OK
    assert str(missing) in err
    assert not output.exists()


def test_embed_missing_checkpoint_exits_2(
    tmp_path: Path, tiny_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.pt"
    image = sorted((tiny_folder / "query").glob("*.jpg"))[0]
    assert main(["embed", "--checkpoint", str(missing), str(image)]) == ExitCode.BAD_CONFIG
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spec", "named"),
    [("nonsense", "'nonsense'"), ("no_such_dataset:/tmp", "'no_such_dataset'")],
)
def test_eval_bad_data_exits_2_naming_the_value(
    model_final: Path, spec: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["eval", "--checkpoint", str(model_final), "--device", "cpu", "--data", spec])
    assert code == ExitCode.BAD_CONFIG == 2
    assert named in capsys.readouterr().err


def test_export_writes_onnx_and_prints_the_difference(
    model_final: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxruntime", reason="the `onnx` extra is not installed")
    pytest.importorskip("onnxscript", reason="the `onnx` extra is not installed")
    output = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(model_final), "--output", str(output)]) == 0
    summary = _json_line(capsys.readouterr().out)
    model, cfg = load_model(model_final)
    assert summary["onnx"] == str(output) and output.is_file()
    assert summary["input"] == ["N", 3, cfg.data.height, cfg.data.width]
    assert summary["feature_dim"] == model.feature_dim("concat")
    assert 0.0 <= summary["max_abs_diff"] <= 1e-4


def test_export_missing_checkpoint_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.pt"
    argv = ["export", "--checkpoint", str(missing), "--output", str(tmp_path / "m.onnx")]
    assert main(argv) == ExitCode.BAD_CONFIG
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_export_that_does_not_match_exits_1_and_keeps_the_file(
    model_final: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import reid_core.inference.export

    def fake_export(embedder: object, path: Path, opset: int) -> Path:
        Path(path).write_bytes(b"onnx")
        return Path(path)

    def mismatch(*args: object, **kwargs: object) -> float:
        raise reid_core.inference.export.OnnxMismatchError("features differ by up to 0.3")

    monkeypatch.setattr(reid_core.inference.export, "export_onnx", fake_export)
    monkeypatch.setattr(reid_core.inference.export, "check_onnx", mismatch)
    output = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(model_final), "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert "differ by up to 0.3" in err and f"kept at {output}" in err
    assert output.is_file()
