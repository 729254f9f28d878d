"""GSL's neighbour prior (loss.gsl.prior), the colour descriptors it uses, and camera centring."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reid_core.config import (
    ExperimentConfig,
    GSLConfig,
    InstanceLossConfig,
    LossConfig,
    PEDALConfig,
)
from reid_core.data import CorruptImageError
from reid_core.data.colour import stripe_colour_histograms
from reid_core.evaluation import centre_per_camera, evaluate_features
from reid_core.losses import (
    MemoryClassifierLoss,
    PEDALLoss,
    credible_neighbour_lists,
    credible_neighbours,
)
from reid_core.method import DualBranchObjective
from reid_core.models.reid_model import ReIDOutput

# ----------------------------------------------------------------------------------------------
# camera centring
# ----------------------------------------------------------------------------------------------


def test_centre_per_camera_hand_computed() -> None:
    # camera 0: (1, 0) and (0, 1), mean (0.5, 0.5); camera 1: (3, 0) alone -> 0 -> stays 0
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    out = centre_per_camera(x, [0, 0, 1])
    s = 1 / math.sqrt(2)
    assert torch.allclose(out[0], torch.tensor([s, -s]), atol=1e-6)
    assert torch.allclose(out[1], torch.tensor([-s, s]), atol=1e-6)
    assert torch.equal(out[2], torch.zeros(2))


def test_centre_per_camera_normalises_first_and_groups_unknown_cameras() -> None:
    # rows are normalised before the mean: (2, 0) counts as (1, 0)
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 5.0]])
    out = centre_per_camera(x, np.array([-1, -1, 7]))
    s = 1 / math.sqrt(2)
    assert torch.allclose(out[0], torch.tensor([s, -s]), atol=1e-6)
    with pytest.raises(ValueError, match="2 camera ids given for 3 feature rows"):
        centre_per_camera(x, [0, 1])


def test_evaluate_features_camera_centred_equals_centring_first() -> None:
    g = torch.Generator().manual_seed(0)
    qf, gf = torch.randn(6, 8, generator=g), torch.randn(20, 8, generator=g)
    q_pids, g_pids = np.arange(6) % 3, np.arange(20) % 3
    q_cams, g_cams = np.zeros(6, dtype=int), np.arange(20) % 2 + 1
    # a camera offset that the centring removes
    gf[g_cams == 2] += 3.0
    both = centre_per_camera(torch.cat([qf, gf]), np.concatenate([q_cams, g_cams]))
    want = evaluate_features(both[:6], both[6:], q_pids, g_pids, q_cams, g_cams)
    got = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, camera_centred=True)
    plain = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams)
    assert got.mAP == pytest.approx(want.mAP) and got.cmc[0] == pytest.approx(want.cmc[0])
    assert got.mAP != pytest.approx(plain.mAP)


# ----------------------------------------------------------------------------------------------
# colour descriptors
# ----------------------------------------------------------------------------------------------


def _solid(path: Path, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Path:
    image = Image.new("RGB", (20, 40), top)
    image.paste(Image.new("RGB", (20, 20), bottom), (0, 20))
    image.save(path)
    return path


def test_stripe_colour_histograms_of_solid_colours(tmp_path: Path) -> None:
    # pure red is HSV (0, 255, 255): hue bin 0, saturation bin 3, value bin 3 -> bin 15;
    # pure blue is hue 170: bin (170 * 8) >> 8 = 5 -> 5 * 16 + 15 = 95
    path = _solid(tmp_path / "a.png", (255, 0, 0), (0, 0, 255))
    h = stripe_colour_histograms([path], stripes=2)
    assert h.shape == (1, 256)
    top, bottom = h[0, :128], h[0, 128:]
    assert top[15] == pytest.approx(1.0) and top.sum() == pytest.approx(1.0)
    assert bottom[95] == pytest.approx(1.0) and bottom.sum() == pytest.approx(1.0)


def test_stripe_colour_histograms_tell_colours_apart(tmp_path: Path) -> None:
    red_blue = _solid(tmp_path / "a.png", (250, 10, 10), (10, 10, 250))
    red_blue2 = _solid(tmp_path / "b.png", (240, 20, 15), (20, 15, 240))
    green = _solid(tmp_path / "c.png", (10, 250, 10), (10, 250, 10))
    h = F.normalize(stripe_colour_histograms([red_blue, red_blue2, green]), dim=1)
    assert float(h[0] @ h[1]) > 0.9 > float(h[0] @ h[2])
    assert stripe_colour_histograms([]).shape == (0, 512)


def test_stripe_colour_histograms_name_an_unreadable_image(tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        stripe_colour_histograms([bad])
    with pytest.raises(ValueError, match="stripes must be >= 1"):
        stripe_colour_histograms([bad], stripes=0)


# ----------------------------------------------------------------------------------------------
# credible neighbour lists
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [1, 7, 1024])
def test_credible_neighbour_lists_match_the_mask(chunk_rows: int) -> None:
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(30, 4, generator=g), dim=1)
    neighbours, sims = credible_neighbour_lists(bank, 0.2, 4, mutual=True, chunk_rows=chunk_rows)
    mask = credible_neighbours(bank, torch.arange(30), 0.2, 4, True)
    assert neighbours.shape == sims.shape == (30, 4)
    for i in range(30):
        row = neighbours[i][neighbours[i] >= 0]
        assert set(row.tolist()) == set(mask[i].nonzero().flatten().tolist())
        want = bank[row] @ bank[i]
        assert torch.allclose(sims[i, : len(row)], want, atol=1e-6)
        assert torch.all(want[:-1] >= want[1:])  # most similar first
        assert torch.all(sims[i, len(row) :] == 0) and torch.all(neighbours[i, len(row) :] == -1)
    assert (neighbours >= 0).any() and (neighbours == -1).any()


def test_credible_neighbour_lists_among_other_cameras() -> None:
    g = torch.Generator().manual_seed(2)
    bank = F.normalize(torch.randn(20, 3, generator=g), dim=1)
    cams = torch.arange(20) % 3
    neighbours, _ = credible_neighbour_lists(bank, -1.0, 3, mutual=True, slot_cameras=cams)
    mask = credible_neighbours(bank, torch.arange(20), -1.0, 3, True, cams)
    for i in range(20):
        row = neighbours[i][neighbours[i] >= 0]
        assert set(row.tolist()) == set(mask[i].nonzero().flatten().tolist())
        assert bool((cams[row] != cams[i]).all())
    assert (neighbours >= 0).any()


def test_credible_neighbour_lists_of_tiny_banks() -> None:
    neighbours, sims = credible_neighbour_lists(torch.tensor([[1.0, 0.0]]), 0.0, 5)
    assert neighbours.shape == sims.shape == (1, 0)
    with pytest.raises(ValueError, match=r"bank must have shape \(N, d\)"):
        credible_neighbour_lists(torch.zeros(3), 0.0, 5)


# ----------------------------------------------------------------------------------------------
# GSL from the prior
# ----------------------------------------------------------------------------------------------


def test_gsl_from_prior_lists_hand_computed() -> None:
    # memory: slots at 0, 90, 180 degrees; feature of image 0 at 45 degrees. The prior says
    # C_0 = {2} with similarity 0.8 (whatever the memory says: S_02 = -1 < threshold).
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    s = 1 / math.sqrt(2)
    feats = torch.tensor([[s, s]])
    loss = MemoryClassifierLoss(InstanceLossConfig(temperature=0.5), GSLConfig())
    prior = (torch.tensor([[2, -1]]), torch.tensor([[0.8, 0.0]]))
    out = loss(feats, torch.tensor([0]), memory, use_gsl=True, prior=prior)
    logits = [s / 0.5, s / 0.5, -s / 0.5]
    log_p2 = logits[2] - math.log(sum(math.exp(z) for z in logits))
    assert out["gsl"].item() == pytest.approx(-log_p2, rel=1e-5)
    # the memory alone finds no credible neighbour for image 0
    assert loss(feats, torch.tensor([0]), memory, use_gsl=True)["gsl"].item() == 0.0
    # an empty list row contributes 0
    empty = (torch.tensor([[-1, -1]]), torch.zeros(1, 2))
    assert loss(feats, torch.tensor([0]), memory, use_gsl=True, prior=empty)["gsl"].item() == 0.0
    with pytest.raises(ValueError, match="prior lists of shapes"):
        loss(feats, torch.tensor([0]), memory, use_gsl=True, prior=(prior[0], torch.zeros(1, 3)))


def test_gsl_prior_padding_never_hides_slot_zero() -> None:
    # image 1's prior set holds slot 0 followed by padding: the padding must not unset it
    memory = torch.eye(3)
    feats = torch.tensor([[0.0, 1.0, 0.0]])
    loss = MemoryClassifierLoss(InstanceLossConfig(temperature=1.0), GSLConfig(weighting="uniform"))
    prior = (torch.tensor([[0, -1, -1]]), torch.tensor([[0.5, 0.0, 0.0]]))
    out = loss(feats, torch.tensor([1]), memory, use_gsl=True, prior=prior)
    log_p0 = 0.0 - math.log(1 + math.e + 1)
    assert out["gsl"].item() == pytest.approx(-log_p0, rel=1e-5)


def test_loss_config_prior_epochs_and_warmups() -> None:
    paper = LossConfig.model_validate({"gsl": {"warmup_epochs": 3}})
    assert [paper.gsl_active(e) for e in range(5)] == [False, False, False, True, True]
    assert not any(paper.uses_prior(e) for e in range(5))
    with_prior = LossConfig.model_validate(
        {
            "prior": {"kind": "colour"},
            "gsl": {"warmup_epochs": 4, "prior_epochs": 2},
            "pedal": {"warmup_epochs": 5, "prior_epochs": 3},
        }
    )
    assert [with_prior.gsl_uses_prior(e) for e in range(5)] == [True, True, False, False, False]
    # prior epochs, then nothing until the memory's warm-up ends
    assert [with_prior.gsl_active(e) for e in range(5)] == [True, True, False, False, True]
    assert [with_prior.pedal_active(e) for e in range(6)] == [True] * 3 + [False] * 2 + [True]
    assert [with_prior.uses_prior(e) for e in range(4)] == [True, True, True, False]
    # prior epochs without a prior kind, or for a disabled term, mean nothing
    no_kind = LossConfig.model_validate({"gsl": {"prior_epochs": 2, "warmup_epochs": 9}})
    assert not no_kind.uses_prior(0) and not no_kind.gsl_active(0)
    off = LossConfig.model_validate(
        {"prior": {"kind": "colour"}, "gsl": {"enabled": False, "prior_epochs": 2}}
    )
    assert not off.gsl_uses_prior(0) and not off.gsl_active(0)


def _objective(prior_epochs: int, pedal: bool = False) -> DualBranchObjective:
    cfg = ExperimentConfig.model_validate(
        {
            "model": {"num_patches": 2, "patch_dim": 8},
            "loss": {
                "prior": {"kind": "colour", "topk": 1},
                "gsl": {"warmup_epochs": 10, "prior_epochs": prior_epochs},
                "pedal": {
                    "enabled": pedal,
                    "neighbours": 1,
                    "warmup_epochs": 10,
                    "prior_epochs": prior_epochs,
                },
                "ipfl": {"enabled": False},
            },
        }
    )
    fake_model = SimpleNamespace(global_dim=2, with_patch_branch=pedal, cfg=cfg.model)
    objective = DualBranchObjective(cfg, 4, fake_model, cameras=[0, 0, 1, 1])  # type: ignore[arg-type]
    assert objective.global_memory is not None
    objective.global_memory.set(torch.arange(4), torch.eye(2).repeat(2, 1))
    return objective


# Two stripes per image. After each camera's mean is removed (camera 0 holds images 0 and 1,
# camera 1 holds 2 and 3), the whole-image descriptors are 0 -> (1, 0 | 1, 0),
# 1 -> (-1, 0 | -1, 0), 2 -> (1, 0 | 1, 0), 3 -> (-1, 0 | -1, 0) (up to scale): C_0 = {2},
# C_1 = {3}. Stripe 1 alone says otherwise: 0 looks like 3, 1 like 2.
DESCRIPTORS = torch.tensor(
    [
        [[1.0, 0.2], [1.0, 0.2]],
        [[-1.0, 0.2], [-1.0, 0.2]],
        [[1.0, 5.0], [-1.0, 5.0]],
        [[-1.0, 5.0], [1.0, 5.0]],
    ]
)


def test_objective_takes_gsl_from_the_prior_in_the_prior_epochs() -> None:
    objective = _objective(prior_epochs=2)
    feats = F.normalize(torch.randn(2, 2, generator=torch.Generator().manual_seed(0)), dim=1)
    out = ReIDOutput(feats.requires_grad_(), None, None)
    idx = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="GSL's prior was not set"):
        objective(out, out, idx, epoch=0)
    # stripe 0 and the whole image agree that 0 ~ 2 and 1 ~ 3; stripe 1 disagrees
    d = DESCRIPTORS.clone()
    d[2, 1], d[3, 1] = torch.tensor([1.0, 5.0]), torch.tensor([-1.0, 5.0])
    objective.set_neighbour_prior(d)
    assert objective.prior_neighbours.tolist() == [[2], [3], [0], [1]]
    terms = objective(out, out, idx, epoch=1)
    assert float(terms["gsl"].detach()) > 0.0
    terms["total"].backward()
    # after the prior epochs, GSL waits for the memory warm-up (10 epochs)
    assert float(objective(out, out, idx, epoch=2)["gsl"].detach()) == 0.0
    with pytest.raises(ValueError, match=r"descriptors of shape \(3, 2\) for 4 training images"):
        objective.set_neighbour_prior(d[:3, 0])


def test_objective_takes_pedal_neighbours_per_stripe_from_the_prior() -> None:
    objective = _objective(prior_epochs=1, pedal=True)
    objective.set_neighbour_prior(DESCRIPTORS)
    # stripe 0: 0 ~ 2, 1 ~ 3; stripe 1: 0 ~ 3, 1 ~ 2
    assert objective.prior_patch_neighbours.tolist() == [
        [[2], [3]],
        [[3], [2]],
        [[0], [1]],
        [[1], [0]],
    ]
    assert objective.patch_memory is not None
    g = torch.Generator().manual_seed(0)
    objective.patch_memory.set(
        torch.arange(4), F.normalize(torch.randn(4, 2, 8, generator=g), dim=2)
    )
    patches = F.normalize(torch.randn(2, 2, 8, generator=g), dim=2).requires_grad_()
    out = ReIDOutput(torch.randn(2, 2, generator=g), patches, None)
    idx = torch.tensor([0, 1])
    assert objective.pedal is not None
    got = objective(out, out, idx, epoch=0)["pedal"]
    # the objective writes view 0 into the patch memory before the loss: compare on that memory
    want = objective.pedal(
        patches,
        idx,
        objective.patch_memory.bank,
        neighbours=torch.tensor([[[2], [3]], [[3], [2]]]),
    )
    assert float(got.detach()) == pytest.approx(2.0 * float(want.detach()), rel=1e-6)
    # epoch 1: no prior, before the warm-up: PEDAL is 0
    assert float(objective(out, out, idx, epoch=1)["pedal"].detach()) == 0.0


def test_pedal_with_given_neighbours_hand_computed() -> None:
    # one patch, memory at distance^2 0, 2, 4 from f (slot 0 is the image itself)
    memory = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[-1.0, 0.0]]])
    f = torch.tensor([[[1.0, 0.0]]])
    loss = PEDALLoss(PEDALConfig(scale=1.0, neighbours=1))
    # K = {2}: -log(e^-4 / (e^-2 + e^-4)); the nearest slot (1) would give -log(e^-2 / ...)
    got = loss(f, torch.tensor([0]), memory, neighbours=torch.tensor([[[2]]]))
    assert got.item() == pytest.approx(-math.log(math.exp(-4) / (math.exp(-2) + math.exp(-4))))
    nearest = loss(f, torch.tensor([0]), memory)
    assert nearest.item() == pytest.approx(-math.log(math.exp(-2) / (math.exp(-2) + math.exp(-4))))
    with pytest.raises(ValueError, match="must not hold the image's own index"):
        loss(f, torch.tensor([0]), memory, neighbours=torch.tensor([[[0]]]))
    with pytest.raises(ValueError, match=r"neighbours must have shape \(B, P, k\)"):
        loss(f, torch.tensor([0]), memory, neighbours=torch.tensor([[2]]))
    with pytest.raises(IndexError, match="neighbours must lie in"):
        loss(f, torch.tensor([0]), memory, neighbours=torch.tensor([[[3]]]))
