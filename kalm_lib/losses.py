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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import gather_with_grad, gather_without_grad, world
from .hard_negative_mixing import MixingConfig, hardest_negatives, synthesise


@dataclass(frozen=True)
class TextKeys:
    """Integer keys of the local batch's texts (equal key = equal text): ``positives`` [B] and
    ``negatives`` [B, M] (see :func:`kalm_lib.batching.text_key`)."""

    positives: Tensor
    negatives: Tensor


def unstack(embeddings: Tensor, batch_size: int, negatives_per_query: int) -> tuple[Tensor, Tensor, Tensor]:
    """[queries; positives; negatives grouped by query] -> (q [B, D], p [B, D], n [B, M, D])."""
    queries, positives = embeddings[:batch_size], embeddings[batch_size : 2 * batch_size]
    negatives = embeddings[2 * batch_size :].reshape(batch_size, negatives_per_query, embeddings.shape[1])
    return queries, positives, negatives


class StackedLoss(nn.Module):
    """A contrastive loss that can also take one stacked tensor, the order a training step embeds in."""

    def from_stacked(
        self,
        embeddings: Tensor,
        batch_size: int,
        negatives_per_query: int,
        in_batch_negatives: bool = True,
        keys: TextKeys | None = None,
    ) -> Tensor:
        """Loss for embeddings stacked as [queries; positives; negatives grouped by query]."""
        queries, positives, negatives = unstack(embeddings, batch_size, negatives_per_query)
        return self(queries, positives, negatives, in_batch_negatives, keys)


def distinct_allowed(allowed: Tensor, keys: Tensor) -> Tensor:
    """[B, C] ``allowed`` keeping, per row, only the first allowed column of every distinct key.

    Columns are grouped by key (stable sort, so a group keeps column order); within a group the
    running count of allowed columns is 1 exactly at the row's first allowed copy.
    """
    order = torch.argsort(keys, stable=True)
    sorted_keys = keys[order]
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_start = torch.cummax(torch.where(starts, torch.arange(len(keys), device=keys.device), 0), dim=0).values
    counts = allowed[:, order].long().cumsum(dim=1)
    before = torch.where(group_start > 0, counts[:, (group_start - 1).clamp_min(0)], 0)
    first_sorted = allowed[:, order] & (counts - before == 1)
    first = torch.empty_like(first_sorted)
    first[:, order] = first_sorted
    return first


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


class KalmContrastiveLoss(StackedLoss):
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
        generator: CPU torch RNG for the mixing draws (None: the global CPU RNG). Draws are made for
            the global batch (each process keeps its rows), so processes holding the same generator
            state draw what one process with the whole batch draws.

    Inputs:
        ``forward(queries [B, D], positives [B, D], negatives [B, M, D] | None, in_batch_negatives,
        keys)``:
        embeddings of this process's shard, L2-normalised (M may be 0). Positives and negatives are
        gathered from every process with gradient, so B is the local and B x world the global
        batch. ``in_batch_negatives=False`` (classification-style sets) keeps only row i's own
        positive and hard negatives. ``keys`` (:class:`TextKeys`, optional): integer keys of the
        texts (equal key = equal text); a candidate other than row i's own positive column whose key
        equals row i's positive key is masked (a repeated positive is no negative), and mixing takes
        each distinct text at most once among a row's hardest negatives. :meth:`from_stacked` takes [queries; positives; negatives
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
        With ``focal_gamma=0``, ``mixing=None`` and no ``keys`` (or no repeated positive) on one
        process, the loss equals sentence-transformers' ``MultipleNegativesRankingLoss`` with
        ``scale = 1 / temperature`` (cosine similarity, the same candidates), as
        ``tests/test_losses.py`` checks. :class:`MatryoshkaLoss` sums it over embedding prefixes.

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

    def forward(
        self,
        queries: Tensor,
        positives: Tensor,
        negatives: Tensor | None = None,
        in_batch_negatives: bool = True,
        keys: TextKeys | None = None,
    ) -> Tensor:
        """Scalar loss for the local queries against global candidates."""
        batch, dim = queries.shape
        negatives = queries.new_zeros(batch, 0, dim) if negatives is None else negatives
        per_query = negatives.shape[1]
        rank, size = world()
        all_pos = gather_with_grad(positives)
        all_neg = gather_with_grad(negatives.reshape(-1, dim))
        candidates = torch.cat([all_pos, all_neg], dim=0)
        own = torch.arange(batch, device=queries.device) + rank * batch
        allowed = self._allowed(own, all_pos.shape[0], all_neg.shape[0], per_query, in_batch_negatives)
        candidate_keys = None
        if keys is not None:
            candidate_keys = torch.cat([gather_without_grad(keys.positives), gather_without_grad(keys.negatives.reshape(-1))])
            allowed &= self._not_a_copy_of_the_positive(candidate_keys, keys.positives, own)
        logits = (queries @ candidates.T).masked_fill(~allowed, float("-inf"))
        if self.mixing is not None:
            negative_mask = allowed.clone()
            negative_mask[torch.arange(batch), own] = False
            if candidate_keys is not None:
                negative_mask = distinct_allowed(negative_mask, candidate_keys)
            hardest = hardest_negatives(queries.detach(), candidates.detach(), negative_mask, self.mixing.top_k)
            synthetic = synthesise(queries.detach(), hardest, self.mixing, self.generator, rank, size)
            logits = torch.cat([logits, torch.einsum("bd,bmd->bm", queries, synthetic)], dim=1)
        return focal_infonce(logits / self.temperature, own, self.focal_gamma)

    @staticmethod
    def _not_a_copy_of_the_positive(candidate_keys: Tensor, positive_keys: Tensor, own: Tensor) -> Tensor:
        """[B, candidates] False where a candidate other than the row's own positive column is the
        same text as the row's positive (a repeated positive in the batch is no negative)."""
        copies = candidate_keys[None, :] == positive_keys[:, None]
        copies[torch.arange(len(own), device=own.device), own] = False
        return ~copies

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


class MatryoshkaLoss(StackedLoss):
    """A contrastive loss summed over nested prefixes of the embedding (Matryoshka representations).

    For dims d_1 > d_2 > ... and weights w_k, with t_d(x) = x[:d] / ||x[:d]|| (the first d
    coordinates, re-normalised)::

        L = sum_k  w_k * base(t_{d_k}(q), t_{d_k}(p), t_{d_k}(n))

    so every prefix of the embedding is itself a usable embedding.

    Args:
        base: the loss applied at every dimension, e.g. :class:`KalmContrastiveLoss` (its focal
            weight and mixing act per dimension; mixing draws fresh synthetic negatives for each).
        dims: strictly decreasing prefix sizes, each <= the embedding size at call time.
        weights: one positive weight per dim.

    Inputs:
        As ``base``: ``forward(queries, positives, negatives, in_batch_negatives, keys)`` and
        :meth:`from_stacked`. Returns a scalar.

    References:
        - Matryoshka Representation Learning (Kusupati et al., 2022, arXiv 2205.13147).
        - The KaLM-Embedding authors' released training script trains Qwen2-0.5B with dims
          896/512/256/128/64 and weights 1/0.3/0.2/0.1/0.1; the KaLM-Embedding-V2 model card lists
          the same Matryoshka dims.

    Relations:
        With ``dims=[D]`` (the full size) and ``weights=[1]`` it equals ``base``; sentence-transformers'
        ``MatryoshkaLoss`` computes the same weighted sum around its own losses.

    Example::

        >>> import torch, torch.nn.functional as F
        >>> loss_fn = MatryoshkaLoss(KalmContrastiveLoss(temperature=0.05), dims=[8, 4], weights=[1.0, 0.3])
        >>> q, p = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
        >>> loss_fn(q, p).shape
        torch.Size([])
    """

    def __init__(self, base: KalmContrastiveLoss, dims: Sequence[int], weights: Sequence[float]) -> None:
        super().__init__()
        dims, weights = list(dims), list(weights)
        if not dims or len(dims) != len(weights):
            raise ValueError(f"matryoshka: need one weight per dim, got dims {dims} and weights {weights}")
        if any(d < 1 for d in dims) or any(a <= b for a, b in zip(dims, dims[1:])):
            raise ValueError(f"matryoshka: dims must be positive and strictly decreasing, got {dims}")
        if any(w <= 0 for w in weights):
            raise ValueError(f"matryoshka: weights must be > 0, got {weights}")
        self.base = base
        self.dims = dims
        self.weights = weights

    def forward(
        self,
        queries: Tensor,
        positives: Tensor,
        negatives: Tensor | None = None,
        in_batch_negatives: bool = True,
        keys: TextKeys | None = None,
    ) -> Tensor:
        """Weighted sum of ``base`` over the truncated, re-normalised embeddings."""
        if self.dims[0] > queries.shape[-1]:
            raise ValueError(f"matryoshka: dim {self.dims[0]} exceeds the embedding size {queries.shape[-1]}")
        total = queries.new_zeros(())
        for dim, weight in zip(self.dims, self.weights):
            cut = [None if x is None else F.normalize(x[..., :dim], dim=-1) for x in (queries, positives, negatives)]
            total = total + weight * self.base(*cut, in_batch_negatives, keys)
        return total
