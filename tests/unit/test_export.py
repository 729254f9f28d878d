"""ONNX export of an Embedder, checked against PyTorch with ONNX Runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reid_core.config import ExperimentConfig, load_config
from reid_core.inference.embedder import Embedder
from reid_core.inference.export import OnnxMismatchError, check_onnx, export_onnx
from reid_core.models import ReIDModel
from reid_core.presets import preset_path

onnx = pytest.importorskip("onnx", reason="the `onnx` extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the `onnx` extra is not installed")
pytest.importorskip("onnxscript", reason="the `onnx` extra is not installed")


SMOKE = preset_path("smoke")


@pytest.fixture(scope="module")
def cfg() -> ExperimentConfig:
    """The smoke config: ResNet-18, 96x48 inputs, small patch heads."""
    return load_config(SMOKE)


def colour_fields(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    """``n`` smooth random images in [0, 1]: a 6x3 grid of random colours, upsampled. Unlike
    pixel noise, which all looks alike to a random network, they give distinct features."""
    low = torch.rand(n, 3, 6, 3, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)


def random_model(cfg: ExperimentConfig, seed: int) -> ReIDModel:
    """Random weights, with what initialisation leaves trivial made non-trivial: the heads'
    batch norm statistics (0 and 1 at init; here averages over a few batches) and the PGM
    regressor (zero weights at init: the same stripes for every image). A graph that dropped
    either would still match an untouched model. The regressor's weights move the patches by
    a few percent of the image. (The trunk keeps its initial statistics: fitted ones make a
    random trunk amplify rounding errors beyond any fixed tolerance.)"""
    torch.manual_seed(seed)
    model = ReIDModel(cfg.model).eval()
    assert model.pgm is not None and model.patch_heads is not None
    regressor = model.pgm.localisation[-1]
    assert isinstance(regressor, nn.Linear)
    heads = [model.global_head.bn, model.patch_heads.bn]
    with torch.no_grad():
        regressor.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(seed))
        for bn in heads:
            bn.train()
            bn.momentum = None  # a cumulative average over the batches below
        for step in range(3):
            model(colour_fields(16, cfg.data.height, cfg.data.width, seed=100 * seed + step))
        for bn in heads:
            bn.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="module", params=[("concat", False), ("global", True)], ids=str)
def exported(
    request: pytest.FixtureRequest, cfg: ExperimentConfig, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Embedder, Path]:
    feature, flip = request.param
    embedder = Embedder.from_config(random_model(cfg, seed=0), cfg, feature=feature, flip=flip)
    path = export_onnx(embedder, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return embedder, path


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_runtime_matches_pytorch_and_rows_are_unit_norm(
    exported: tuple[Embedder, Path], batch: int
) -> None:
    embedder, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = colour_fields(batch, *embedder.input_size, seed=1)
    (actual,) = session.run(["features"], {"images": images.numpy()})
    with torch.inference_mode():
        expected = embedder(images).numpy()

    assert actual.dtype == np.float32
    assert actual.shape == (batch, embedder.feature_dim)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-5)
    if batch > 1:  # different images, different features: the graph is no constant
        assert (actual @ actual.T).min() < 0.99


def test_check_onnx_returns_the_difference(exported: tuple[Embedder, Path]) -> None:
    embedder, path = exported
    diff = check_onnx(embedder, path, batch_size=4)
    assert 0.0 <= diff <= 1e-4


def test_graph_signature_and_metadata(exported: tuple[Embedder, Path]) -> None:
    embedder, path = exported
    model = onnx.load(str(path))
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert (inp.name, out.name) == ("images", "features")
    in_dims = inp.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and not in_dims[0].HasField("dim_value")  # dynamic batch
    assert [d.dim_value for d in in_dims[1:]] == [3, *embedder.input_size]
    assert out.type.tensor_type.shape.dim[1].dim_value == embedder.feature_dim
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["reid_core.feature"] == embedder.feature
    assert meta["reid_core.flip"] == str(embedder.flip).lower()
    assert meta["reid_core.feature_dim"] == str(embedder.feature_dim)
    assert not list(path.parent.glob("*.tmp")), "the temporary file is left behind"


def test_check_onnx_refuses_another_models_weights(
    exported: tuple[Embedder, Path], cfg: ExperimentConfig
) -> None:
    embedder, path = exported
    other = Embedder.from_config(
        random_model(cfg, seed=1), cfg, feature=embedder.feature, flip=embedder.flip
    )
    with pytest.raises(OnnxMismatchError, match=r"differ by up to .* \(tolerance 0.0001\)"):
        check_onnx(other, path)


def test_check_onnx_refuses_another_input_size(
    exported: tuple[Embedder, Path], cfg: ExperimentConfig
) -> None:
    embedder, path = exported
    other = Embedder(embedder.model, (128, 64), cfg.data.mean, cfg.data.std, embedder.feature)
    with pytest.raises(OnnxMismatchError, match=r"\(N, 3, 128, 64\)"):
        check_onnx(other, path)


def test_missing_onnxruntime_names_the_extra(
    exported: tuple[Embedder, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    embedder, path = exported
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"onnxruntime.*reid-service\[onnx\]"):
        check_onnx(embedder, path)
