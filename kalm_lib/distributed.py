"""Cross-process helpers (torch.distributed; a no-op on one process): rank / world, gathers for
contrastive losses, shards and row gathers for mining."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.nn.functional import all_gather


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device() -> torch.device:
    """This process's device: the GPU of its local rank (``LOCAL_RANK``, set by torchrun / accelerate
    launch; 0 for a single process) when CUDA is present, else the CPU. Training's Accelerator
    places the model on the same device."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


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


def shard(count: int) -> slice:
    """This process's contiguous share of ``count`` items: [count r / W, count (r + 1) / W); all of them on one process."""
    rank, size = world()
    return slice(count * rank // size, count * (rank + 1) // size)


def gather_rows(array: np.ndarray) -> np.ndarray:
    """Concatenate every process's ``array`` along dim 0 in rank order (row counts may differ); ``array`` itself on one process.

    Each process pads its rows to the longest share, ``all_gather`` moves them (on the current CUDA
    device under NCCL, else on the CPU) and the padding is cut off again.
    """
    _, size = world()
    if size == 1:
        return array
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    counts = gather_without_grad(torch.tensor([len(array)], device=device)).tolist()
    rows = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    longest = max(*counts, 1)
    padded = torch.cat([rows, rows.new_zeros((longest - len(array), *array.shape[1:]))])
    parts = gather_without_grad(padded).split(longest)
    return torch.cat([part[:count] for part, count in zip(parts, counts)]).cpu().numpy()
