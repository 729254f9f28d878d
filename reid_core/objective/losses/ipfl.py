r"""IPFL: image-level feature learning with agents and cycle ranking (PAUL, Yang et al. CVPR 2019).

Symbols: ``e_x`` (E,) the IPFL embedding of one view ``x`` of image ``c`` (E = P * 128, the
concatenation of the normalised patch projections, computed by the model); ``a_c`` (E,) the agent
of image ``c``: a running mean (weight ``IPFLConfig.agent_momentum`` = 0.1 of the new value, not
renormalised) of the detached mean embedding of the image's views, kept by the caller in a
:class:`reid_core.objective.memory.FeatureMemory` with ``normalize=False`` and updated *before* this loss;
``A_B = {a_b : b in batch}`` the agents of the images in the batch::

    d(x, a)   = || e_x - a ||_2
    d_pos(x)  = d(x, a_c)
    cand(x)   = the agents a_b in A_B with b != c (and y_b != y_c, see below), in increasing
                d(x, a_b); the first
                T = min(max_candidates, #other images) of them are examined
    cycle ok  = c is NOT among the cycle_k nearest agents of a_b in A_B \ {a_b}
    d_neg(x)  = d(x, a_b*) for the first examined candidate b* whose cycle check passes
    L_IPFL    = (1 / (V B)) sum_{v, i} max(0, margin + d_pos(x_i^v) - d_neg(x_i^v))

over both views ``v`` of every image ``i`` of the batch (margin = ``IPFLConfig.margin``, 2).

With pseudo labels ``y`` (``labels``, -1 outside every cluster; ``IPFLConfig.negatives =
"other_clusters"``), an image ``b`` in the anchor's cluster (``y_b = y_c >= 0``) is no candidate:
the P x K sampler of cluster contrast puts ``K - 1`` of them in every batch, and the paper's rule
would push them away from the anchor while the global branch pulls them together. The cycle ranking
is unchanged.

Choices (PAUL's code in ``src/loss/myloss.py``/``Ipfl`` and ``src/loss/smooth.py`` as reference):

* **Which agents.** PAUL's ``centers`` are the agents of the batch's images only, for both the
  candidate list and the cycle ranking; so are ours (the ``agents`` argument is the full (N, E)
  bank and the batch's rows are gathered here).
* **The candidate itself.** PAUL ranks all batch agents including the candidate (at distance 0,
  so its ``nearest=3`` means the candidate plus its 2 nearest others). Here the candidate's own
  slot is excluded: ``cycle_k`` counts *other* agents (PAUL's behaviour is ``cycle_k = 2``).
* **No candidate passes.** PAUL then uses ``d_neg = 0`` (the hinge reduces to
  ``margin + d_pos``). Here the sample is **skipped**: it contributes 0, and the mean still
  divides by all ``V B`` samples (a stable scale, like PAUL's ``size``).
* Duplicate indices within a batch are one image: its slots are never its own negative, and a
  candidate's cycle neighbours exclude every slot of the candidate's own image.

Candidate order and the cycle check are decided without gradient; the loss's gradient reaches
the embeddings only (agents are read detached). Returned unweighted (the caller applies
``IPFLConfig.weight``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from reid_core.config import IPFLConfig
from reid_core.objective.memory import validate_indices

__all__ = ["IPFLLoss"]


def _sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (n, m) between the rows of x (n, E) and y (m, E)."""
    return (x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1)[None, :] - 2.0 * x @ y.T).clamp_min(0)


def _stack_views(embeddings: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(embeddings, torch.Tensor):
        if embeddings.dim() == 2:
            return embeddings.unsqueeze(0)
        if embeddings.dim() == 3:
            return embeddings
        raise ValueError(
            f"embeddings must have shape (V, B, E) or (B, E), got {tuple(embeddings.shape)}"
        )
    views = list(embeddings)
    if not views:
        raise ValueError("embeddings is an empty sequence: pass at least one (B, E) view")
    shapes = [tuple(v.shape) for v in views]
    if any(len(s) != 2 for s in shapes) or len(set(shapes)) != 1:
        raise ValueError(f"every view must be a (B, E) tensor of the same shape, got {shapes}")
    return torch.stack(views, dim=0)


class IPFLLoss(nn.Module):
    """Agent-based triplet loss with the cycle-ranking check (formula in the module docstring)."""

    def __init__(self, cfg: IPFLConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(
        self,
        embeddings: torch.Tensor | Sequence[torch.Tensor],
        indices: torch.Tensor,
        agents: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``embeddings`` (V, B, E) or a sequence of V (B, E) views (a single (B, E) is V=1),
        ``indices`` (B,) into ``agents`` (N, E), ``labels`` (B,) the batch's pseudo labels (-1
        none) whose cluster mates are no negatives -> float32 scalar (a 0 connected to the
        embeddings when disabled or when no sample has a negative)."""
        emb = _stack_views(embeddings)
        V, B, E = emb.shape
        if agents.dim() != 2:
            raise ValueError(f"agents must have shape (N, E), got {tuple(agents.shape)}")
        if agents.shape[1] != E:
            raise ValueError(
                f"embeddings have shape (V, B, E)={tuple(emb.shape)} but agents have "
                f"E={agents.shape[1]} (agents shape {tuple(agents.shape)})"
            )
        idx = validate_indices(indices, agents.shape[0], batch=B).to(emb.device)
        zero = emb.float().sum() * 0.0
        if not self.cfg.enabled or B < 2:
            return zero

        x = emb.float().reshape(V * B, E)  # row r = v * B + b
        anchor = torch.arange(B, device=x.device).repeat(V)  # batch position b of row r
        batch_agents = agents.detach().to(device=x.device, dtype=torch.float32).index_select(0, idx)
        same_image = idx[:, None] == idx[None, :]  # (B, B)
        not_negative = same_image
        if labels is not None:
            if labels.shape != idx.shape:
                raise ValueError(f"labels must have shape ({B},), got {tuple(labels.shape)}")
            y = labels.to(x.device)
            not_negative = same_image | ((y[:, None] == y[None, :]) & (y[:, None] >= 0))

        with torch.no_grad():
            # candidates: other images' (other clusters') batch agents, nearest first
            d_rank = _sq_dist(x, batch_agents).masked_fill(not_negative[anchor], float("inf"))
            T = min(self.cfg.max_candidates, B - 1)
            cand_d, cand = d_rank.topk(T, dim=1, largest=False)  # ascending, (VB, T)
            cand_valid = torch.isfinite(cand_d)
            # cycle ranking: each batch agent's cycle_k nearest agents of other images
            d_agents = _sq_dist(batch_agents, batch_agents).masked_fill(same_image, float("inf"))
            kc = min(self.cfg.cycle_k, B - 1)
            nn_d, nn_pos = d_agents.topk(kc, dim=1, largest=False)  # (B, kc)
            nn_image = idx[nn_pos].masked_fill(~torch.isfinite(nn_d), -1)  # -1: no neighbour
            # rejects[b, b'] = image of b is among the cycle_k nearest agents of b'
            rejects = (nn_image[None, :, :] == idx[:, None, None]).any(dim=2)  # (B, B)
            passes = ~rejects[anchor[:, None], cand] & cand_valid  # (VB, T)
            found = passes.any(dim=1)
            first = passes.to(torch.int8).argmax(dim=1)  # first passing candidate (rank order)
            negative = cand.gather(1, first[:, None]).squeeze(1)  # batch position b*

        d_pos = torch.linalg.vector_norm(x - batch_agents[anchor], dim=1)
        d_neg = torch.linalg.vector_norm(x - batch_agents[negative], dim=1)
        hinge = torch.relu(self.cfg.margin + d_pos - d_neg) * found.to(x.dtype)
        return hinge.sum() / (V * B)
