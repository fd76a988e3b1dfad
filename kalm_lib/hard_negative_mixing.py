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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


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
    """[B, k, D] embeddings of the ``k = min(top_k, allowed per row)`` most similar allowed candidates."""
    scores = (queries @ candidates.T).masked_fill(~allowed, float("-inf"))
    k = min(top_k, int(allowed.sum(dim=1).min()))
    if k < 1:
        raise ValueError("hard-negative mixing needs at least one negative per query")
    return candidates[scores.topk(k, dim=1).indices]


def synthesise(queries: Tensor, hardest: Tensor, cfg: MixingConfig, generator: torch.Generator | None = None) -> Tensor:
    """[B, pairs + query_mixes, D] synthetic unit-norm negatives (detached) for each query
    ([B, query_mixes, D] when fewer than 2 hardest negatives exist)."""
    batch, k, _ = hardest.shape
    device = queries.device
    parts = []
    rows = torch.arange(batch, device=device)[:, None]
    if cfg.pairs and k >= 2:
        first = torch.randint(k, (batch, cfg.pairs), generator=generator, device=device)
        second = torch.randint(k - 1, (batch, cfg.pairs), generator=generator, device=device)
        second = second + (second >= first).long()  # uniform over the k - 1 others: never itself
        alpha = torch.rand(batch, cfg.pairs, 1, generator=generator, device=device)
        parts.append(alpha * hardest[rows, first] + (1 - alpha) * hardest[rows, second])
    if cfg.query_mixes:
        index = torch.randint(k, (batch, cfg.query_mixes), generator=generator, device=device)
        beta = cfg.beta_max * torch.rand(batch, cfg.query_mixes, 1, generator=generator, device=device)
        parts.append(beta * queries[:, None, :] + (1 - beta) * hardest[rows, index])
    if not parts:
        return queries.new_zeros(batch, 0, queries.shape[1])
    return F.normalize(torch.cat(parts, dim=1), dim=-1).detach()
