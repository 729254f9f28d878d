"""Per-image feature banks (the global memory M, the patch memory m^p and the IPFL agents a).

One slot per training image, addressed by the image's dataset index::

    M      : (N, d)        global memory,  M_i <- a M_i + (1 - a) f_i,        renormalised
    m^p    : (N, P, D)     patch memory,   m_i^p <- (1 - mu) m_i^p + mu f_i^p, renormalised
    a      : (N, P * E)    IPFL agents,    a_i <- (1 - mu) a_i + mu mean_v e_i^v  (not renormalised)

:class:`FeatureMemory` takes the weight of the **old** value, ``keep`` (``a`` above; for the patch
memory and the agents, whose configs give the weight of the new value ``mu``, pass
``keep = 1 - mu``). The bank is a registered buffer, so it is saved in ``state_dict`` and follows
``.to()``; it never takes part in autograd (updates run under ``torch.no_grad`` on detached
inputs).

Distributed training: the class holds no process-group logic. The caller all-gathers the batch's
``(indices, features)`` across ranks and every rank applies the same update, which keeps the banks
identical everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reid_core.config import MemoryConfig

__all__ = ["FeatureMemory", "momentum_at", "validate_indices"]


def validate_indices(
    indices: torch.Tensor, num_items: int, batch: int | None = None, name: str = "indices"
) -> torch.Tensor:
    """Check a (B,) integer index tensor against a memory of ``num_items`` slots and, when
    ``batch`` is given, a batch of that size; return it as ``torch.long``."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be a LongTensor, got {type(indices).__name__}")
    if indices.dim() != 1:
        raise ValueError(f"{name} must be 1-D (B,), got shape {tuple(indices.shape)}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {indices.dtype}")
    if batch is not None and indices.shape[0] != batch:
        raise ValueError(f"{name} has {indices.shape[0]} entries but the batch has B={batch}")
    if indices.numel() > 0:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_items:
            raise IndexError(
                f"{name} must lie in [0, N={num_items}) (the memory size), got min={lo}, max={hi}"
            )
    return indices.long()


def momentum_at(epoch: int, total_epochs: int, cfg: MemoryConfig) -> float:
    """Memory momentum ``a`` (weight of the old value) for a 0-based ``epoch``.

    * ``constant``: ``a = momentum_start`` at every epoch.
    * ``linear``:   ``a = a_0 + (a_1 - a_0) * epoch / (T - 1)``, with ``a_0 = momentum_start``,
      ``a_1 = momentum_end``, ``T = total_epochs``; so epoch 0 gives ``a_0`` and the last epoch
      ``T - 1`` gives ``a_1`` (a single-epoch run uses ``a_0``).
    """
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    if not 0 <= epoch < total_epochs:
        raise ValueError(f"epoch must be in [0, total_epochs={total_epochs}), got {epoch}")
    start, end = cfg.momentum_start, cfg.momentum_end
    if cfg.momentum_schedule == "constant" or total_epochs == 1:
        return float(start)
    if cfg.momentum_schedule == "linear":
        return float(start + (end - start) * epoch / (total_epochs - 1))
    raise ValueError(f"unknown momentum_schedule {cfg.momentum_schedule!r}")


def _as_shape(feature_shape: int | tuple[int, ...] | list[int] | torch.Size) -> tuple[int, ...]:
    shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
    if not shape or any((not isinstance(s, int)) or s < 1 for s in shape):
        raise ValueError(f"feature_shape must be positive integers, got {feature_shape!r}")
    return shape


class FeatureMemory(nn.Module):
    """A bank of ``N`` feature slots of shape ``feature_shape``, one per training image.

    Buffers (both persistent, i.e. in ``state_dict``):

    * ``bank``   (N, *feature_shape): the features; with ``normalize=True`` every vector along the
      last dim has unit L2 norm (or is all zero while its slot has never been written).
    * ``filled`` (N,) bool: whether a slot has been written by :meth:`set` or :meth:`update`.

    Update rule for a slot ``i`` that is written by :meth:`update` with momentum ``keep``::

        M_i <- keep * M_i + (1 - keep) * f_i      then  M_i <- M_i / ||M_i||  (if normalize)

    A slot that has never been written takes ``f_i`` directly (as PAUL's agents do on first
    sight); for a normalised bank initialised with zeros this is the same result as the rule above.

    Duplicate indices within one call are handled deterministically and independently of their
    order: the features sharing an index are **averaged first**, and the slot is updated once.
    """

    bank: torch.Tensor
    filled: torch.Tensor

    def __init__(
        self,
        num_items: int,
        feature_shape: int | tuple[int, ...],
        *,
        normalize: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = int(num_items)
        self.feature_shape = _as_shape(feature_shape)
        self.normalize = normalize
        self.register_buffer(
            "bank", torch.zeros((self.num_items, *self.feature_shape), dtype=dtype, device=device)
        )
        self.register_buffer("filled", torch.zeros(self.num_items, dtype=torch.bool, device=device))

    def __len__(self) -> int:
        return self.num_items

    def extra_repr(self) -> str:
        return (
            f"num_items={self.num_items}, feature_shape={self.feature_shape}, "
            f"normalize={self.normalize}"
        )

    # ------------------------------------------------------------------------------------------
    # reading
    # ------------------------------------------------------------------------------------------

    @property
    def features(self) -> torch.Tensor:
        """The whole bank, (N, *feature_shape); a buffer, never requires grad."""
        return self.bank

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``bank[indices]``, (B, *feature_shape) (a copy)."""
        idx = self._check_indices(indices)
        return self.bank.index_select(0, idx)

    # ------------------------------------------------------------------------------------------
    # writing
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def set(self, indices: torch.Tensor, features: torch.Tensor) -> None:
        """Overwrite slots: ``M_i <- f_i`` (normalised if ``normalize``); for initialisation."""
        idx, feats = self._check_batch(indices, features)
        uniq, mean = self._merge_duplicates(idx, feats)
        if self.normalize:
            mean = F.normalize(mean, dim=-1)
        self.bank.index_copy_(0, uniq, mean)
        self.filled.index_fill_(0, uniq, True)

    @torch.no_grad()
    def update(self, indices: torch.Tensor, features: torch.Tensor, keep: float) -> None:
        """Moving-average update ``M_i <- keep * M_i + (1 - keep) * f_i``, then renormalise.

        ``keep`` is the weight of the OLD value, in [0, 1] (``keep=1`` leaves written slots
        unchanged, ``keep=0`` overwrites them). ``indices`` (B,) and ``features``
        (B, *feature_shape) are the already all-gathered batch; duplicates are averaged first.
        """
        keep = float(keep)
        if not 0.0 <= keep <= 1.0:
            raise ValueError(f"keep (weight of the old value) must be in [0, 1], got {keep}")
        idx, feats = self._check_batch(indices, features)
        uniq, mean = self._merge_duplicates(idx, feats)
        old = self.bank.index_select(0, uniq)
        was_filled = self.filled.index_select(0, uniq).view(-1, *([1] * len(self.feature_shape)))
        new = torch.where(was_filled, keep * old + (1.0 - keep) * mean, mean)
        if self.normalize:
            new = F.normalize(new, dim=-1)
        self.bank.index_copy_(0, uniq, new)
        self.filled.index_fill_(0, uniq, True)

    @torch.no_grad()
    def reset(self) -> None:
        """Zero every slot and mark all of them unwritten."""
        self.bank.zero_()
        self.filled.zero_()

    # ------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------

    def _check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return validate_indices(indices, self.num_items).to(self.bank.device)

    def _check_batch(
        self, indices: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._check_indices(indices)
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a Tensor, got {type(features).__name__}")
        expected = (idx.shape[0], *self.feature_shape)
        if tuple(features.shape) != expected:
            raise ValueError(
                f"features has shape {tuple(features.shape)} but the memory expects "
                f"(B, *feature_shape)={expected} for B={idx.shape[0]} indices"
            )
        feats = features.detach().to(device=self.bank.device, dtype=self.bank.dtype)
        return idx, feats

    def _merge_duplicates(
        self, idx: torch.Tensor, feats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unique sorted indices and the mean feature of each (a dense averaging matmul,
        deterministic on every device, unlike an atomic ``index_add_``)."""
        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        if uniq.numel() == idx.numel():
            order = torch.argsort(idx)
            return idx[order], feats[order]
        # A[u, b] = 1 / count(u) if inverse[b] == u:  mean = A @ f
        onehot = inverse.unsqueeze(0) == torch.arange(uniq.numel(), device=idx.device)[:, None]
        weights = onehot.to(feats.dtype)
        weights = weights / weights.sum(dim=1, keepdim=True)
        mean = (weights @ feats.reshape(feats.shape[0], -1)).view(-1, *self.feature_shape)
        return uniq, mean
