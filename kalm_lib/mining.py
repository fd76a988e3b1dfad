"""Offline hard-negative mining with a previous model, as in the paper's stage-2 data.

For each query, rank a candidate pool (the set's own positives) by cosine similarity with an
encoder and sample negatives from ranks [rank_min, rank_max): close enough to be hard, far enough
down the list to rarely be unlabelled positives. Known positives and synonyms of the positive
(``exclude``) are never used. Existing negatives (e.g. antonyms) are kept first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from .data_cards import DataCard
from .encoder import Encoder
from .instructions import format_instructed


def mine_hard_negatives(
    frame: pd.DataFrame,
    card: DataCard,
    encoder: Encoder,
    count: int,
    rank_min: int,
    rank_max: int,
    rng: np.random.Generator,
    exclude: dict[str, set[str]] | None = None,
    batch_size: int = 128,
) -> pd.DataFrame:
    """Return ``frame`` with ``negatives`` filled up to ``count`` per row from the rank window."""
    pool: Sequence[str] = sorted(set(frame["positive"]))
    if len(pool) <= rank_min:
        raise ValueError(f"{card.name}: candidate pool of {len(pool)} is smaller than rank_min={rank_min}")
    doc_instruction = card.instruction if card.symmetric else ""
    pool_vecs = torch.from_numpy(encoder.encode([format_instructed(doc_instruction, t) for t in pool], batch_size))
    query_vecs = torch.from_numpy(encoder.encode([format_instructed(card.instruction, q) for q in frame["query"]], batch_size))
    window = min(rank_max, len(pool))
    ranked = (query_vecs @ pool_vecs.T).topk(window, dim=1).indices[:, rank_min:].numpy()
    exclude = exclude or {}
    mined = []
    for row, (positive, existing) in enumerate(zip(frame["positive"], frame["negatives"])):
        banned = {positive, *exclude.get(positive, ())}
        chosen = [n for n in existing if n not in banned][:count]
        candidates = [pool[i] for i in rng.permutation(ranked[row]) if pool[i] not in banned and pool[i] not in chosen]
        mined.append(chosen + candidates[: count - len(chosen)])
    out = frame.copy()
    out["negatives"] = mined
    out["words"] = [list(dict.fromkeys([*w, *n])) for w, n in zip(frame["words"], mined)]
    return out
