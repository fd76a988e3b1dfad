"""Online hard-negative mixing: synthesise extra hard negatives for each query inside the batch.

KaLM-Embedding-V2 enriches hard negatives online instead of mining more offline; we follow the
mixing scheme it builds on (MoCHi, Kalantidis et al. 2020). For query q_i, rank its candidate
negatives n (unit vectors) by s(q_i, n) and keep the ``top_k`` hardest, H_i. Then

* ``pairs`` negatives mix two different hardest negatives:  h = norm(a * n_a + (1 - a) * n_b),
  a ~ U(0, 1), (n_a, n_b) drawn from H_i without replacement. With fewer than 2 hardest negatives
  (classification-style rows with one label negative) a pair mix would be a copy of the real
  negative, so pair mixes are skipped for that batch;
* ``query_mixes`` negatives mix the query itself in:  h' = norm(b * q_i + (1 - b) * n_a),
  b ~ U(0, beta_max) with beta_max <= 0.5, so h' stays closer to the negative than to the query.

Synthetic vectors are constants (``detach``): gradient flows only through q_i in s(q_i, h). They
join q_i's own denominator, never another query's.

Several processes draw exactly what one process with the same global batch draws: k is the
minimum over the global batch, and every random draw is made (on the CPU) for all global rows,
each process keeping the rows of its shard, so row i's draws depend on the generator and i only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .distributed import global_min


@dataclass(frozen=True)
class MixingConfig:
    """How many negatives to synthesise per query and from how many hardest ones."""

    top_k: int = 4
    pairs: int = 2
    query_mixes: int = 1
    beta_max: float = 0.5

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.pairs < 0 or self.query_mixes < 0:
            raise ValueError("mixing: top_k must be >= 1, pairs and query_mixes >= 0")
        if not 0.0 <= self.beta_max <= 0.5:
            raise ValueError(f"mixing: beta_max must lie in [0, 0.5], got {self.beta_max}")


def hardest_negatives(queries: Tensor, candidates: Tensor, allowed: Tensor, top_k: int) -> Tensor:
    """[B, k, D] embeddings of the ``k = min(top_k, allowed per row)`` most similar allowed candidates
    (the fewest allowed over the rows of every process: the global batch's k)."""
    scores = (queries @ candidates.T).masked_fill(~allowed, float("-inf"))
    k = min(top_k, global_min(int(allowed.sum(dim=1).min()), allowed.device))
    if k < 1:
        raise ValueError("hard-negative mixing needs at least one negative per query")
    return candidates[scores.topk(k, dim=1).indices]


def _shard_rows(draw: Tensor, rank: int, batch: int, device: torch.device) -> Tensor:
    """This process's rows (``batch`` from ``rank * batch``) of a draw made for the global batch."""
    return draw[rank * batch : (rank + 1) * batch].to(device)


def synthesise(
    queries: Tensor,
    hardest: Tensor,
    cfg: MixingConfig,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Tensor:
    """[B, pairs + query_mixes, D] synthetic unit-norm negatives (detached) for each query
    ([B, query_mixes, D] when fewer than 2 hardest negatives exist).

    ``generator`` is a CPU generator (None: the global CPU RNG). The B local rows are rows
    ``rank * B`` onwards of a global batch of ``world_size * B``: draws are made for all of them,
    so a row's draws do not depend on how the batch is split over processes.
    """
    batch, k, _ = hardest.shape
    total, device = batch * world_size, queries.device
    parts = []
    rows = torch.arange(batch, device=device)[:, None]
    if cfg.pairs and k >= 2:
        first = _shard_rows(torch.randint(k, (total, cfg.pairs), generator=generator), rank, batch, device)
        second = _shard_rows(torch.randint(k - 1, (total, cfg.pairs), generator=generator), rank, batch, device)
        second = second + (second >= first).long()  # uniform over the k - 1 others: never itself
        alpha = _shard_rows(torch.rand(total, cfg.pairs, 1, generator=generator), rank, batch, device)
        parts.append(alpha * hardest[rows, first] + (1 - alpha) * hardest[rows, second])
    if cfg.query_mixes:
        index = _shard_rows(torch.randint(k, (total, cfg.query_mixes), generator=generator), rank, batch, device)
        beta = cfg.beta_max * _shard_rows(torch.rand(total, cfg.query_mixes, 1, generator=generator), rank, batch, device)
        parts.append(beta * queries[:, None, :] + (1 - beta) * hardest[rows, index])
    if not parts:
        return queries.new_zeros(batch, 0, queries.shape[1])
    return F.normalize(torch.cat(parts, dim=1), dim=-1).detach()
