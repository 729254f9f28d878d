"""Camera normalisation (``model.camera_norm``): BatchNorm statistics per training camera."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from reid_core.config import ExperimentConfig, ModelConfig
from reid_core.data import DatasetError, ImageRecord
from reid_core.evaluation import extract_features
from reid_core.model_io import load_model, save_model
from reid_core.models import ReIDModel
from reid_core.models.camera_norm import CameraBatchNorm, camera_context, convert_to_camera_norm
from reid_core.train import build_model

SMALL = {
    "backbone": "resnet18",
    "pretrained": "none",
    "last_stride": 1,
    "num_patches": 2,
    "pgm_channels": 16,
    "pgm_hidden": 8,
    "patch_dim": 16,
    "ipfl_dim": 8,
}


def _norm(channels: int = 2, cameras: int = 2) -> CameraBatchNorm:
    return CameraBatchNorm(channels, cameras)


# ---- the layer ---------------------------------------------------------------------------------


def test_without_a_camera_the_layer_is_an_ordinary_batch_norm() -> None:
    torch.manual_seed(0)
    plain = nn.BatchNorm1d(3)
    nn.init.normal_(plain.weight)
    norm = CameraBatchNorm.from_batch_norm(plain, 2)
    x = torch.randn(5, 3)
    torch.testing.assert_close(norm(x), plain(x))  # training: batch statistics
    assert plain.running_mean is not None and plain.running_var is not None
    torch.testing.assert_close(norm.running_mean, plain.running_mean)
    torch.testing.assert_close(norm.running_var, plain.running_var)
    norm.eval(), plain.eval()
    torch.testing.assert_close(norm(x), plain(x))  # evaluation: running statistics


def test_training_ignores_the_camera_outside_calibration() -> None:
    norm = _norm()
    x = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    with camera_context(norm, 1):
        y = norm(x)
    torch.testing.assert_close(y, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), atol=1e-4, rtol=0)
    # the ordinary running statistics moved (0.1 of the batch's, unbiased variance 2 and 200)
    torch.testing.assert_close(norm.running_mean, torch.tensor([0.2, 2.0]))
    torch.testing.assert_close(norm.running_var, torch.tensor([1.1, 20.9]))
    torch.testing.assert_close(norm.camera_mean, torch.zeros(2, 2))  # cameras untouched
    torch.testing.assert_close(norm.camera_var, torch.ones(2, 2))
    assert norm.camera is None  # the context resets it


def test_calibration_averages_each_cameras_batches_and_fills_unseen_cameras() -> None:
    norm = _norm(channels=1, cameras=3)
    norm.running_mean.fill_(7.0)
    norm.running_var.fill_(3.0)
    norm.start_calibration()
    with camera_context(norm, 1):
        norm(torch.tensor([[0.0], [2.0]]))  # mean 1, unbiased variance 2
        norm(torch.tensor([[4.0], [6.0], [8.0]]))  # mean 6, unbiased variance 4
    with camera_context(norm, 2):
        norm(torch.tensor([[1.0], [1.0]]))  # mean 1, variance 0
    norm.end_calibration()
    # camera 1: the two batches weigh the same; camera 0 saw nothing: the running statistics
    torch.testing.assert_close(norm.camera_mean, torch.tensor([[7.0], [3.5], [1.0]]))
    torch.testing.assert_close(norm.camera_var, torch.tensor([[3.0], [3.0], [0.0]]))
    assert norm.camera_batches.tolist() == [0, 2, 1]
    torch.testing.assert_close(norm.running_mean, torch.tensor([7.0]))  # ordinary: untouched
    assert not norm.calibrating


def test_evaluation_uses_the_cameras_statistics_or_the_ordinary_ones() -> None:
    norm = _norm(channels=1).eval()
    norm.camera_mean.copy_(torch.tensor([[0.0], [2.0]]))
    norm.camera_var.copy_(torch.tensor([[1.0], [4.0]]))
    norm.running_mean.fill_(1.0)
    norm.running_var.fill_(9.0)
    norm.eps = 0.0
    x = torch.tensor([[2.0]])
    with camera_context(norm, 0):
        assert norm(x).item() == pytest.approx(2.0)  # (2 - 0) / 1
    with camera_context(norm, 1):
        assert norm(x).item() == pytest.approx(0.0)  # (2 - 2) / 2
    assert norm(x).item() == pytest.approx(1.0 / 3.0)  # (2 - 1) / 3


def test_a_camera_slot_outside_the_layer_is_refused() -> None:
    norm = _norm().eval()
    with camera_context(norm, 2), pytest.raises(ValueError, match="camera slot 2 outside 0..1"):
        norm(torch.zeros(2, 2))


def test_conversion_keeps_the_weights_and_statistics() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(3)))
    bn = net[1]
    bn.running_mean.fill_(0.5)
    nn.init.constant_(bn.weight, 2.0)
    assert convert_to_camera_norm(net, 3) == 2
    assert isinstance(net[1], CameraBatchNorm) and isinstance(net[2][0], CameraBatchNorm)
    torch.testing.assert_close(net[1].weight, torch.full((4,), 2.0))
    torch.testing.assert_close(net[1].running_mean, torch.full((4,), 0.5))
    torch.testing.assert_close(net[1].camera_mean, torch.full((3, 4), 0.5))
    assert convert_to_camera_norm(net, 3) == 0  # converted layers stay as they are


# ---- the model ---------------------------------------------------------------------------------


def _models(cameras: list[int]) -> tuple[ReIDModel, ReIDModel]:
    """A model with camera normalisation and a plain copy with the same weights."""
    torch.manual_seed(0)
    plain = ReIDModel(ModelConfig(**SMALL))
    model = copy.deepcopy(plain)
    model.use_camera_norm(cameras)
    return model, plain


def _calibrate(model: ReIDModel, seed: int = 1) -> dict[int, int]:
    """Calibrate on random images: 2 batches of camera 1 and one mixed batch of 1 and 2."""
    torch.manual_seed(seed)
    batches = [
        (torch.randn(4, 3, 128, 64), torch.tensor([1, 1, 1, 1])),
        (torch.randn(3, 3, 128, 64), torch.tensor([1, 1, 1])),
        (torch.randn(5, 3, 128, 64), torch.tensor([2, 1, 2, 2, 2])),
    ]
    return model.calibrate_camera_norm(batches)


def test_training_ignores_the_cameras() -> None:
    """Training is the plain network's, with or without cameras given, and the cameras'
    statistics stay as they are."""
    model, plain = _models([5, 2])
    torch.manual_seed(1)
    images = torch.randn(6, 3, 128, 64)
    out = model.train()(images, torch.tensor([2, 5, 5, 2, 2, 5]))
    expected = plain.train()(images)
    torch.testing.assert_close(out.global_features, expected.global_features)
    torch.testing.assert_close(
        model.state_dict()["backbone.body.1.running_mean"],
        plain.state_dict()["backbone.body.1.running_mean"],
    )
    first = model.backbone.body[1]
    assert isinstance(first, CameraBatchNorm)
    assert first.camera_batches.tolist() == [0, 0]


def test_per_camera_training_normalises_each_cameras_images_with_their_own_statistics() -> None:
    """``model.camera_norm_train``: a training batch's output is, row for row, the plain
    network's output on that camera's images alone (their own batch statistics); gradients
    reach the weights through every group."""
    cameras = [5, 2]
    torch.manual_seed(0)
    plain = ReIDModel(ModelConfig(**SMALL))
    model = copy.deepcopy(plain)
    model.use_camera_norm(cameras, in_training=True)
    torch.manual_seed(1)
    images = torch.randn(6, 3, 128, 64)
    cams = torch.tensor([2, 5, 5, 2, 2, 5])
    out = model.train()(images, cams)
    plain.train()
    for camera in (2, 5):
        rows = (cams == camera).nonzero().squeeze(1)
        expected = plain(images[rows])
        torch.testing.assert_close(out.global_features[rows], expected.global_features)
        assert out.patch_features is not None and expected.patch_features is not None
        torch.testing.assert_close(out.patch_features[rows], expected.patch_features)
    # a batch without cameras is still one group, as in plain training
    torch.testing.assert_close(model(images).global_features, plain(images).global_features)
    out.global_features.sum().backward()
    assert model.backbone.body[0].weight.grad is not None


def test_per_camera_training_needs_camera_norm() -> None:
    with pytest.raises(ValueError, match=r"model.camera_norm_train=true needs model.camera_norm"):
        ModelConfig(**SMALL, camera_norm_train=True)
    assert ModelConfig(**SMALL, camera_norm=True, camera_norm_train=True).camera_norm_train


def test_calibration_gives_each_camera_the_averaged_statistics_of_its_images() -> None:
    """After calibration a camera's statistics are what a plain copy gathers, in training mode
    with a cumulative average, from that camera's images in the same batches; the weights and
    the ordinary statistics are untouched."""
    model, plain = _models([1, 2])
    before = copy.deepcopy(model.state_dict())
    assert _calibrate(model) == {1: 7, 2: 4}  # the lone camera-1 image is left out
    assert model.training  # the mode is restored
    for cam, groups in ((1, [(0, [0, 1, 2, 3]), (1, [0, 1, 2])]), (2, [(2, [0, 2, 3, 4])])):
        twin = copy.deepcopy(plain).train()
        for m in twin.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                m.reset_running_stats()
                m.momentum = None  # cumulative average
        torch.manual_seed(1)
        batches = [
            torch.randn(4, 3, 128, 64),
            torch.randn(3, 3, 128, 64),
            torch.randn(5, 3, 128, 64),
        ]
        with torch.no_grad():
            for b, rows in groups:
                twin(batches[b][rows])
        slot = int(model.camera_slots([cam]).item())
        for name, module in model.named_modules():
            if isinstance(module, CameraBatchNorm):
                reference = twin.get_submodule(name)
                torch.testing.assert_close(module.camera_mean[slot], reference.running_mean)
                torch.testing.assert_close(module.camera_var[slot], reference.running_var)
    for key, value in model.state_dict().items():
        if "camera_" not in key:
            torch.testing.assert_close(value, before[key], msg=key)


def test_evaluation_with_a_camera_equals_a_plain_model_with_its_statistics() -> None:
    model, plain = _models([1, 2])
    _calibrate(model)
    slot = int(model.camera_slots([2]).item())
    # the plain network with camera 2's statistics in every converted layer
    for name, module in model.named_modules():
        if isinstance(module, CameraBatchNorm):
            twin = plain.get_submodule(name)
            assert isinstance(twin, nn.modules.batchnorm._BatchNorm), name
            assert twin.running_mean is not None and twin.running_var is not None
            twin.running_mean.copy_(module.camera_mean[slot])
            twin.running_var.copy_(module.camera_var[slot])
    images = torch.randn(3, 3, 128, 64)
    torch.testing.assert_close(
        model.eval().extract(images, cameras=[2, 2, 2]), plain.eval().extract(images)
    )
    assert not torch.allclose(model.extract(images, cameras=[1, 1, 1]), plain.extract(images))


def test_unknown_cameras_use_the_ordinary_statistics() -> None:
    model, plain = _models([1, 2])
    _calibrate(model)
    model.eval()
    images = torch.randn(4, 3, 128, 64)
    ordinary = plain.eval().extract(images)
    torch.testing.assert_close(model.extract(images), ordinary)  # no cameras
    mixed = model.extract(images, cameras=[-1, 7, 1, 2])
    torch.testing.assert_close(mixed[:2], ordinary[:2])  # -1 and a camera never trained on
    torch.testing.assert_close(mixed[2], model.extract(images[2:3], cameras=[1])[0])
    assert not torch.allclose(mixed[2:], ordinary[2:])
    assert model.camera_slots([2, 1, 9, -1]).tolist() == [1, 0, -1, -1]
    with pytest.raises(ValueError, match="3 cameras given for 2 images"):
        model.extract(images[:2], cameras=[1, 2, 1])


def test_a_frozen_patch_generation_module_keeps_plain_batch_norm() -> None:
    model, _ = _models([1, 2])
    assert model.pgm is not None
    assert not any(isinstance(m, CameraBatchNorm) for m in model.pgm.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.pgm.modules())
    with pytest.raises(RuntimeError, match="already has camera normalisation"):
        model.use_camera_norm([1, 2])


def test_camera_norm_needs_known_cameras() -> None:
    with pytest.raises(ValueError, match=r"ids >= 0\), got \[-1, 1\]"):
        ReIDModel(ModelConfig(**SMALL)).use_camera_norm([1, -1])


def test_build_model_refuses_training_images_without_a_camera(tmp_path: Path) -> None:
    cfg = ExperimentConfig.model_validate({"model": {**SMALL, "camera_norm": True}})
    records = [ImageRecord(tmp_path / "a.jpg", -1, 1), ImageRecord(tmp_path / "b.jpg", -1, -1)]
    with pytest.raises(DatasetError, match=r"1 of 2 have none \(first: \[.*b\.jpg"):
        build_model(cfg, records)
    model = build_model(cfg, [ImageRecord(tmp_path / "a.jpg", -1, 3)])
    assert model.camera_ids is not None and model.camera_ids.tolist() == [3]


def test_saved_model_loads_with_its_cameras(tmp_path: Path) -> None:
    model, _ = _models([4, 6])
    model.calibrate_camera_norm([(torch.randn(4, 3, 128, 64), torch.tensor([4, 4, 6, 6]))])
    cfg = ExperimentConfig.model_validate({"model": {**SMALL, "camera_norm": True}})
    loaded, _ = load_model(save_model(model.eval(), cfg, tmp_path / "model_final.pt"))
    assert loaded.camera_ids is not None and loaded.camera_ids.tolist() == [4, 6]
    images = torch.randn(2, 3, 128, 64)
    features = model.extract(images, cameras=[6, 4])
    torch.testing.assert_close(loaded.extract(images, cameras=[6, 4]), features)
    assert not torch.allclose(loaded.extract(images), features)  # the cameras' own statistics


def test_extract_features_passes_each_image_its_camera() -> None:
    model, _ = _models([1, 2])
    _calibrate(model)
    images = torch.randn(5, 3, 128, 64)
    cameras = np.array([2, 1, 1, 2, 1])
    # batches out of order, as a shuffled or distributed loader may give them
    loader = [(images[[3, 0]], torch.tensor([3, 0])), (images[[4, 1, 2]], torch.tensor([4, 1, 2]))]
    feats = extract_features(model, loader, "cpu", cameras=cameras)
    torch.testing.assert_close(feats, model.eval().extract(images, cameras=cameras.tolist()))
    with pytest.raises(ValueError, match="4 cameras given, but the loader yields dataset index 4"):
        extract_features(model, loader, "cpu", cameras=cameras[:4])
