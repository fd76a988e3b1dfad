"""Cross-process helpers for contrastive losses (torch.distributed; a no-op on one process)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.nn.functional import all_gather


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every process along dim 0, keeping the autograd graph.

    The backward pass sends each process the gradient of its own slice (summed over every process's
    loss), so cross-device negatives train the encoder exactly as one big batch would.
    """
    _, size = world()
    if size == 1:
        return tensor
    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def gather_without_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (e.g. int64 text keys) from every process along dim 0, no autograd."""
    _, size = world()
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def global_min(value: int, device: torch.device) -> int:
    """The smallest ``value`` over every process (``value`` itself on one process); ``device`` is
    where the process group's backend reduces (CUDA for NCCL)."""
    _, size = world()
    if size == 1:
        return value
    found = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(found, op=dist.ReduceOp.MIN)
    return int(found.item())
