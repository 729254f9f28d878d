r"""PEDAL: patch-level discriminative loss against the patch memory (PAUL, Yang et al. CVPR 2019).

Symbols: ``f_i^p`` (D,) the L2-normalised feature of patch ``p`` of image ``i`` (view 0), ``m_j^p``
the patch memory of image ``j`` (:class:`reid_core.objective.memory.FeatureMemory` of shape (N, P, D),
updated by the caller from view 0 *before* this loss), ``s`` the scale (``PEDALConfig.scale``,
15; 5 for DukeMTMC), ``k`` the number of neighbours (``PEDALConfig.neighbours``, 10)::

    d_ij^p   = || f_i^p - m_j^p ||_2^2
    K_i^p    = the k indices j != i with the smallest d_ij^p   (chosen without gradient)
    L_PEDAL  = (1/P) sum_p (1/B) sum_i
               -log(  sum_{j in K_i^p} exp(-s d_ij^p)  /  sum_{j != i} exp(-s d_ij^p)  )

The image's own slot ``j = i`` is excluded from both sums (as PAUL does with its ``position``).
``k`` is capped at ``N - 1`` (with ``N - 1 <= k`` the loss is 0). The memory is read without
gradient. ``neighbours`` (B, P, k), when given, are the sets ``K_i^p`` (from a neighbour prior,
``loss.prior``: :func:`nearest_other_rows` of each stripe's descriptors) instead of the nearest
memory slots. The loss is returned unweighted (the caller multiplies by ``PEDALConfig.weight``).
"""

from __future__ import annotations

import torch
from torch import nn

from reid_core.config import PEDALConfig
from reid_core.objective.memory import validate_indices

__all__ = ["PEDALLoss", "nearest_other_rows"]


@torch.no_grad()
def nearest_other_rows(bank: torch.Tensor, k: int, chunk_rows: int = 1024) -> torch.Tensor:
    """(N, min(k, N - 1)) long: for each row ``i`` of ``bank`` (N, d), the ``k`` other rows
    ``j != i`` with the largest ``bank_i . bank_j``, most similar first.

    Every row gets exactly ``min(k, N - 1)`` indices, none equal to ``i`` and no padding, whatever
    the similarities are (a zero row, or float cosines just below -1, still count). Computed
    ``chunk_rows`` rows at a time, never as an N x N matrix.
    """
    if bank.dim() != 2:
        raise ValueError(f"bank must have shape (N, d), got {tuple(bank.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    n = bank.shape[0]
    k = min(int(k), n - 1)
    out = torch.empty((n, max(k, 0)), dtype=torch.long, device=bank.device)
    if k <= 0:
        return out
    bank = bank.detach().float()
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        sim = bank[start:stop] @ bank.T  # (chunk, N)
        rows = torch.arange(stop - start, device=bank.device)
        sim[rows, rows + start] = float("-inf")  # j != i
        out[start:stop] = sim.topk(k, dim=1).indices
    return out


class PEDALLoss(nn.Module):
    """Patch-level discriminative loss (formula in the module docstring)."""

    def __init__(self, cfg: PEDALConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(
        self,
        patch_features: torch.Tensor,
        indices: torch.Tensor,
        patch_memory: torch.Tensor,
        neighbours: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``patch_features`` (B, P, D), ``indices`` (B,), ``patch_memory`` (N, P, D) ->
        float32 scalar (a 0 connected to ``patch_features`` when disabled). ``neighbours``
        (B, P, k): given sets K_i^p (indices in [0, N), none equal to i)."""
        if patch_features.dim() != 3:
            raise ValueError(
                f"patch_features must have shape (B, P, D), got {tuple(patch_features.shape)}"
            )
        if patch_memory.dim() != 3:
            raise ValueError(
                f"patch_memory must have shape (N, P, D), got {tuple(patch_memory.shape)}"
            )
        B, P, D = patch_features.shape
        N = patch_memory.shape[0]
        if tuple(patch_memory.shape[1:]) != (P, D):
            raise ValueError(
                f"patch_features has shape (B, P, D)={tuple(patch_features.shape)} but "
                f"patch_memory has (P, D)={tuple(patch_memory.shape[1:])}"
            )
        idx = validate_indices(indices, N, batch=B).to(patch_features.device)
        if not self.cfg.enabled or B == 0:
            return patch_features.float().sum() * 0.0
        if N < 2:
            raise ValueError(f"PEDAL needs at least 2 memory slots (j != i), got N={N}")

        f = patch_features.float().transpose(0, 1)  # (P, B, D)
        m = patch_memory.detach().to(device=f.device, dtype=torch.float32).transpose(0, 1)
        # d_ij^p = |f_i^p|^2 + |m_j^p|^2 - 2 f_i^p . m_j^p,   (P, B, N)
        dist = (
            f.pow(2).sum(-1).unsqueeze(2)
            + m.pow(2).sum(-1).unsqueeze(1)
            - 2.0 * torch.bmm(f, m.transpose(1, 2))
        ).clamp_min(0.0)
        is_self = (torch.arange(N, device=f.device)[None, :] == idx[:, None]).expand(P, B, N)
        logits = (-self.cfg.scale * dist).masked_fill(is_self, float("-inf"))  # -s d, j != i
        if neighbours is not None:
            if neighbours.dim() != 3 or tuple(neighbours.shape[:2]) != (B, P):
                raise ValueError(
                    f"neighbours must have shape (B, P, k)=({B}, {P}, k), got "
                    f"{tuple(neighbours.shape)}"
                )
            near = validate_indices(neighbours.flatten(), N, name="neighbours")
            near = near.to(f.device).view(B, P, -1).transpose(0, 1)  # (P, B, k)
            own = (near == idx[None, :, None]).nonzero()  # (p, b, column) rows
            if own.numel():
                p, b, _ = own[0].tolist()
                raise ValueError(
                    f"neighbours[{b}, {p}] holds {int(idx[b])}, the image's own index "
                    f"(indices[{b}]): K_i^p must not hold i"
                )
        else:
            k = min(self.cfg.neighbours, N - 1)
            with torch.no_grad():
                far = dist.masked_fill(is_self, float("inf"))
                near = far.topk(k, dim=2, largest=False).indices
        log_num = torch.logsumexp(logits.gather(2, near), dim=2)  # log sum_{j in K} exp(-s d)
        log_den = torch.logsumexp(logits, dim=2)  # log sum_{j != i} exp(-s d)
        return (log_den - log_num).mean()
