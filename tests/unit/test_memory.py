"""FeatureMemory (update math, renormalisation, duplicates, state_dict) and momentum_at."""

from __future__ import annotations

import math

import pytest
import torch

from reid_core.config import MemoryConfig
from reid_core.objective.memory import FeatureMemory, momentum_at, validate_indices


def _idx(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# update math
# ----------------------------------------------------------------------------------------------


def test_update_is_moving_average_then_renormalised() -> None:
    mem = FeatureMemory(3, 2)
    mem.set(_idx(0), torch.tensor([[1.0, 0.0]]))
    mem.update(_idx(0), torch.tensor([[0.0, 1.0]]), keep=0.75)
    # M_0 = 0.75 [1, 0] + 0.25 [0, 1] = [0.75, 0.25], then / ||.||
    norm = math.sqrt(0.75**2 + 0.25**2)
    expected = torch.tensor([0.75 / norm, 0.25 / norm])
    assert torch.allclose(mem.bank[0], expected, atol=1e-6)
    assert torch.equal(mem.bank[1:], torch.zeros(2, 2))  # untouched slots stay
    assert mem.filled.tolist() == [True, False, False]


def test_update_keep_endpoints() -> None:
    mem = FeatureMemory(2, 2)
    mem.set(_idx(0, 1), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    mem.update(_idx(0), torch.tensor([[0.0, 2.0]]), keep=1.0)  # keep the old value
    mem.update(_idx(1), torch.tensor([[0.0, 2.0]]), keep=0.0)  # overwrite (then renormalise)
    assert torch.allclose(mem.bank, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_rows_are_unit_norm_after_updates() -> None:
    torch.manual_seed(0)
    mem = FeatureMemory(10, 5)
    mem.set(torch.arange(10), torch.randn(10, 5) * 3)
    for _ in range(4):
        mem.update(torch.randint(0, 10, (6,)), torch.randn(6, 5) * 7, keep=0.6)
    assert torch.allclose(mem.bank.norm(dim=1), torch.ones(10), atol=1e-5)


def test_patch_memory_normalised_along_last_dim() -> None:
    mem = FeatureMemory(4, (3, 2))
    feats = torch.tensor([[[3.0, 4.0], [0.0, 2.0], [1.0, 1.0]]])
    mem.set(_idx(2), feats)
    assert torch.allclose(mem.bank[2].norm(dim=-1), torch.ones(3))
    assert torch.allclose(mem.bank[2, 0], torch.tensor([0.6, 0.8]))
    # PAUL's patch memory rule with new-value weight 0.1: m <- 0.9 m + 0.1 f
    mem.update(_idx(2), torch.tensor([[[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]]), keep=0.9)
    raw = 0.9 * torch.tensor([0.6, 0.8]) + 0.1 * torch.tensor([0.0, 1.0])
    assert torch.allclose(mem.bank[2, 0], raw / raw.norm(), atol=1e-6)


def test_unnormalised_memory_first_write_takes_the_value() -> None:
    """Agents (normalize=False): a never-written slot takes f, later writes blend."""
    mem = FeatureMemory(3, 2, normalize=False)
    mem.update(_idx(1), torch.tensor([[2.0, 4.0]]), keep=0.9)
    assert torch.allclose(mem.bank[1], torch.tensor([2.0, 4.0]))
    mem.update(_idx(1), torch.tensor([[12.0, -6.0]]), keep=0.9)
    # 0.9 [2, 4] + 0.1 [12, -6] = [3.0, 3.0], no renormalisation
    assert torch.allclose(mem.bank[1], torch.tensor([3.0, 3.0]))


def test_duplicates_are_averaged_and_order_independent() -> None:
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    results = []
    for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2]):
        mem = FeatureMemory(3, 2)
        mem.set(_idx(1, 0), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        indices = _idx(1, 1, 0)
        mem.update(indices[order], feats[order], keep=0.5)
        results.append(mem.bank.clone())
    for r in results[1:]:
        assert torch.equal(r, results[0])
    # slot 1: mean of [1,0] and [0,1] = [0.5, 0.5]; 0.5 [1,0] + 0.5 [0.5,0.5] = [0.75, 0.25]
    norm = math.sqrt(0.75**2 + 0.25**2)
    assert torch.allclose(results[0][1], torch.tensor([0.75 / norm, 0.25 / norm]), atol=1e-6)
    # slot 0: 0.5 [1,0] + 0.5 [0,1], renormalised
    s = 1 / math.sqrt(2)
    assert torch.allclose(results[0][0], torch.tensor([s, s]), atol=1e-6)


def test_set_with_duplicates_averages() -> None:
    mem = FeatureMemory(2, 2, normalize=False)
    mem.set(_idx(0, 0), torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
    assert torch.allclose(mem.bank[0], torch.tensor([1.0, 2.0]))


def test_update_does_not_track_gradients() -> None:
    mem = FeatureMemory(3, 2)
    f = torch.randn(2, 2, requires_grad=True)
    mem.update(_idx(0, 2), f, keep=0.5)
    assert not mem.bank.requires_grad
    assert mem.bank.grad_fn is None


def test_half_precision_input_is_cast_to_the_bank_dtype() -> None:
    mem = FeatureMemory(2, 2)
    mem.update(_idx(0), torch.tensor([[3.0, 4.0]], dtype=torch.float16), keep=0.5)
    assert mem.bank.dtype == torch.float32
    assert torch.allclose(mem.bank[0], torch.tensor([0.6, 0.8]), atol=1e-3)


# ----------------------------------------------------------------------------------------------
# buffers, state_dict, checks
# ----------------------------------------------------------------------------------------------


def test_state_dict_round_trip() -> None:
    torch.manual_seed(1)
    mem = FeatureMemory(5, (2, 3))
    mem.update(_idx(0, 3), torch.randn(2, 2, 3), keep=0.5)
    state = mem.state_dict()
    assert set(state) == {"bank", "filled"}
    other = FeatureMemory(5, (2, 3))
    other.load_state_dict(state)
    assert torch.equal(other.bank, mem.bank)
    assert torch.equal(other.filled, mem.filled)
    with pytest.raises(RuntimeError, match="size mismatch"):
        FeatureMemory(6, (2, 3)).load_state_dict(state)


def test_buffers_follow_to() -> None:
    mem = FeatureMemory(3, 2).to(torch.float64)
    assert mem.bank.dtype == torch.float64
    assert mem.filled.dtype == torch.bool
    mem.update(_idx(1), torch.tensor([[1.0, 1.0]]), keep=0.5)
    assert mem.bank.dtype == torch.float64


def test_len_and_gather() -> None:
    mem = FeatureMemory(7, 3)
    assert len(mem) == 7
    mem.set(_idx(4), torch.tensor([[0.0, 0.0, 2.0]]))
    assert torch.equal(mem.gather(_idx(4, 0)), torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))


def test_shape_and_index_errors_name_the_problem() -> None:
    mem = FeatureMemory(4, 3)
    with pytest.raises(ValueError, match=r"features has shape \(2, 5\).*\(2, 3\)"):
        mem.update(_idx(0, 1), torch.zeros(2, 5), keep=0.5)
    with pytest.raises(ValueError, match=r"features has shape \(2, 3\).*\(3, 3\)"):
        mem.update(_idx(0, 1, 2), torch.zeros(2, 3), keep=0.5)
    with pytest.raises(IndexError, match=r"\[0, N=4\).*max=4"):
        mem.set(_idx(4), torch.zeros(1, 3))
    with pytest.raises(IndexError, match="min=-1"):
        mem.set(_idx(-1), torch.zeros(1, 3))
    with pytest.raises(TypeError, match="integer"):
        mem.set(torch.tensor([0.0]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="keep"):
        mem.update(_idx(0), torch.zeros(1, 3), keep=1.5)
    with pytest.raises(ValueError, match="1-D"):
        validate_indices(torch.zeros(2, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="num_items"):
        FeatureMemory(0, 3)


# ----------------------------------------------------------------------------------------------
# momentum schedule
# ----------------------------------------------------------------------------------------------


def test_momentum_linear_endpoints_and_midpoint() -> None:
    cfg = MemoryConfig(momentum_schedule="linear", momentum_start=0.5, momentum_end=0.9)
    assert momentum_at(0, 5, cfg) == pytest.approx(0.5)
    assert momentum_at(4, 5, cfg) == pytest.approx(0.9)
    assert momentum_at(2, 5, cfg) == pytest.approx(0.7)
    values = [momentum_at(e, 60, cfg) for e in range(60)]
    assert values == sorted(values)
    assert momentum_at(0, 1, cfg) == pytest.approx(0.5)


def test_momentum_constant() -> None:
    cfg = MemoryConfig(momentum_schedule="constant", momentum_start=0.3, momentum_end=0.9)
    assert momentum_at(0, 10, cfg) == pytest.approx(0.3)
    assert momentum_at(9, 10, cfg) == pytest.approx(0.3)


def test_momentum_rejects_bad_epochs() -> None:
    cfg = MemoryConfig()
    with pytest.raises(ValueError, match="epoch"):
        momentum_at(10, 10, cfg)
    with pytest.raises(ValueError, match="epoch"):
        momentum_at(-1, 10, cfg)
    with pytest.raises(ValueError, match="total_epochs"):
        momentum_at(0, 0, cfg)
