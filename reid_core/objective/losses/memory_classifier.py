r"""Global branch: memory-based non-parametric classifier (L_E) and global similarity loss (L_GSL).

Symbols: ``f_i`` (d,) the L2-normalised global feature of image ``i`` in the batch, ``M`` (N, d)
the memory (one slot per training image, :class:`reid_core.objective.memory.FeatureMemory`), ``tau`` the
temperature (``InstanceLossConfig.temperature``, 0.05).

Memory classifier (MMCL-like, Wang & Zhang CVPR 2020)::

    p_ij = exp(M_j . f_i / tau) / sum_{n=1..N} exp(M_n . f_i / tau)
    L_E  = (1/B) sum_i  -log p_ii

With ``InstanceLossConfig.negatives = "same_camera"`` the softmax of ``L_E`` runs over the slots
of the image's own camera only (``cam`` the camera of each slot; unknown cameras are one group)::

    p^cam_ii = exp(M_i . f_i / tau) / sum_{n: cam_n = cam_i} exp(M_n . f_i / tau)

so a feature that only tells the cameras apart cannot lower ``L_E``; GSL keeps the full softmax.

Credible neighbours, from memory similarities only (``S = M M^T``, never formed as N x N)::

    C_i = { j != i :  S_ij >= t,  j in topk_i(S),  [mutual]  i in topk_j(S) }

with ``t = GSLConfig.threshold`` (0.6) and ``k = GSLConfig.topk`` (10); ``topk_i`` excludes ``i``.
With ``GSLConfig.neighbours = "other_cameras"`` both top-k lists run over the slots of other
cameras only (``cam_j != cam_i``), so C_i holds only the cross-camera pairs that re-ID has to
match; an image of unknown camera then has no credible neighbour among the unknown ones.

With a neighbour prior (``LossConfig.prior``, in the first ``GSLConfig.prior_epochs`` epochs of a
run from scratch) the credible sets come from fixed lists instead: :func:`credible_neighbour_lists`
applies the same rule once to hand-crafted descriptors ``h`` (``S^h = h h^T`` in place of ``S``),
and the weights below use ``S^h``.

Global similarity loss, ``GSLConfig.weighting``:

* ``"similarity"`` (default):  ``w_ij = S_ij / sum_{n in C_i} S_in``  (j in C_i; similarities are
  clamped at 0 first, which only matters for ``t < 0``; a row whose clamped weights sum to 0 falls
  back to uniform), ``L_GSL = (1/B) sum_i -sum_{j in C_i} w_ij log p_ij``.
* ``"uniform"``: ``w_ij = 1 / |C_i|``, same formula.
* ``"mmcl_squared"``: MMCL's memory-based multi-label classification loss, a squared error on the
  (un-tempered) cosine scores ``s_ij = M_j . f_i`` with positives ``P_i = {i} u C_i`` (target +1)
  and hard negatives ``H_i`` = the ``max(1, floor(r |N_i|))`` highest-scoring non-positives
  (target -1, as in MMCL's ``y in {-1, +1}``; selection without gradient)::

      L_GSL = (1/B) sum_i [ delta/|P_i| sum_{j in P_i} (1 - s_ij)^2
                           +    1/|H_i| sum_{j in H_i} (1 + s_ij)^2 ]

  with MMCL's ``delta = 5`` and ``r = 0.01`` (constructor arguments ``mmcl_delta`` and
  ``mmcl_hard_ratio``; not in the config). Here every sample contributes (``P_i`` always holds
  ``i``), as in MMCL.

For ``"similarity"``/``"uniform"``, samples with an empty ``C_i`` contribute 0 and the average is
over **all** B samples of the batch (so the loss scale does not jump with the number of non-empty
rows).

The memory is read without gradient: gradients reach ``f`` only. The losses are returned
unweighted; the caller applies ``InstanceLossConfig.weight`` / ``GSLConfig.weight`` and turns GSL on
after ``GSLConfig.warmup_epochs`` through ``use_gsl``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reid_core.config import GSLConfig, InstanceLossConfig
from reid_core.objective.memory import validate_indices

__all__ = ["MemoryClassifierLoss", "credible_neighbour_lists", "credible_neighbours"]

# Rows of M[cand] @ M^T computed at once in the mutual check: at most ~16M similarities.
_MAX_CHUNK_ELEMENTS = 1 << 24


def _zero_like_graph(x: torch.Tensor) -> torch.Tensor:
    """A float32 scalar 0 connected to ``x``'s graph (backward works, gradient is 0)."""
    return x.float().sum() * 0.0


def _check_memory_and_features(features: torch.Tensor, memory: torch.Tensor) -> None:
    if features.dim() != 2:
        raise ValueError(f"features must have shape (B, d), got {tuple(features.shape)}")
    if memory.dim() != 2:
        raise ValueError(f"memory must have shape (N, d), got {tuple(memory.shape)}")
    if features.shape[1] != memory.shape[1]:
        raise ValueError(
            f"features has shape (B, d)={tuple(features.shape)} but memory has "
            f"d={memory.shape[1]} (memory shape {tuple(memory.shape)})"
        )


def _credible_from_similarity(
    sim: torch.Tensor,
    memory: torch.Tensor,
    indices: torch.Tensor,
    threshold: float,
    topk: int,
    mutual: bool,
    slot_cameras: torch.Tensor | None = None,
) -> torch.Tensor:
    """Credible-neighbour mask from the precomputed rows ``sim = M[indices] @ M^T`` (B, N);
    with ``slot_cameras`` (N,), only slots of another camera are candidates."""
    B, N = sim.shape
    mask = torch.zeros((B, N), dtype=torch.bool, device=sim.device)
    if B == 0 or N < 2:
        return mask
    k = min(int(topk), N - 1)
    rows = torch.arange(B, device=sim.device)
    sim = sim.clone()
    sim[rows, indices] = float("-inf")  # j != i
    if slot_cameras is not None:
        same = slot_cameras[None, :] == slot_cameras[indices][:, None]
        sim.masked_fill_(same, float("-inf"))
    top = sim.topk(k, dim=1).indices
    mask.scatter_(1, top, True)
    mask &= sim >= threshold  # -inf (self) never passes
    if not mutual or not bool(mask.any()):
        return mask
    # Mutual check: i must be among the k nearest (excluding j) of each candidate j.
    b_idx, j_idx = mask.nonzero(as_tuple=True)
    cand, inverse = torch.unique(j_idx, sorted=True, return_inverse=True)
    cand_top = torch.empty((cand.numel(), k), dtype=torch.long, device=sim.device)
    chunk = max(1, _MAX_CHUNK_ELEMENTS // N)
    for start in range(0, cand.numel(), chunk):
        c = cand[start : start + chunk]
        s = memory.index_select(0, c) @ memory.T  # (chunk, N)
        s[torch.arange(c.numel(), device=s.device), c] = float("-inf")
        if slot_cameras is not None:
            s.masked_fill_(slot_cameras[None, :] == slot_cameras[c][:, None], float("-inf"))
        cand_top[start : start + chunk] = s.topk(k, dim=1).indices
    is_mutual = (cand_top[inverse] == indices[b_idx].unsqueeze(1)).any(dim=1)
    mask[b_idx[~is_mutual], j_idx[~is_mutual]] = False
    return mask


@torch.no_grad()
def credible_neighbours(
    memory: torch.Tensor,
    indices: torch.Tensor,
    threshold: float,
    topk: int,
    mutual: bool,
    slot_cameras: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask (B, N): ``mask[b, j]`` iff ``j`` is in ``C_i`` for ``i = indices[b]``.

    ``C_i = { j != i : S_ij >= threshold, j in topk_i(S), (mutual) i in topk_j(S) }`` with
    ``S = M M^T`` (``topk_i`` over ``j != i``; ``k`` is capped at ``N - 1``). Computed from the
    rows ``M[indices] @ M^T`` (B, N); the mutual check takes the top-k of the candidate rows
    ``M[cand] @ M^T`` in chunks, never an N x N matrix. With ``slot_cameras`` (N,), the camera
    of each slot, every top-k runs over the slots of other cameras only.
    """
    if memory.dim() != 2:
        raise ValueError(f"memory must have shape (N, d), got {tuple(memory.shape)}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    idx = validate_indices(indices, memory.shape[0]).to(memory.device)
    mem = memory.detach().float()
    sim = mem.index_select(0, idx) @ mem.T
    cams = None if slot_cameras is None else slot_cameras.to(mem.device)
    return _credible_from_similarity(sim, mem, idx, threshold, topk, mutual, cams)


@torch.no_grad()
def credible_neighbour_lists(
    bank: torch.Tensor,
    threshold: float,
    topk: int,
    mutual: bool = True,
    chunk_rows: int = 1024,
    slot_cameras: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's credible set ``C_i`` over ``bank`` (N, d), as lists.

    Returns ``(neighbours, similarities)``, both (N, k) with ``k = min(topk, N - 1)``: row ``i``
    holds the members of ``C_i`` (:func:`credible_neighbours`, with ``slot_cameras``: among other
    cameras only), most similar first, padded with -1 (and similarity 0). Computed
    ``chunk_rows`` rows at a time, never as an N x N matrix.
    """
    if bank.dim() != 2:
        raise ValueError(f"bank must have shape (N, d), got {tuple(bank.shape)}")
    n = bank.shape[0]
    k = max(0, min(int(topk), n - 1))
    neighbours = torch.full((n, k), -1, dtype=torch.long, device=bank.device)
    similarities = torch.zeros((n, k), dtype=torch.float32, device=bank.device)
    if k == 0:
        return neighbours, similarities
    bank = bank.detach().float()
    cams = None if slot_cameras is None else slot_cameras.to(bank.device)
    for start in range(0, n, chunk_rows):
        idx = torch.arange(start, min(n, start + chunk_rows), device=bank.device)
        sim = bank.index_select(0, idx) @ bank.T  # (chunk, N), once for the mask and the lists
        mask = _credible_from_similarity(sim, bank, idx, threshold, topk, mutual, cams)
        top_sim, top_idx = sim.masked_fill(~mask, float("-inf")).topk(k, dim=1)
        valid = torch.isfinite(top_sim)
        neighbours[idx] = torch.where(valid, top_idx, -1)
        similarities[idx] = torch.where(valid, top_sim, 0.0)
    return neighbours, similarities


def _dense_neighbours(
    neighbours: torch.Tensor, similarities: torch.Tensor, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) lists padded with -1 -> a (B, N) mask and the (B, N) similarities (0 elsewhere)."""
    b = neighbours.shape[0]
    valid = neighbours >= 0
    # padding goes to an extra column N, cut off afterwards
    cols = torch.where(valid, neighbours, num_slots)
    mask = torch.zeros((b, num_slots + 1), dtype=torch.bool, device=neighbours.device)
    mask.scatter_(1, cols, valid)
    sim = torch.zeros((b, num_slots + 1), dtype=torch.float32, device=neighbours.device)
    sim.scatter_(1, cols, torch.where(valid, similarities.float(), 0.0))
    return mask[:, :num_slots], sim[:, :num_slots]


class MemoryClassifierLoss(nn.Module):
    """``L_E`` and ``L_GSL`` of the global branch (see the module docstring for the formulas)."""

    def __init__(
        self,
        instance_cfg: InstanceLossConfig,
        gsl_cfg: GSLConfig,
        *,
        mmcl_delta: float = 5.0,
        mmcl_hard_ratio: float = 0.01,
    ) -> None:
        super().__init__()
        if mmcl_delta < 0:
            raise ValueError(f"mmcl_delta must be >= 0, got {mmcl_delta}")
        if not 0.0 <= mmcl_hard_ratio <= 1.0:
            raise ValueError(f"mmcl_hard_ratio must be in [0, 1], got {mmcl_hard_ratio}")
        self.instance_cfg = instance_cfg
        self.gsl_cfg = gsl_cfg
        self.mmcl_delta = float(mmcl_delta)
        self.mmcl_hard_ratio = float(mmcl_hard_ratio)

    def forward(
        self,
        features: torch.Tensor,
        indices: torch.Tensor,
        memory: torch.Tensor,
        use_gsl: bool,
        slot_cameras: torch.Tensor | None = None,
        prior: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``features`` (B, d), ``indices`` (B,) into ``memory`` (N, d); returns unweighted
        ``{"instance": L_E, "gsl": L_GSL}`` (float32 scalars; a disabled term is a 0 that is
        still connected to ``features``). ``slot_cameras`` (N,), the camera of each slot, is
        required by ``negatives = "same_camera"`` and ``neighbours = "other_cameras"``.
        ``prior``: the batch's rows of :func:`credible_neighbour_lists` ``(neighbours,
        similarities)``, each (B, k); when given, GSL's credible sets and weights come from
        them instead of the memory."""
        _check_memory_and_features(features, memory)
        B = features.shape[0]
        N = memory.shape[0]
        idx = validate_indices(indices, N, batch=B).to(features.device)
        zero = _zero_like_graph(features)
        want_instance = self.instance_cfg.enabled
        want_gsl = bool(use_gsl) and self.gsl_cfg.enabled
        out = {"instance": zero, "gsl": zero}
        if B == 0 or not (want_instance or want_gsl):
            return out

        f = features.float()
        mem = memory.detach().to(device=features.device, dtype=torch.float32)
        scores = f @ mem.T  # s_ij = M_j . f_i, (B, N)
        rows = torch.arange(B, device=features.device)
        log_p = F.log_softmax(scores / self.instance_cfg.temperature, dim=1)  # log p_ij

        if want_instance:
            if self.instance_cfg.negatives == "same_camera":
                cams = self._slot_cameras(slot_cameras, N, features.device)
                other = cams[None, :] != cams[idx][:, None]  # (B, N)
                log_p_cam = F.log_softmax(
                    (scores / self.instance_cfg.temperature).masked_fill(other, float("-inf")),
                    dim=1,
                )
                out["instance"] = -log_p_cam[rows, idx].mean()
            else:
                out["instance"] = -log_p[rows, idx].mean()
        if want_gsl and prior is not None:
            prior_neighbours, prior_sims = prior
            if prior_neighbours.shape[0] != B or prior_sims.shape != prior_neighbours.shape:
                raise ValueError(
                    f"prior lists of shapes {tuple(prior_neighbours.shape)} and "
                    f"{tuple(prior_sims.shape)} for a batch of {B}"
                )
            mask, sim = _dense_neighbours(
                prior_neighbours.to(features.device), prior_sims.to(features.device), N
            )
            out["gsl"] = self._gsl(scores, log_p, sim, mask, idx)
        elif want_gsl:
            with torch.no_grad():
                sim = mem.index_select(0, idx) @ mem.T  # S_ij, (B, N)
                cross_camera = self.gsl_cfg.neighbours == "other_cameras"
                gsl_cams = (
                    self._slot_cameras(slot_cameras, N, features.device) if cross_camera else None
                )
                mask = _credible_from_similarity(
                    sim,
                    mem,
                    idx,
                    self.gsl_cfg.threshold,
                    self.gsl_cfg.topk,
                    self.gsl_cfg.mutual,
                    gsl_cams,
                )
            out["gsl"] = self._gsl(scores, log_p, sim, mask, idx)
        return out

    def _gsl(
        self,
        scores: torch.Tensor,
        log_p: torch.Tensor,
        sim: torch.Tensor,
        mask: torch.Tensor,
        idx: torch.Tensor,
    ) -> torch.Tensor:
        if self.gsl_cfg.weighting == "mmcl_squared":
            return self._mmcl_squared(scores, mask, idx)
        return -(self._weights(sim, mask) * log_p).sum(dim=1).mean()

    @staticmethod
    def _slot_cameras(
        slot_cameras: torch.Tensor | None, num_slots: int, device: torch.device
    ) -> torch.Tensor:
        if slot_cameras is None:
            raise ValueError(
                "the camera-aware options of the global loss need the camera of each slot"
            )
        if tuple(slot_cameras.shape) != (num_slots,):
            raise ValueError(
                f"slot_cameras has shape {tuple(slot_cameras.shape)} but the memory has "
                f"{num_slots} slots"
            )
        return slot_cameras.to(device)

    def _weights(self, sim: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """w_ij over C_i (rows sum to 1, or to 0 where C_i is empty); no gradient."""
        maskf = mask.to(sim.dtype)
        count = maskf.sum(dim=1, keepdim=True)
        uniform = maskf / count.clamp_min(1.0)
        if self.gsl_cfg.weighting == "uniform":
            return uniform
        w = sim.clamp_min(0.0) * maskf
        total = w.sum(dim=1, keepdim=True)
        return torch.where(total > 0, w / total.clamp_min(torch.finfo(w.dtype).tiny), uniform)

    def _mmcl_squared(
        self, scores: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor
    ) -> torch.Tensor:
        B, N = scores.shape
        rows = torch.arange(B, device=scores.device)
        pos = mask.clone()
        pos[rows, idx] = True
        posf = pos.to(scores.dtype)
        pos_term = ((1.0 - scores).pow(2) * posf).sum(dim=1) / posf.sum(dim=1)
        num_neg = N - pos.sum(dim=1)  # (B,)
        num_hard = torch.floor(self.mmcl_hard_ratio * num_neg.to(scores.dtype)).long()
        num_hard = torch.minimum(num_hard.clamp_min(1), num_neg)
        kmax = int(num_hard.max())
        hard_term = torch.zeros(B, dtype=scores.dtype, device=scores.device)
        if kmax > 0:
            neg_scores = scores.detach().masked_fill(pos, float("-inf"))
            hard = neg_scores.topk(kmax, dim=1).indices  # hardest negatives first
            take = (torch.arange(kmax, device=scores.device)[None, :] < num_hard[:, None]).to(
                scores.dtype
            )
            hard_scores = scores.gather(1, hard)
            hard_term = ((1.0 + hard_scores).pow(2) * take).sum(dim=1) / num_hard.clamp_min(1)
        return (self.mmcl_delta * pos_term + hard_term).mean()
