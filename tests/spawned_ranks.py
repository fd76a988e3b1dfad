"""Run a function on several spawned CPU processes joined in one gloo group (tests only).

A worker is a module-level ``target(rank, store, results)`` (spawned processes import it by name):
it joins the group with :func:`gloo_group` and puts ``(rank, value)`` on ``results``. A file store
is the rendezvous, so no TCP port can be taken by another process in between.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@contextmanager
def gloo_group(rank: int, store: str, world: int) -> Iterator[None]:
    """One thread, member ``rank`` of a ``world``-process gloo group; waits for every member before leaving."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(target: Callable[[int, str, Any], None], store: Path, world: int, timeout: float) -> list[Any]:
    """Start ``world`` spawned processes of ``target``; the values they put, in rank order. Every
    process must exit cleanly."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, str(store), results)) for rank in range(world)]
    for proc in procs:
        proc.start()
    try:
        values = [value for _, value in sorted((results.get(timeout=timeout) for _ in procs), key=lambda r: r[0])]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs)
    return values
