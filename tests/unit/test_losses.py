"""Loss terms on hand-computed cases: L_E, L_GSL (3 weightings), credible neighbours, PEDAL, IPFL.

Expected numbers are written out with ``math`` on scalars, never by calling the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from reid_core.config import GSLConfig, InstanceLossConfig, IPFLConfig, PEDALConfig
from reid_core.objective.losses import (
    IPFLLoss,
    MemoryClassifierLoss,
    PEDALLoss,
    credible_neighbours,
)
from reid_core.objective.losses import memory_classifier as mc_module


def _idx(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# Memory on the unit circle at 0, 30, 50 and 180 degrees:
#   S_01 = cos30 = 0.866, S_02 = cos50 = 0.643, S_12 = cos20 = 0.940, S_03 = -1
ANGLES = (0.0, 30.0, 50.0, 180.0)


def _circle_memory() -> torch.Tensor:
    return torch.tensor([_unit(a) for a in ANGLES])


def _cos(a: float, b: float) -> float:
    return math.cos(math.radians(a - b))


# ----------------------------------------------------------------------------------------------
# memory classifier: L_E
# ----------------------------------------------------------------------------------------------


def test_instance_loss_hand_computed() -> None:
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    feats = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    loss = MemoryClassifierLoss(InstanceLossConfig(temperature=0.5), GSLConfig())
    out = loss(feats, _idx(0, 1), memory, use_gsl=False)
    # sample 0: logits [0.6, 0.8, -0.6] / 0.5 ; sample 1: [0, 1, 0] / 0.5
    l0 = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(1.6) + math.exp(-1.2)))
    l1 = -math.log(math.exp(2.0) / (1.0 + math.exp(2.0) + 1.0))
    assert out["instance"].item() == pytest.approx((l0 + l1) / 2, rel=1e-5)
    assert out["gsl"].item() == 0.0


def test_instance_loss_same_camera_negatives_hand_computed() -> None:
    # slots 0 and 2 were seen by camera 5, slot 1 by camera 7
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    cameras = torch.tensor([5, 7, 5])
    feats = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    loss = MemoryClassifierLoss(
        InstanceLossConfig(temperature=0.5, negatives="same_camera"),
        GSLConfig(threshold=-1.0, topk=2, mutual=False),
    )
    out = loss(feats, _idx(0, 1), memory, use_gsl=True, slot_cameras=cameras)
    # sample 0 (camera 5): logits of slots 0 and 2 only, [0.6, -0.6] / 0.5
    l0 = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(-1.2)))
    # sample 1 (camera 7) is alone in its camera: p = 1
    assert out["instance"].item() == pytest.approx(l0 / 2, rel=1e-5)
    # GSL keeps the softmax over every slot: same value as with negatives="all"
    every = MemoryClassifierLoss(
        InstanceLossConfig(temperature=0.5), GSLConfig(threshold=-1.0, topk=2, mutual=False)
    )
    expected = every(feats, _idx(0, 1), memory, use_gsl=True)["gsl"].item()
    assert out["gsl"].item() == pytest.approx(expected, rel=1e-6)


def test_instance_loss_same_camera_needs_the_slot_cameras() -> None:
    loss = MemoryClassifierLoss(InstanceLossConfig(negatives="same_camera"), GSLConfig())
    memory = _circle_memory()
    feats = torch.tensor([[1.0, 0.0]])
    with pytest.raises(ValueError, match="need the camera of each slot"):
        loss(feats, _idx(0), memory, use_gsl=False)
    with pytest.raises(ValueError, match=r"shape \(3,\) but the memory has 4 slots"):
        loss(feats, _idx(0), memory, use_gsl=False, slot_cameras=torch.tensor([0, 0, 1]))


def test_classifier_gradient_reaches_features_not_memory() -> None:
    torch.manual_seed(0)
    memory = torch.nn.functional.normalize(torch.randn(8, 4), dim=1).requires_grad_(True)
    feats = torch.nn.functional.normalize(torch.randn(3, 4), dim=1).requires_grad_(True)
    cfg = GSLConfig(threshold=-1.0, topk=3, mutual=False)
    for weighting in ("similarity", "uniform", "mmcl_squared"):
        feats.grad = None
        loss = MemoryClassifierLoss(
            InstanceLossConfig(), cfg.model_copy(update={"weighting": weighting})
        )
        out = loss(feats, _idx(0, 4, 7), memory, use_gsl=True)
        assert out["gsl"].item() > 0
        (out["instance"] + out["gsl"]).backward()
        assert feats.grad is not None
        assert feats.grad.abs().sum() > 0
        assert memory.grad is None


def test_classifier_disabled_terms_are_zero_and_backward_safe() -> None:
    memory = _circle_memory()
    feats = torch.tensor([[0.0, 1.0]], requires_grad=True)
    off = MemoryClassifierLoss(InstanceLossConfig(enabled=False), GSLConfig(enabled=False))
    out = off(feats, _idx(0), memory, use_gsl=True)
    assert out["instance"].item() == 0.0
    assert out["gsl"].item() == 0.0
    (out["instance"] + out["gsl"]).backward()
    assert feats.grad is not None
    assert torch.equal(feats.grad, torch.zeros(1, 2))
    # GSL enabled in the config but not yet switched on by the caller (warm-up)
    on = MemoryClassifierLoss(InstanceLossConfig(), GSLConfig(threshold=0.5, mutual=False))
    assert on(feats, _idx(0), memory, use_gsl=False)["gsl"].item() == 0.0
    assert on(feats, _idx(0), memory, use_gsl=True)["gsl"].item() > 0.0


def test_classifier_shape_errors() -> None:
    loss = MemoryClassifierLoss(InstanceLossConfig(), GSLConfig())
    with pytest.raises(
        ValueError, match=r"features has shape \(B, d\)=\(4, 3\) but memory has d=5"
    ):
        loss(torch.zeros(4, 3), _idx(0, 1, 2, 3), torch.zeros(6, 5), use_gsl=False)
    with pytest.raises(ValueError, match="indices has 2 entries but the batch has B=4"):
        loss(torch.zeros(4, 5), _idx(0, 1), torch.zeros(6, 5), use_gsl=False)
    with pytest.raises(IndexError, match="N=6"):
        loss(torch.zeros(1, 5), _idx(6), torch.zeros(6, 5), use_gsl=False)


# ----------------------------------------------------------------------------------------------
# credible neighbours
# ----------------------------------------------------------------------------------------------


def _neighbours(threshold: float, topk: int, mutual: bool, i: int = 0) -> set[int]:
    mask = credible_neighbours(_circle_memory(), _idx(i), threshold, topk, mutual)
    assert mask.shape == (1, 4)
    assert mask.dtype == torch.bool
    return set(torch.nonzero(mask[0]).flatten().tolist())


def test_credible_neighbours_base_case() -> None:
    # i = 0: top-2 of j != 0 is {1 (0.866), 2 (0.643)}, both >= 0.5; never i itself
    assert _neighbours(0.5, 2, mutual=False) == {1, 2}


def test_credible_neighbours_threshold_excludes() -> None:
    # j = 2 is in the top-2 but S_02 = 0.643 < 0.7
    assert _neighbours(0.7, 2, mutual=False) == {1}


def test_credible_neighbours_topk_excludes() -> None:
    # j = 2 passes the threshold but is not in the top-1
    assert _neighbours(0.5, 1, mutual=False) == {1}


def test_credible_neighbours_mutual_excludes() -> None:
    # top-1 of 0 is 1, but top-1 of 1 is 2 (S_12 = 0.94 > S_10 = 0.866): not mutual
    assert _neighbours(0.5, 1, mutual=True) == set()
    # with k = 2: top-2 of 1 = {0, 2}, top-2 of 2 = {1, 0}: both mutual
    assert _neighbours(0.5, 2, mutual=True) == {1, 2}
    # i = 2: top-1 is 1, and the top-1 of 1 is 2: mutual
    assert _neighbours(0.5, 1, mutual=True, i=2) == {1}


def _brute_force_mask(
    memory: torch.Tensor, indices: torch.Tensor, threshold: float, k: int, mutual: bool
) -> torch.Tensor:
    n = memory.shape[0]
    sim = (memory @ memory.T).tolist()
    top = []
    for a in range(n):
        order = sorted((j for j in range(n) if j != a), key=lambda j: -sim[a][j])
        top.append(set(order[:k]))
    mask = torch.zeros(len(indices), n, dtype=torch.bool)
    for b, i in enumerate(indices.tolist()):
        for j in range(n):
            ok = j != i and sim[i][j] >= threshold and j in top[i]
            if mutual:
                ok = ok and i in top[j]
            mask[b, j] = ok
    return mask


def test_credible_neighbours_among_other_cameras_only() -> None:
    # slots 0, 1 seen by camera 0 and slots 2, 3 by camera 1 (S_01 = 0.87, S_02 = 0.64, S_12 = 0.94)
    cams = torch.tensor([0, 0, 1, 1])

    def c0(topk: int, mutual: bool, cameras: torch.Tensor | None) -> set[int]:
        mask = credible_neighbours(_circle_memory(), _idx(0), 0.5, topk, mutual, cameras)
        return {int(j) for j in mask[0].nonzero().flatten()}

    assert c0(1, False, None) == {1}
    assert c0(1, False, cams) == {2}  # slot 1 has the same camera
    # mutual: among camera-0 slots, 2's nearest is 1 (0.94), then 0 (0.64)
    assert c0(1, True, cams) == set()
    assert c0(2, True, cams) == {2}


def test_gsl_other_cameras_pulls_the_cross_camera_neighbour() -> None:
    cams = torch.tensor([0, 0, 1, 1])
    feats = torch.tensor([_unit(10.0)])
    gsl = GSLConfig(threshold=0.5, topk=1, mutual=False, neighbours="other_cameras")
    loss = MemoryClassifierLoss(InstanceLossConfig(temperature=0.5), gsl)
    out = loss(feats, _idx(0), _circle_memory(), use_gsl=True, slot_cameras=cams)
    # C_0 = {2} (weight 1): L_GSL = -log p_02 over every slot
    logits = [_cos(10.0, a) / 0.5 for a in ANGLES]
    expected = -(logits[2] - math.log(sum(math.exp(v) for v in logits)))
    assert out["gsl"].item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="need the camera of each slot"):
        loss(feats, _idx(0), _circle_memory(), use_gsl=True)


@pytest.mark.parametrize("mutual", [False, True])
def test_credible_neighbours_chunked_matches_brute_force(
    monkeypatch: pytest.MonkeyPatch, mutual: bool
) -> None:
    torch.manual_seed(3)
    memory = torch.nn.functional.normalize(torch.randn(40, 6, dtype=torch.float64), dim=1)
    memory = memory.float()
    indices = _idx(0, 5, 5, 17, 39, 22)
    monkeypatch.setattr(mc_module, "_MAX_CHUNK_ELEMENTS", 40 * 3)  # 3 candidate rows per chunk
    got = credible_neighbours(memory, indices, 0.1, 5, mutual)
    assert torch.equal(got, _brute_force_mask(memory, indices, 0.1, 5, mutual))
    assert got.any()


def test_credible_neighbours_small_memory() -> None:
    memory = torch.tensor([[1.0, 0.0]])
    assert not credible_neighbours(memory, _idx(0), 0.0, 10, True).any()
    # topk larger than N - 1 is capped
    two = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert credible_neighbours(two, _idx(0), 0.5, 10, True).tolist() == [[False, True]]


# ----------------------------------------------------------------------------------------------
# GSL: the three weightings
# ----------------------------------------------------------------------------------------------


def _gsl(weighting: str, feats: torch.Tensor, indices: torch.Tensor, tau: float = 0.5) -> float:
    loss = MemoryClassifierLoss(
        InstanceLossConfig(temperature=tau),
        GSLConfig(threshold=0.5, topk=2, mutual=False, weighting=weighting),
    )
    return loss(feats, indices, _circle_memory(), use_gsl=True)["gsl"].item()


def _log_p(f_deg: float, j: int, tau: float = 0.5) -> float:
    """log p_ij for a unit feature at angle f_deg against the circle memory."""
    logits = [_cos(f_deg, a) / tau for a in ANGLES]
    return logits[j] - math.log(sum(math.exp(z) for z in logits))


def test_gsl_similarity_weighting_hand_computed() -> None:
    # i = 0, f at 90 degrees; C_0 = {1, 2}, w = S / (S_01 + S_02)
    s01, s02 = _cos(0, 30), _cos(0, 50)
    expected = -(s01 * _log_p(90, 1) + s02 * _log_p(90, 2)) / (s01 + s02)
    assert _gsl("similarity", torch.tensor([_unit(90)]), _idx(0)) == pytest.approx(expected, 1e-5)


def test_gsl_uniform_weighting_hand_computed() -> None:
    expected = -(_log_p(90, 1) + _log_p(90, 2)) / 2
    assert _gsl("uniform", torch.tensor([_unit(90)]), _idx(0)) == pytest.approx(expected, 1e-5)


def test_gsl_empty_neighbour_set_counts_as_zero_in_the_batch_mean() -> None:
    # i = 3 (180 degrees) has no neighbour with S >= 0.5: contributes 0, mean over B = 2
    s01, s02 = _cos(0, 30), _cos(0, 50)
    row0 = -(s01 * _log_p(90, 1) + s02 * _log_p(90, 2)) / (s01 + s02)
    feats = torch.tensor([_unit(90), _unit(90)])
    assert _gsl("similarity", feats, _idx(0, 3)) == pytest.approx(row0 / 2, rel=1e-5)


def test_gsl_mmcl_squared_hand_computed() -> None:
    # i = 0, f at 90 deg: cosine scores s = [0, sin30, sin50, 0]; positives {0, 1, 2};
    # negatives {3}: max(1, floor(0.01 * 1)) = 1 hard negative (score 0, target -1); delta = 5
    s = [_cos(90, a) for a in ANGLES]
    pos = ((1 - s[0]) ** 2 + (1 - s[1]) ** 2 + (1 - s[2]) ** 2) / 3
    expected = 5.0 * pos + (1 + s[3]) ** 2
    assert _gsl("mmcl_squared", torch.tensor([_unit(90)]), _idx(0)) == pytest.approx(expected, 1e-5)


def test_gsl_mmcl_squared_picks_the_hardest_negatives() -> None:
    # N = 5 on the circle, only i itself positive (threshold 1.0), ratio 0.5: floor(0.5 * 4) = 2
    angles = [0.0, 100.0, 140.0, 200.0, 260.0]
    memory = torch.tensor([_unit(a) for a in angles])
    loss = MemoryClassifierLoss(
        InstanceLossConfig(),
        GSLConfig(threshold=1.0, weighting="mmcl_squared"),
        mmcl_delta=2.0,
        mmcl_hard_ratio=0.5,
    )
    f_deg = 80.0
    scores = [_cos(f_deg, a) for a in angles]
    hard = sorted(scores[1:], reverse=True)[:2]
    expected = 2.0 * (1 - scores[0]) ** 2 + sum((1 + h) ** 2 for h in hard) / 2
    got = loss(torch.tensor([_unit(f_deg)]), _idx(0), memory, use_gsl=True)["gsl"].item()
    assert got == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# PEDAL
# ----------------------------------------------------------------------------------------------


def _pedal_case() -> tuple[torch.Tensor, torch.Tensor]:
    # B = 1 (image 0), P = 2, D = 2, N = 3
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    memory = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0]],  # j = 0 = i: identical (d = 0), must be excluded
            [[0.0, 1.0], [0.6, 0.8]],  # patch 0: d = 2 ; patch 1: d = 0.36 + 0.04 = 0.4
            [[-1.0, 0.0], [0.0, -1.0]],  # patch 0: d = 4 ; patch 1: d = 4
        ]
    )
    return feats, memory


def test_pedal_hand_computed() -> None:
    feats, memory = _pedal_case()
    s = 2.0
    loss = PEDALLoss(PEDALConfig(scale=s, neighbours=1))(feats, _idx(0), memory)
    # patch 0: K = {1}: -log(e^{-2s} / (e^{-2s} + e^{-4s}))
    p0 = -math.log(math.exp(-2 * s) / (math.exp(-2 * s) + math.exp(-4 * s)))
    # patch 1: K = {1}: -log(e^{-0.4s} / (e^{-0.4s} + e^{-4s}))
    p1 = -math.log(math.exp(-0.4 * s) / (math.exp(-0.4 * s) + math.exp(-4 * s)))
    assert loss.item() == pytest.approx((p0 + p1) / 2, rel=1e-5)


def test_pedal_excludes_the_image_itself() -> None:
    feats, memory = _pedal_case()
    pedal = PEDALLoss(PEDALConfig(scale=2.0, neighbours=1))
    base = pedal(feats, _idx(0), memory).item()
    moved = memory.clone()
    moved[0] = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # slot i changes: the loss must not
    assert pedal(feats, _idx(0), moved).item() == pytest.approx(base, rel=1e-6)
    # the same slot counts when it belongs to another image (i = 1)
    assert pedal(feats, _idx(1), memory).item() != pytest.approx(base, rel=1e-3)


def test_pedal_all_neighbours_gives_zero_and_gradients() -> None:
    feats, memory = _pedal_case()
    feats = feats.clone().requires_grad_(True)
    memory = memory.clone().requires_grad_(True)
    assert PEDALLoss(PEDALConfig(neighbours=5))(feats, _idx(0), memory).item() == pytest.approx(0.0)
    loss = PEDALLoss(PEDALConfig(scale=2.0, neighbours=1))(feats, _idx(0), memory)
    loss.backward()
    assert feats.grad is not None
    assert feats.grad.abs().sum() > 0
    assert memory.grad is None


def test_pedal_disabled_and_shape_errors() -> None:
    feats, memory = _pedal_case()
    feats = feats.clone().requires_grad_(True)
    zero = PEDALLoss(PEDALConfig(enabled=False))(feats, _idx(0), memory)
    assert zero.item() == 0.0
    zero.backward()
    with pytest.raises(ValueError, match=r"\(B, P, D\)=\(1, 2, 2\) but patch_memory has"):
        PEDALLoss(PEDALConfig())(feats, _idx(0), torch.zeros(3, 2, 5))


# ----------------------------------------------------------------------------------------------
# IPFL
# ----------------------------------------------------------------------------------------------


def _point(x: float) -> list[float]:
    return [x, 0.0]


def _ipfl_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Agents on a line. Batch images (slots) 4, 1, 3, 0 have agents at 0, 1, 5, 6; slot 2
    (at 0.5) and slot 5 (at 5.5) are not in the batch, so never candidates nor neighbours.
    Nearest other batch agent: 0 <-> 1 and 5 <-> 6."""
    agents = torch.tensor([_point(v) for v in (6.0, 1.0, 0.5, 5.0, 0.0, 5.5)])
    indices = _idx(4, 1, 3, 0)
    emb = torch.tensor([[_point(0.4), _point(1.2), _point(5.5), _point(6.3)]])  # V = 1
    return emb, indices, agents


def test_ipfl_hand_computed_with_cycle_ranking() -> None:
    emb, indices, agents = _ipfl_case()
    loss = IPFLLoss(IPFLConfig(margin=5.0, cycle_k=1, max_candidates=15))(emb, indices, agents)
    # x=0.4 (agent 0): d_pos .4; candidate 1 (d .6) rejected (its nearest is 0); 5 passes: 4.6
    # x=1.2 (agent 1): d_pos .2; candidate 0 rejected; 5 passes: d_neg 3.8
    # x=5.5 (agent 5): d_pos .5; candidate 6 rejected; 1 passes: d_neg 4.5
    # x=6.3 (agent 6): d_pos .3; candidate 5 rejected; 1 passes: d_neg 5.3
    hinges = [5 + 0.4 - 4.6, 5 + 0.2 - 3.8, 5 + 0.5 - 4.5, max(0.0, 5 + 0.3 - 5.3)]
    assert loss.item() == pytest.approx(sum(hinges) / 4, abs=1e-5)


def test_ipfl_cycle_ranking_rejects_and_skips() -> None:
    """With one candidate allowed, every nearest candidate has the anchor's image among its
    cycle_k = 1 nearest agents: all are rejected and the samples are skipped (loss 0)."""
    emb, indices, agents = _ipfl_case()
    emb = emb.clone().requires_grad_(True)
    loss = IPFLLoss(IPFLConfig(margin=5.0, cycle_k=1, max_candidates=1))(emb, indices, agents)
    assert loss.item() == 0.0
    loss.backward()  # still connected to the graph


def test_ipfl_cycle_ranking_accepts_when_the_anchor_is_not_a_near_agent() -> None:
    # batch agents at 0 (slot 4), 1 (slot 1) and 1.6 (slot 2); max_candidates = 1, cycle_k = 1
    agents = torch.tensor([_point(v) for v in (6.0, 1.0, 1.6, 5.0, 0.0, 5.5)])
    emb = torch.tensor([[_point(0.4), _point(1.2), _point(1.6)]])
    got = IPFLLoss(IPFLConfig(margin=5.0, cycle_k=1, max_candidates=1))(emb, _idx(4, 1, 2), agents)
    # x=0.4: candidate 1 (d .6); the nearest other agent of 1 is 1.6, not 0: accepted -> 4.8
    # x=1.2: candidate 1.6 (d .4); the nearest other agent of 1.6 is 1: rejected, skipped
    # x=1.6: candidate 1 (d .6); the nearest other agent of 1 is 1.6: rejected, skipped
    assert got.item() == pytest.approx((5 + 0.4 - 0.6) / 3, abs=1e-5)


def test_ipfl_cluster_mates_are_no_negatives() -> None:
    # the case above with pseudo labels: slots 4 and 1 (agents 0 and 1) are one cluster
    agents = torch.tensor([_point(v) for v in (6.0, 1.0, 1.6, 5.0, 0.0, 5.5)])
    emb = torch.tensor([[_point(0.4), _point(1.2), _point(1.6)]])
    loss = IPFLLoss(IPFLConfig(margin=5.0, cycle_k=1, max_candidates=1))
    got = loss(emb, _idx(4, 1, 2), agents, labels=_idx(3, 3, -1))
    # x=0.4: its cluster mate 1 is no candidate; 1.6 (d 1.2), whose nearest other agent is 1,
    #        not 0: accepted -> 4.2
    # x=1.2: 0 is no candidate; 1.6 (d .4) rejected (its nearest is 1): skipped
    # x=1.6 (outside every cluster): candidate 1 (d .6) rejected as before: skipped
    assert got.item() == pytest.approx((5 + 0.4 - 1.2) / 3, abs=1e-5)
    # images outside every cluster (-1) are not one cluster: the paper's rule
    no_clusters = loss(emb, _idx(4, 1, 2), agents, labels=_idx(-1, -1, -1))
    assert no_clusters.item() == pytest.approx(loss(emb, _idx(4, 1, 2), agents).item())
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        loss(emb, _idx(4, 1, 2), agents, labels=_idx(3, 3))


def test_ipfl_two_views_as_tensor_or_list() -> None:
    emb, indices, agents = _ipfl_case()
    view1 = torch.tensor([_point(-0.2), _point(1.0), _point(4.9), _point(6.0)])
    cfg = IPFLConfig(margin=5.0, cycle_k=1)
    stacked = IPFLLoss(cfg)(torch.stack([emb[0], view1]), indices, agents)
    listed = IPFLLoss(cfg)([emb[0], view1], indices, agents)
    assert stacked.item() == pytest.approx(listed.item())
    # view 1: x=-0.2: d_pos .2, d_neg 5.2 -> 0; x=1.0: d_pos 0, d_neg(5) 4 -> 1;
    #         x=4.9: d_pos .1, d_neg(1) 3.9 -> 1.2; x=6.0: d_pos 0, d_neg(1) 5 -> 0
    view0 = [5 + 0.4 - 4.6, 5 + 0.2 - 3.8, 5 + 0.5 - 4.5, 0.0]
    view1_h = [0.0, 5 + 0.0 - 4.0, 5 + 0.1 - 3.9, 0.0]
    assert stacked.item() == pytest.approx((sum(view0) + sum(view1_h)) / 8, abs=1e-5)


def test_ipfl_gradient_reaches_embeddings_not_agents() -> None:
    emb, indices, agents = _ipfl_case()
    emb = emb.clone().requires_grad_(True)
    agents = agents.clone().requires_grad_(True)
    IPFLLoss(IPFLConfig(margin=5.0, cycle_k=1))(emb, indices, agents).backward()
    assert emb.grad is not None
    assert emb.grad.abs().sum() > 0
    assert agents.grad is None


def test_ipfl_duplicate_index_is_never_its_own_negative() -> None:
    # slots 0, 0, 1, 2 with agents at 0, 8, 20; nearest other image: 0 -> 1, 1 -> 0, 2 -> 1
    agents = torch.tensor([_point(0.0), _point(8.0), _point(20.0)])
    emb = torch.tensor([[_point(0.1), _point(0.2), _point(8.5), _point(19.0)]])
    loss = IPFLLoss(IPFLConfig(margin=20.0, cycle_k=1))(emb, _idx(0, 0, 1, 2), agents)
    # x=0.1: the duplicate slot 0 is not a candidate; 8 rejected (its nearest is 0); 20 passes
    # x=0.2: same, d_neg 19.8;  x=8.5: both copies of 0 rejected (nearest of 0 is 8), 20
    # rejected (nearest of 20 is 8): skipped;  x=19: candidate 8 (nearest 0, not 20) passes
    hinges = [20 + 0.1 - 19.9, 20 + 0.2 - 19.8, 0.0, 20 + 1.0 - 11.0]
    assert loss.item() == pytest.approx(sum(hinges) / 4, abs=1e-4)


def test_ipfl_disabled_small_batch_and_shape_errors() -> None:
    emb, indices, agents = _ipfl_case()
    emb = emb.clone().requires_grad_(True)
    off = IPFLLoss(IPFLConfig(enabled=False))(emb, indices, agents)
    assert off.item() == 0.0
    off.backward()
    assert IPFLLoss(IPFLConfig())(emb[:, :1], indices[:1], agents).item() == 0.0
    with pytest.raises(ValueError, match=r"\(V, B, E\)=\(1, 4, 2\) but agents have E=3"):
        IPFLLoss(IPFLConfig())(emb, indices, torch.zeros(6, 3))
    with pytest.raises(ValueError, match="same shape"):
        IPFLLoss(IPFLConfig())([torch.zeros(4, 2), torch.zeros(3, 2)], indices, agents)


# ----------------------------------------------------------------------------------------------
# warm-ups of the patch terms (DualBranchObjective)
# ----------------------------------------------------------------------------------------------


def _objective_and_outputs(
    pedal_warmup: int, ipfl_warmup: int, **loss: dict[str, object]
) -> tuple[object, object, object, torch.Tensor]:
    from types import SimpleNamespace

    from reid_core.config import ExperimentConfig
    from reid_core.models.reid_model import ReIDOutput
    from reid_core.objective.dual_branch import DualBranchObjective

    cfg = ExperimentConfig.model_validate(
        {
            "model": {"num_patches": 2, "patch_dim": 8, "ipfl_dim": 4},
            "loss": {
                "instance": {"enabled": False},
                "gsl": {"enabled": False},
                "pedal": {"warmup_epochs": pedal_warmup, "neighbours": 2},
                "ipfl": {"warmup_epochs": ipfl_warmup},
            }
            | loss,
        }
    )
    fake_model = SimpleNamespace(global_dim=5, with_patch_branch=True, cfg=cfg.model)
    objective = DualBranchObjective(cfg, 8, fake_model)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    assert objective.patch_memory is not None and objective.agents is not None
    objective.patch_memory.set(
        torch.arange(8), torch.nn.functional.normalize(torch.randn(8, 2, 8, generator=g), dim=2)
    )
    objective.agents.set(torch.arange(8), torch.randn(8, 8, generator=g))

    def output() -> ReIDOutput:
        patches = torch.nn.functional.normalize(torch.randn(4, 2, 8, generator=g), dim=2)
        emb = torch.randn(4, 8, generator=g)
        return ReIDOutput(
            torch.randn(4, 5, generator=g), patches.requires_grad_(), emb.requires_grad_()
        )

    return objective, output(), output(), torch.arange(4)


def test_patch_terms_are_zero_during_their_warmup_but_memories_move() -> None:
    objective, out0, out1, idx = _objective_and_outputs(pedal_warmup=2, ipfl_warmup=3)
    before_patch = objective.patch_memory.bank.clone()  # type: ignore[attr-defined]
    before_agents = objective.agents.bank.clone()  # type: ignore[attr-defined]
    terms = objective(out0, out1, idx, epoch=1)  # type: ignore[operator]
    assert float(terms["pedal"].detach()) == 0.0 and float(terms["ipfl"].detach()) == 0.0
    terms["total"].backward()  # connected to the graph
    assert not torch.equal(objective.patch_memory.bank, before_patch)  # type: ignore[attr-defined]
    assert not torch.equal(objective.agents.bank, before_agents)  # type: ignore[attr-defined]


def test_patch_terms_start_after_their_warmup() -> None:
    objective, out0, out1, idx = _objective_and_outputs(pedal_warmup=2, ipfl_warmup=3)
    at2 = objective(out0, out1, idx, epoch=2)  # type: ignore[operator]
    assert float(at2["pedal"].detach()) > 0.0 and float(at2["ipfl"].detach()) == 0.0
    objective, out0, out1, idx = _objective_and_outputs(pedal_warmup=0, ipfl_warmup=0)
    at0 = objective(out0, out1, idx, epoch=0)  # type: ignore[operator]
    assert float(at0["pedal"].detach()) > 0.0
    assert set(at0) == {"pedal", "ipfl", "total"}


def test_ipfl_takes_the_pseudo_labels_with_other_cluster_negatives() -> None:
    objective, out0, out1, idx = _objective_and_outputs(
        0,
        0,
        objective="cluster_contrast",  # type: ignore[arg-type]
        ipfl={"negatives": "other_clusters", "margin": 50.0, "cycle_k": 1},
        cluster={"weight": 0.0},
    )
    labels = torch.tensor([0, 0, 1, 1, -1, -1, 2, 2])
    objective.clusters.relabel(torch.randn(8, 5), labels)  # type: ignore[attr-defined]
    got = objective(out0, out1, idx, epoch=0)["ipfl"]  # type: ignore[operator]
    emb = torch.stack([out0.embeddings, out1.embeddings]).float()  # type: ignore[attr-defined]
    bank = objective.agents.bank  # type: ignore[attr-defined]
    want = objective.ipfl(emb, idx, bank, labels=labels[idx])  # type: ignore[attr-defined]
    assert got.item() == pytest.approx(want.item())
    assert got.item() != pytest.approx(objective.ipfl(emb, idx, bank).item())  # type: ignore[attr-defined]
