from pathlib import Path

import pytest
import torch
import torchvision

from reid_core.config import ModelConfig
from reid_core.models import (
    BACKBONES,
    PatchGenerationModule,
    PretrainedWeightsNotFoundError,
    ReIDModel,
    build_backbone,
    stripe_thetas,
)

SMALL = {"backbone": "resnet18", "pretrained": "none", "pgm_channels": 32, "pgm_hidden": 16}


def test_stripe_thetas_are_the_six_horizontal_stripes() -> None:
    t = stripe_thetas(6)
    assert t.shape == (6, 2, 3)
    expected_ty = [-5 / 6, -3 / 6, -1 / 6, 1 / 6, 3 / 6, 5 / 6]
    assert torch.allclose(t[:, 1, 2], torch.tensor(expected_ty))
    assert torch.all(t[:, 0, 0] == 1) and torch.allclose(t[:, 1, 1], torch.full((6,), 1 / 6))


def test_pgm_at_init_cuts_stripes() -> None:
    """At init patch p is the stripe centred on t_p: its mean is the row at (t_p + 1)/2 * (H - 1)."""
    pgm = PatchGenerationModule(in_channels=4, num_patches=3, channels=8, hidden=4).eval()
    x = torch.zeros(1, 4, 9, 5)
    for row in range(9):
        x[:, :, row, :] = row  # each row holds its own index
    patches = pgm(x)
    assert patches.shape == (1, 3, 4, 3, 5)
    means = patches.mean(dim=(2, 3, 4)).squeeze(0)
    centres = (stripe_thetas(3)[:, 1, 2] + 1) / 2 * 8  # rows 4/3, 4, 20/3 of 0..8
    assert torch.allclose(means, centres, atol=1e-5)
    assert torch.allclose(patches[0, 0, 0, :, 0], torch.tensor([0.0, 4 / 3, 8 / 3]), atol=1e-5)


def test_pgm_refuses_a_tiny_map() -> None:
    pgm = PatchGenerationModule(in_channels=4, num_patches=6, channels=8, hidden=4)
    with pytest.raises(ValueError, match="smaller than the PGM"):
        pgm(torch.zeros(1, 4, 2, 2))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbones_build_and_report_channels(name: str) -> None:
    bb = build_backbone(name, last_stride=1)
    out = bb(torch.zeros(1, 3, 64, 32))
    assert out.shape[1] == bb.out_channels


def test_last_stride_one_doubles_the_map() -> None:
    x = torch.zeros(1, 3, 128, 64)
    assert build_backbone("resnet18", last_stride=1)(x).shape[-2:] == (8, 4)
    assert build_backbone("resnet18", last_stride=2)(x).shape[-2:] == (4, 2)
    assert build_backbone("resnet50", last_stride=1)(x).shape[-2:] == (8, 4)


def test_model_outputs_are_normalised() -> None:
    model = ReIDModel(ModelConfig(**SMALL)).eval()
    out = model(torch.randn(3, 3, 96, 48))
    assert out.global_features.shape == (3, 512)
    assert out.patch_features is not None and out.patch_features.shape == (3, 6, 256)
    assert out.embeddings is not None and out.embeddings.shape == (3, 6 * 128)
    assert torch.allclose(out.global_features.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out.patch_features.norm(dim=2), torch.ones(3, 6), atol=1e-5)
    feats = model.extract(torch.randn(3, 3, 96, 48))
    assert feats.shape == (3, model.feature_dim("concat")) == (3, 512 + 6 * 256)
    assert torch.allclose(feats.norm(dim=1), torch.full((3,), 7**0.5), atol=1e-4)
    assert model.extract(torch.randn(2, 3, 96, 48), feature="global").shape == (2, 512)


def test_global_only_model_has_no_patch_branch() -> None:
    model = ReIDModel(ModelConfig(**SMALL), with_patch_branch=False)
    assert model.pgm is None
    assert model(torch.randn(2, 3, 96, 48)).patch_features is None
    assert model.feature_dim("concat") == 512


def test_frozen_pgm_stays_frozen_and_in_eval_mode() -> None:
    model = ReIDModel(ModelConfig(**SMALL)).train()
    assert model.pgm is not None and not model.pgm.training
    assert all(not p.requires_grad for p in model.pgm.parameters())
    new_ids = {id(p) for p in model.new_layers()}
    assert not any(id(p) in new_ids for p in model.pgm.parameters())
    trainable = ReIDModel(ModelConfig(**{**SMALL, "pgm_trainable": True})).train()
    assert trainable.pgm is not None and trainable.pgm.training


def test_missing_imagenet_weights_fail_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(PretrainedWeightsNotFoundError, match="model.weights_path"):
        build_backbone("resnet18", pretrained=True)
    with pytest.raises(PretrainedWeightsNotFoundError, match="nothing.pth"):
        build_backbone("resnet18", pretrained=True, weights_path=tmp_path / "nothing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsNotFoundError, match="cannot read"):
        build_backbone("resnet18", pretrained=True, weights_path=bad)


def test_local_imagenet_file_is_loaded(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    bb = build_backbone("resnet18", pretrained=True, weights_path=path)
    assert torch.equal(bb.body[0].weight, reference.conv1.weight)
    assert torch.equal(bb.body[7][1].conv2.weight, reference.layer4[1].conv2.weight)


def test_torchvision_cache_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    reference = torchvision.models.resnet18(weights=None)
    name = Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / name)
    bb = build_backbone("resnet18", pretrained=True)
    assert torch.equal(bb.body[0].weight, reference.conv1.weight)


def test_unknown_backbone_lists_known() -> None:
    with pytest.raises(ValueError, match="resnet50"):
        build_backbone("vgg99")
