"""The KaLM-Embedding-V2 contrastive objective as one module with a clear contract.

Inputs are unit-norm embeddings of the local batch: queries q [B, D], positives p [B, D] and
explicit hard negatives n [B, M, D] (M may be 0). With s the cosine similarity and tau the
temperature, query i sees the logits

    s(q_i, p_i+)/tau,   s(q_i, p_j+)/tau for j != i (in-batch),   s(q_i, n_{j,k})/tau for all j, k,

where j runs over the *global* batch (positives and negatives gathered from every process, with
gradient). Without in-batch negatives (classification / clustering-style data) only q_i's own
hard negatives n_{i,k} stay. Online hard-negative mixing appends synthetic negatives to row i
(see :mod:`kalm_lib.hard_negative_mixing`). With Z_i the row's sum of exponentials and
p_i = exp(s(q_i, p_i+)/tau) / Z_i, the focal-style reweighted loss is

    L = mean_i  -(1 - p_i)^gamma * log p_i,

which is plain InfoNCE for gamma = 0. The weight is part of the graph, as in focal loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import gather_with_grad, world
from .hard_negative_mixing import MixingConfig, hardest_negatives, synthesise


def focal_infonce(logits: Tensor, target: Tensor, gamma: float) -> Tensor:
    """Mean over rows of -(1 - p)^gamma log p, p the softmax probability of the target column."""
    log_p = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)
    if gamma == 0.0:
        return -log_p.mean()
    # 1 - p as -expm1(log p): no cancellation as p -> 1. The floor at the smallest normal float keeps
    # the derivative gamma * (1 - p)^(gamma - 1) finite for 0 < gamma < 1 once 1 - p underflows to 0
    # (a 0 * inf = NaN gradient otherwise); the weight's value there is negligible either way.
    one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny)
    weight = one_minus_p.pow(gamma)
    return -(weight * log_p).mean()


class KalmContrastiveLoss(nn.Module):
    """InfoNCE with in-batch and hard negatives, focal-style reweighting and hard-negative mixing.

    For query i with unit-norm embedding q_i, own positive p_i+, logits over every allowed candidate
    c (its positive, the other queries' positives of the *global* batch, every hard negative of the
    global batch, and the synthetic negatives of row i when mixing is on)::

        Z_i = sum_c exp(s(q_i, c) / tau)
        p_i = exp(s(q_i, p_i+) / tau) / Z_i
        L   = mean_i  -(1 - p_i)^gamma * log p_i

    Args:
        temperature: tau > 0. The paper does not state it; the authors' released training script
            uses 0.01. Profiles set it per stage.
        focal_gamma: gamma >= 0 of the focal weight (1 - p_i)^gamma, kept in the graph as in focal
            loss. 0 is plain InfoNCE (the weight is skipped, not multiplied by 1).
        mixing: :class:`~kalm_lib.hard_negative_mixing.MixingConfig` to synthesise extra negatives
            per query from its hardest candidates (None: off). Synthetic vectors are constants.
        generator: torch RNG for the mixing draws (None: the global RNG).

    Inputs:
        ``forward(queries [B, D], positives [B, D], negatives [B, M, D] | None, in_batch_negatives)``:
        embeddings of this process's shard, L2-normalised (M may be 0). Positives and negatives are
        gathered from every process with gradient, so B is the local and B x world the global
        batch. ``in_batch_negatives=False`` (classification-style sets) keeps only row i's own
        positive and hard negatives. :meth:`from_stacked` takes [queries; positives; negatives
        grouped by query] as one tensor, the order a training step embeds them in.
        Returns a scalar: the mean over local rows (processes average it through DDP).

    References:
        - KaLM-Embedding-V2 (Zhao et al., 2025, arXiv 2506.20923): the InfoNCE denominator with
          in-batch and hard negatives, focal-style reweighting, online hard-negative mixing. The
          paper does not publish the focal gamma or the mixing scheme; see docs/decisions.md.
        - Focal loss (Lin et al., 2017, arXiv 1708.02002): the (1 - p)^gamma modulating factor.
        - MoCHi (Kalantidis et al., 2020, arXiv 2010.01028): mixing of hard negatives and of the
          query into hard negatives, which :mod:`kalm_lib.hard_negative_mixing` follows.

    Relations:
        With ``focal_gamma=0`` and ``mixing=None`` on one process, the loss equals
        sentence-transformers' ``MultipleNegativesRankingLoss`` with ``scale = 1 / temperature``
        (cosine similarity, the same candidates), as ``tests/test_losses.py`` checks.

    Example::

        >>> import torch, torch.nn.functional as F
        >>> loss_fn = KalmContrastiveLoss(temperature=0.05, focal_gamma=0.5)
        >>> q, p = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
        >>> n = F.normalize(torch.randn(4, 2, 8), dim=-1)
        >>> loss_fn(q, p, n).shape
        torch.Size([])
    """

    def __init__(
        self,
        temperature: float = 0.05,
        focal_gamma: float = 0.0,
        mixing: MixingConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
        self.temperature = temperature
        self.focal_gamma = focal_gamma
        self.mixing = mixing
        self.generator = generator

    def forward(self, queries: Tensor, positives: Tensor, negatives: Tensor | None = None, in_batch_negatives: bool = True) -> Tensor:
        """Scalar loss for the local queries against global candidates."""
        batch, dim = queries.shape
        negatives = queries.new_zeros(batch, 0, dim) if negatives is None else negatives
        per_query = negatives.shape[1]
        rank, _ = world()
        all_pos = gather_with_grad(positives)
        all_neg = gather_with_grad(negatives.reshape(-1, dim))
        candidates = torch.cat([all_pos, all_neg], dim=0)
        own = torch.arange(batch, device=queries.device) + rank * batch
        allowed = self._allowed(own, all_pos.shape[0], all_neg.shape[0], per_query, in_batch_negatives)
        logits = (queries @ candidates.T).masked_fill(~allowed, float("-inf"))
        if self.mixing is not None:
            negative_mask = allowed.clone()
            negative_mask[torch.arange(batch), own] = False
            hardest = hardest_negatives(queries.detach(), candidates.detach(), negative_mask, self.mixing.top_k)
            synthetic = synthesise(queries.detach(), hardest, self.mixing, self.generator)
            logits = torch.cat([logits, torch.einsum("bd,bmd->bm", queries, synthetic)], dim=1)
        return focal_infonce(logits / self.temperature, own, self.focal_gamma)

    def from_stacked(self, embeddings: Tensor, batch_size: int, negatives_per_query: int, in_batch_negatives: bool = True) -> Tensor:
        """Loss for embeddings stacked as [queries; positives; negatives grouped by query]."""
        queries, positives = embeddings[:batch_size], embeddings[batch_size : 2 * batch_size]
        negatives = embeddings[2 * batch_size :].reshape(batch_size, negatives_per_query, embeddings.shape[1])
        return self(queries, positives, negatives, in_batch_negatives)

    @staticmethod
    def _allowed(own: Tensor, n_pos: int, n_neg: int, per_query: int, in_batch: bool) -> Tensor:
        """[B, n_pos + n_neg] mask of the candidates each local query may score against."""
        batch = own.shape[0]
        if in_batch:
            return torch.ones(batch, n_pos + n_neg, dtype=torch.bool, device=own.device)
        allowed = torch.zeros(batch, n_pos + n_neg, dtype=torch.bool, device=own.device)
        rows = torch.arange(batch, device=own.device)
        allowed[rows, own] = True
        if per_query:
            columns = n_pos + own[:, None] * per_query + torch.arange(per_query, device=own.device)
            allowed[rows[:, None], columns] = True
        return allowed
