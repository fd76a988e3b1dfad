"""Length-sorted chunks: embed a step's texts in forward passes that compute little padding.

A padded forward pass costs (rows x longest length) tokens whatever the real lengths are. Sorting
all texts of a step (queries, positives and negatives together) by token count and cutting the
sorted list into chunks of similar lengths makes the computed tokens close to the real ones.
Embeddings come back in the original order, so the loss sees the same values as with one padded
pass (up to float rounding: the padding is masked out either way).

A chunk closes when one more text would take it past ``max_tokens`` padded tokens (the memory of
one forward pass) or its padding past ``max_padding`` of its tokens (the compute wasted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .encoder import Encoder

MAX_PADDING = 0.1


@dataclass(frozen=True)
class Chunk:
    """One forward pass: positions of its texts in the step's list and their padded features."""

    rows: list[int]
    features: dict[str, Tensor]


def length_sorted_chunks(lengths: Sequence[int], max_tokens: int, max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Indices of ``lengths`` grouped longest first into chunks within both budgets.

    A text longer than ``max_tokens`` gets a chunk of its own. Raises ValueError for a budget
    below 1 token or a padding share outside [0, 1).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not 0.0 <= max_padding < 1.0:
        raise ValueError(f"max_padding must be in [0, 1), got {max_padding}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        if current:
            width = lengths[current[0]]
            padded = (len(current) + 1) * width
            if padded > max_tokens or padded - real - lengths[i] > max_padding * padded:
                chunks.append(current)
                current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        chunks.append(current)
    return chunks


def plan_chunks(encoder: Encoder, texts: Sequence[str], max_tokens: int, max_padding: float = MAX_PADDING) -> list[Chunk]:
    """Tokenise ``texts`` once and pad them chunk by chunk (see :func:`length_sorted_chunks`)."""
    if not texts:
        raise ValueError("no texts to embed")
    ids = encoder.token_ids(texts)
    chunks = length_sorted_chunks([len(x) for x in ids], max_tokens, max_padding)
    return [Chunk(rows, encoder.pad([ids[i] for i in rows])) for rows in chunks]


def restore_order(chunks: Sequence[Chunk]) -> Tensor:
    """Index that puts the concatenated chunk outputs back into the texts' original order."""
    rows = torch.tensor([r for chunk in chunks for r in chunk.rows])
    return torch.argsort(rows)


def embed_chunks(model: torch.nn.Module, chunks: Sequence[Chunk]) -> Tensor:
    """Embeddings [N, D] of all chunked texts in their original order (graph kept)."""
    out = torch.cat([model(chunk.features) for chunk in chunks])
    return out[restore_order(chunks).to(out.device)]
