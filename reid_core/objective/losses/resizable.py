"""A module whose buffers change shape at run time (memories rebuilt at every clustering)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ResizableBuffers"]


class ResizableBuffers(nn.Module):
    """Loading a state dict first gives every buffer the saved one's shape, so a checkpoint of
    a memory with K clusters loads into a module that holds some other number."""

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        for name, buffer in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if (
                buffer is not None
                and isinstance(saved, torch.Tensor)
                and saved.shape != buffer.shape
            ):
                self._buffers[name] = torch.empty(
                    saved.shape, dtype=buffer.dtype, device=buffer.device
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
