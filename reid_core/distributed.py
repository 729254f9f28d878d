"""torch.distributed helpers: one process per GPU under torchrun, a no-op in a single process.

Memories must stay identical on every rank, so memory updates use :func:`all_gather_cat` (every
rank sees every rank's features and indices) before the same update is applied everywhere.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_cat",
    "barrier",
    "broadcast_object",
    "broadcast_tensor",
    "cleanup",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "is_main_process",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_from_env(backend: str = "auto", timeout_s: int = 1800) -> int:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns the local rank.

    ``backend='auto'`` picks NCCL when CUDA is available and gloo otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 1 or is_distributed():
        return local_rank
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return local_rank


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (sizes may differ between ranks).

    The result is ordered by rank and carries no gradient (it feeds memory updates only).
    """
    if not is_distributed():
        return tensor.detach()
    world = get_world_size()
    local = tensor.detach().contiguous()
    size = torch.tensor([local.shape[0]], device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts, strict=True)], dim=0)


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensor(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``tensor`` as rank ``src`` holds it, on every rank (same shape and dtype everywhere)."""
    if not is_distributed():
        return tensor
    out = tensor.contiguous()
    dist.broadcast(out, src=src)
    return out
