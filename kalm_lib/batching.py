"""Task-homogeneous batches: every global batch comes from one derived set.

The whole plan (which set, which rows, for every step) is a pure function of the set sizes, batch
size, step count and seed, so a resumed run replays exactly the batches an uninterrupted run sees,
and several processes split each global batch into equal contiguous shards.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .data_cards import DataCard
from .instructions import format_instructed
from .shards import ShardRows

TrainRows = pd.DataFrame | ShardRows  # a training set: in memory, or Parquet shards read a batch at a time

_LOG = logging.getLogger(__name__)


def text_key(text: str) -> int:
    """A 63-bit key of a text, the same on every process and run (Python's ``hash`` is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


@dataclass(frozen=True)
class Batch:
    """Texts of one (local) batch, ready for the encoder, with keys that tell equal texts apart
    from different ones (the loss never counts a candidate equal to a row's positive as negative)."""

    source: str
    queries: list[str]
    positives: list[str]
    negatives: list[str]
    negatives_per_query: int
    in_batch_negatives: bool
    positive_keys: list[int] = field(init=False)
    negative_keys: list[int] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "positive_keys", [text_key(t) for t in self.positives])
        object.__setattr__(self, "negative_keys", [text_key(t) for t in self.negatives])

    @property
    def texts(self) -> list[str]:
        """All texts of the batch, stacked as the loss expects: queries, positives, negatives."""
        return self.queries + self.positives + self.negatives


def batch_plan(sizes: dict[str, int], batch_size: int, steps: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """(set name, row indices) for each step; sets drawn in proportion to their size, epochs cycle.

    A set smaller than one batch is never drawn from (a warning names it); none large enough is an
    error.
    """
    usable = {name: size for name, size in sizes.items() if size >= batch_size}
    if not usable:
        raise ValueError(f"batch_size {batch_size} exceeds every training set ({sizes})")
    for name in sorted(set(sizes) - set(usable)):
        _LOG.warning("set %r has %d rows, fewer than one batch (%d): skipped", name, sizes[name], batch_size)
    rng = np.random.default_rng(seed)
    plan: list[tuple[str, np.ndarray]] = []
    while len(plan) < steps:
        epoch = []
        for name in sorted(usable):
            order = rng.permutation(usable[name])
            epoch += [(name, order[i : i + batch_size]) for i in range(0, usable[name] - batch_size + 1, batch_size)]
        plan += [epoch[i] for i in rng.permutation(len(epoch))]
    return plan[:steps]


def negatives_per_query(frame: TrainRows, wanted: int) -> int:
    """Hard negatives every row of the set can provide, capped at ``wanted``."""
    if isinstance(frame, ShardRows):
        return min(wanted, frame.min_list_length("negatives"))
    counts = frame["negatives"].map(len)
    return int(min(wanted, counts.min())) if len(counts) else 0


def make_batch(frame: TrainRows, card: DataCard, rows: np.ndarray, n_neg: int, rank: int, world_size: int) -> Batch:
    """This process's shard of a global batch, with instructions applied."""
    if len(rows) % world_size:
        raise ValueError(f"batch size {len(rows)} is not divisible by {world_size} processes")
    shard = len(rows) // world_size
    part = frame.iloc[rows[rank * shard : (rank + 1) * shard]]
    doc_instruction = card.instruction if card.symmetric else ""
    return Batch(
        source=card.name,
        queries=[format_instructed(card.instruction, t) for t in part["query"]],
        positives=[format_instructed(doc_instruction, t) for t in part["positive"]],
        negatives=[format_instructed(doc_instruction, n) for negs in part["negatives"] for n in list(negs)[:n_neg]],
        negatives_per_query=n_neg,
        in_batch_negatives=card.in_batch_negatives,
    )
