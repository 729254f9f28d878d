"""The neighbour prior (loss.prior) of GSL and PEDAL, the colour descriptors it uses, and camera
centring."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reid_core.config import (
    ConfigError,
    ExperimentConfig,
    GSLConfig,
    InstanceLossConfig,
    LossConfig,
    PEDALConfig,
    load_config,
)
from reid_core.data import CorruptImageError
from reid_core.data.colour import stripe_colour_histograms
from reid_core.evaluation import centre_per_camera, evaluate_features
from reid_core.models.reid_model import ReIDOutput
from reid_core.objective.dual_branch import DualBranchObjective
from reid_core.objective.losses import (
    MemoryClassifierLoss,
    PEDALLoss,
    credible_neighbour_lists,
    credible_neighbours,
    nearest_other_rows,
)

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
    """32 x 32 pixels, ``top`` above ``bottom``: the size two stripes are resized to, so that no
    pixel of a 2-stripe descriptor mixes the two colours."""
    image = Image.new("RGB", (32, 32), top)
    image.paste(Image.new("RGB", (32, 16), bottom), (0, 16))
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


def test_stripe_colour_histograms_keep_reds_of_both_ends_of_the_hue_circle_red(
    tmp_path: Path,
) -> None:
    # a checkerboard of two reds, HSV hue 254 and hue 3 (PIL's hue runs 0-255 around the circle):
    # shrunk to 32 x 32 pixels, its mean colour is red (hue bins 7 and 0), never the hue halfway
    # between them on the line, 128 (cyan, bin 4)
    red_254 = Image.new("HSV", (1, 1), (254, 255, 255)).convert("RGB").getpixel((0, 0))
    red_3 = Image.new("HSV", (1, 1), (3, 255, 255)).convert("RGB").getpixel((0, 0))
    yy, xx = np.mgrid[:64, :64]
    pixels = np.where(((yy + xx) % 2 == 0)[..., None], red_254, red_3).astype(np.uint8)
    path = tmp_path / "reds.png"
    Image.fromarray(pixels).save(path)
    h = stripe_colour_histograms([path], stripes=2)
    per_hue = h.view(2, 8, 16).pow(2).sum(dim=2)  # each stripe's histogram mass per hue bin
    assert torch.allclose(per_hue[:, [0, 7]].sum(dim=1), torch.ones(2), atol=1e-6), per_hue


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


@pytest.mark.parametrize("chunk_rows", [1, 4, 1024])
def test_nearest_other_rows_are_the_k_most_similar_others(chunk_rows: int) -> None:
    g = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(9, 5, generator=g), dim=1)
    bank[4] = 0.0  # similarity 0 to every row: still listed, and still given k others
    got = nearest_other_rows(bank, 3, chunk_rows=chunk_rows)
    sim = bank @ bank.T
    sim.fill_diagonal_(float("-inf"))
    assert torch.equal(got, sim.topk(3, dim=1).indices)
    assert not bool((got == torch.arange(9)[:, None]).any())
    # k is capped at N - 1: every other row, whatever its similarity
    assert nearest_other_rows(bank[:3], 5).shape == (3, 2)
    assert nearest_other_rows(bank[:1], 5).shape == (1, 0)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        nearest_other_rows(bank, 0)


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


def test_gsl_from_prior_lists_weights_by_the_prior_similarities() -> None:
    # the memory and feature of the test above; C_0 = {1, 2} with prior similarities 0.8 and
    # 0.2: w_01 = 0.8 / (0.8 + 0.2), w_02 = 0.2 / (0.8 + 0.2) (uniform weights would give 0.5)
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    s = 1 / math.sqrt(2)
    feats = torch.tensor([[s, s]])
    loss = MemoryClassifierLoss(InstanceLossConfig(temperature=0.5), GSLConfig())
    prior = (torch.tensor([[1, 2]]), torch.tensor([[0.8, 0.2]]))
    out = loss(feats, torch.tensor([0]), memory, use_gsl=True, prior=prior)
    logits = [s / 0.5, s / 0.5, -s / 0.5]
    log_z = math.log(sum(math.exp(z) for z in logits))
    want = -(0.8 * (logits[1] - log_z) + 0.2 * (logits[2] - log_z))
    assert out["gsl"].item() == pytest.approx(want, rel=1e-5)
    assert out["gsl"].item() != pytest.approx(-0.5 * (logits[1] + logits[2] - 2 * log_z))


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
    # a disabled term's prior epochs mean nothing, as its other settings, while another reads it
    gsl_off = LossConfig.model_validate(
        {
            "prior": {"kind": "colour"},
            "gsl": {"enabled": False, "prior_epochs": 2},
            "pedal": {"prior_epochs": 1},
        }
    )
    assert not gsl_off.gsl_uses_prior(0) and not gsl_off.gsl_active(0)
    assert gsl_off.pedal_uses_prior(0) and not gsl_off.pedal_uses_prior(1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["loss.gsl.prior_epochs=2"],
            "loss.gsl.prior_epochs=2 but loss.prior.kind='none': set loss.prior.kind=colour, "
            "or loss.gsl.prior_epochs=0",
        ),
        (
            ["loss.pedal.prior_epochs=3"],
            "loss.pedal.prior_epochs=3 but loss.prior.kind='none'",
        ),
        (
            ["loss.prior.kind=colour"],
            "loss.prior.kind='colour' but no loss term reads the prior "
            "(loss.gsl.prior_epochs=0, loss.pedal.prior_epochs=0): set loss.gsl.prior_epochs or "
            "loss.pedal.prior_epochs of an enabled term, or loss.prior.kind=none",
        ),
        (
            ["loss.prior.kind=colour", "loss.gsl.prior_epochs=2", "loss.gsl.enabled=false"],
            "loss.prior.kind='colour' but no loss term reads the prior (loss.gsl.prior_epochs=2 "
            "with loss.gsl.enabled=false, loss.pedal.prior_epochs=0)",
        ),
    ],
)
def test_config_refuses_prior_settings_that_would_be_ignored(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=overrides)


def _objective(
    prior_epochs: int,
    pedal: bool = False,
    cameras: Sequence[int] = (0, 0, 1, 1),
    gsl: dict[str, Any] | None = None,
    pedal_neighbours: int = 1,
) -> DualBranchObjective:
    """GSL (and, with ``pedal``, PEDAL) from a colour prior in epochs [0, prior_epochs); the
    memory warm-ups last 10 epochs. ``gsl``: more loss.gsl settings."""
    cfg = ExperimentConfig.model_validate(
        {
            "model": {"num_patches": 2, "patch_dim": 8},
            "loss": {
                "prior": {"kind": "colour", "topk": 1},
                "gsl": {"warmup_epochs": 10, "prior_epochs": prior_epochs, **(gsl or {})},
                "pedal": {
                    "enabled": pedal,
                    "neighbours": pedal_neighbours,
                    "warmup_epochs": 10,
                    "prior_epochs": prior_epochs,
                },
                "ipfl": {"enabled": False},
            },
        }
    )
    n = len(cameras)
    fake_model = SimpleNamespace(global_dim=2, with_patch_branch=pedal, cfg=cfg.model)
    objective = DualBranchObjective(cfg, n, fake_model, cameras=list(cameras))  # type: ignore[arg-type]
    assert objective.global_memory is not None
    objective.global_memory.set(torch.arange(n), torch.eye(2)[torch.arange(n) % 2])
    return objective


# Two stripes per image; camera 0 holds images 0 and 1, camera 1 holds 2 and 3. After each
# camera's mean is removed, stripe 0 is 0 -> (1, 0), 1 -> (-1, 0), 2 -> (1, 0), 3 -> (-1, 0)
# (0 looks like 2, 1 like 3) and stripe 1 is 0 -> (1, 0), 1 -> (-1, 0), 2 -> (-1, 0),
# 3 -> (1, 0) (0 looks like 3, 1 like 2). The stripes disagree, so the whole images (the
# stripes concatenated: 0 -> (1, 0, 1, 0), 2 -> (1, 0, -1, 0), up to scale) of 0 and 2, and of
# 0 and 3, tie at cosine 0.
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
    with pytest.raises(
        RuntimeError,
        match=r"loss.gsl.prior_epochs=2 with loss.prior.kind='colour', but the prior's neighbours "
        r"are not set: call set_neighbour_prior\(descriptors\) .* \(NeighbourPriorHook",
    ):
        objective(out, out, idx, epoch=0)
    # images 2 and 3 swap stripe 1, so that both stripes, and the whole images, say 0 ~ 2 and
    # 1 ~ 3 (cosine 1; every other pair -1): C_0 = {2}, C_1 = {3}, C_2 = {0}, C_3 = {1}
    d = DESCRIPTORS.clone()
    d[2, 1], d[3, 1] = torch.tensor([1.0, 5.0]), torch.tensor([-1.0, 5.0])
    objective.set_neighbour_prior(d)
    assert objective.prior_neighbours.tolist() == [[2], [3], [0], [1]]
    assert torch.allclose(objective.prior_similarities, torch.ones(4, 1), atol=1e-6)
    terms = objective(out, out, idx, epoch=1)
    # the classifier on both views' features, with the batch's rows of the prior lists
    assert objective.classifier is not None and objective.global_memory is not None
    both, bank = torch.cat([idx, idx]), objective.global_memory.bank
    classifier = objective.classifier

    def gsl_with(lists: list[list[int]]) -> float:
        prior = (torch.tensor(lists), torch.ones(4, 1))
        out = classifier(torch.cat([feats, feats]), both, bank, use_gsl=True, prior=prior)
        return float(out["gsl"].detach())

    want = gsl_with([[2], [3], [2], [3]])
    assert float(terms["gsl"].detach()) == pytest.approx(want, rel=1e-6)
    # (the other images' lists would give another value)
    assert gsl_with([[3], [2], [3], [2]]) != pytest.approx(want, rel=1e-3)
    terms["total"].backward()
    # after the prior epochs, GSL waits for the memory warm-up (10 epochs)
    assert float(objective(out, out, idx, epoch=2)["gsl"].detach()) == 0.0
    with pytest.raises(ValueError, match=r"descriptors of shape \(3, 2\) for 4 training images"):
        objective.set_neighbour_prior(d[:3, 0])


def test_objective_prior_credible_sets_among_other_cameras() -> None:
    # One stripe value per image and stripe, seen as a 2-d whole-image descriptor at angle t:
    # camera 0 holds 0 (0 deg), 1 (10 deg), 2 (180 deg), 3 (190 deg), camera 1 holds 4 (-15 deg)
    # and 5 (165 deg). Each camera's mean is 0, so centring leaves them as they are. Image 0's
    # nearest is 1 (same camera, cos 10 deg); among other cameras it is 4 (cos 15 deg), whose
    # nearest other-camera image is 0.
    angles = torch.tensor([0.0, 10.0, 180.0, 190.0, -15.0, 165.0]).deg2rad()
    d = torch.stack([angles.cos(), angles.sin()], dim=1).unsqueeze(2)  # (6, 2 stripes, 1)
    cameras = (0, 0, 0, 0, 1, 1)
    every = _objective(prior_epochs=1, cameras=cameras)
    every.set_neighbour_prior(d)
    assert every.prior_neighbours[0].tolist() == [1]
    cross = _objective(prior_epochs=1, cameras=cameras, gsl={"neighbours": "other_cameras"})
    cross.set_neighbour_prior(d)
    assert cross.prior_neighbours[0].tolist() == [4]
    assert float(cross.prior_similarities[0, 0]) == pytest.approx(math.cos(math.radians(15)))
    cams = torch.tensor(cameras)
    for i, row in enumerate(cross.prior_neighbours.tolist()):
        assert all(cams[j] != cams[i] for j in row if j >= 0), (i, row)


def test_objective_takes_pedal_neighbours_per_stripe_from_the_prior() -> None:
    objective = _objective(prior_epochs=1, pedal=True, gsl={"prior_epochs": 0})
    patches = F.normalize(torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(0)), dim=2)
    out = ReIDOutput(torch.randn(2, 2), patches.requires_grad_(), None)
    idx = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match=r"loss.pedal.prior_epochs=1 with loss.prior.kind="):
        objective(out, out, idx, epoch=0)
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


def test_objective_pedal_prior_lists_hold_k_others_even_below_cosine_minus_one() -> None:
    # camera 0 holds images 0 and 1, whose centred descriptors are opposite: their float cosine
    # is just below -1 (-1.0000001). Image 2 is alone in camera 1 (a zero row, cosine 0). With
    # k = 2 every image's K_i^p must be the two others, not a -1 pad (which PEDAL cannot index).
    d = torch.tensor([[1.0, 1.0], [10.0, 1.0], [1.0, 0.0]]).unsqueeze(1).repeat(1, 2, 1)
    centred = centre_per_camera(d[:, 0], [0, 0, 1])
    assert float(centred[0] @ centred[1]) < -1.0  # the case this test is about
    objective = _objective(
        prior_epochs=1, pedal=True, cameras=(0, 0, 1), gsl={"prior_epochs": 0}, pedal_neighbours=2
    )
    objective.set_neighbour_prior(d)
    lists = objective.prior_patch_neighbours
    assert lists.shape == (3, 2, 2)
    for i in range(3):
        for p in range(2):
            assert sorted(lists[i, p].tolist()) == [j for j in range(3) if j != i], (i, p)
    assert objective.patch_memory is not None
    patches = F.normalize(torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(1)), dim=2)
    objective.patch_memory.set(torch.arange(3), patches)
    out = ReIDOutput(torch.randn(3, 2), patches.clone().requires_grad_(), None)
    loss = objective(out, out, torch.arange(3), epoch=0)["pedal"]
    # with k = N - 1 every other image is a neighbour: the loss is 0
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)


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
    with pytest.raises(
        ValueError, match=r"neighbours\[0, 0\] holds 0, the image's own index \(indices\[0\]\)"
    ):
        loss(f, torch.tensor([0]), memory, neighbours=torch.tensor([[[0]]]))
    with pytest.raises(ValueError, match=r"neighbours must have shape \(B, P, k\)"):
        loss(f, torch.tensor([0]), memory, neighbours=torch.tensor([[2]]))
    with pytest.raises(IndexError, match="neighbours must lie in"):
        loss(f, torch.tensor([0]), memory, neighbours=torch.tensor([[[3]]]))
