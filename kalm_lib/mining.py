"""Offline hard-negative mining with the previous stage's model, as in the paper's stage-2 data.

For each row (query q, positive p) the miner ranks a candidate pool by cosine similarity to q and
samples negatives from the window of ranks [rank_min, rank_max): close enough to be hard, far
enough down the list to rarely be unlabelled positives. The authors' released mining script
(HITsz-TMG/KaLM-Embedding, ``hn_mine.py``) is followed where it says what it does:

* the query text itself and the row's positive are never negatives; we also ban every word
  related (synonym) to either, in both directions, and compare by
  :func:`~kalm_lib.builders.word_key`, so "folk tale" is banned with "folktale". Given negatives
  (antonyms) are kept;
* ranking-consistency filter: a row whose positive scores below the candidate at the window's
  start (more than rank_min other candidates rank above the answer) is dropped;
* rows short of negatives are padded with random pool candidates instead of cutting every row
  to the shortest one.

Robust to float noise: scores are rounded to ``score_decimals`` and ranked by (rounded score
descending, pool index ascending), so a 1e-6 change of an embedding (another CPU's kernels) moves a
candidate across the window's edge only when it crosses a rounding boundary; the window is then
read in pool order and each row draws from its own RNG stream, so one changed row never shifts
another row's draws.

Memory is bounded by blocks: embeddings are encoded in batches (and, with several processes,
in one shard per process, gathered), and scores are computed ``block_queries`` x ``block_pool``
at a time with a running top-k per query (:func:`top_ranked`), never the queries x pool matrix.
Beside the embeddings, mining needs O(block_queries x (block_pool + k)) memory whatever the
number of queries and the pool size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .builders import word_key
from .curation import file_sha256
from .data_cards import DataCard, write_card
from .distributed import gather_rows, shard
from .encoder import Encoder
from .instructions import format_instructed
from .layout import RunLayout
from .outputs import is_main_process, write_output

_TIE_BITS = 32  # pool indices live in the low bits of the ranking key
MAX_DECIMALS = 8  # |score| <= 1, so round(score * 10^8) fits the 31 bits above them


@dataclass(frozen=True)
class MiningConfig:
    """How many negatives to mine per row, from which ranks, and how scores are ranked."""

    count: int  # M: negatives per row (given ones such as antonyms first)
    rank_min: int  # window [rank_min, rank_max) of the ranked pool, after banned candidates are removed
    rank_max: int
    score_decimals: int = 4  # scores rounded to this many decimals before ranking (float-noise guard), 0..8
    consistency_filter: bool = True  # drop rows whose positive ranks below the window start
    block_queries: int = 1024  # queries scored at once (a [block_queries, block_pool] float32 block: 64 MiB)
    block_pool: int = 16384  # pool candidates scored at once
    seed: int = 0  # per-row RNG streams derive from (seed, row)
    banned_margin: int = 64  # extra ranks fetched so banned candidates can be skipped

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"mining: count must be >= 0, got {self.count}")
        if not 0 <= self.rank_min < self.rank_max:
            raise ValueError(f"mining: need 0 <= rank_min < rank_max, got [{self.rank_min}, {self.rank_max})")
        if self.block_queries < 1 or self.block_pool < 1:
            raise ValueError(f"mining: block sizes must be >= 1, got block_queries={self.block_queries}, block_pool={self.block_pool}")
        if not 0 <= self.score_decimals <= MAX_DECIMALS:  # the ranking key holds scores * 10^d in 31 bits
            raise ValueError(f"mining: score_decimals must lie in [0, {MAX_DECIMALS}], got {self.score_decimals}")


@dataclass
class MiningResult:
    """The mined rows and what the mining did (see :func:`mining_quality`)."""

    frame: pd.DataFrame
    dropped_inconsistent: int = 0
    padded_rows: int = 0
    quality: dict[str, float] = field(default_factory=dict)
    samples: pd.DataFrame = field(default_factory=pd.DataFrame)


def needs_mining(card: DataCard) -> bool:
    """Stage-2 sets whose negatives are mined: all but classification-style sets (fixed labels)."""
    return card.stage == "finetune" and card.task_type != "classification"


def pool_table(sources: Mapping[str, pd.DataFrame], held_out_keys: frozenset[str]) -> pd.DataFrame:
    """The candidate corpus of the lexical sets: every word of the sources (columns ``word``,
    ``synonym``, ``antonym``; ~100k headwords and lemmas) whose :func:`~kalm_lib.builders.word_key`
    is not held out, sorted, with the words related to it (synonyms, both directions), which
    mining never pairs with it."""
    words: set[str] = set()
    related: dict[str, set[str]] = {}
    for frame in sources.values():
        for column in ("word", "synonym", "antonym"):
            if column in frame:
                words.update(frame[column].dropna().astype(str))
        if "synonym" in frame:
            for a, b in zip(frame["word"], frame["synonym"]):
                related.setdefault(a, set()).add(b)
                related.setdefault(b, set()).add(a)
    texts = sorted(w for w in words if w and word_key(w) not in held_out_keys)
    return pd.DataFrame({"text": texts, "related": [sorted(related.get(t, ())) for t in texts]})


def write_mined(frame: pd.DataFrame, card: DataCard, layout: RunLayout) -> None:
    """Write the mined shard and point the set's filled card at it (size and SHA-256 updated); main process only."""
    if not is_main_process():
        return
    path = layout.mined_shard(card.name)
    write_output(frame, path)
    record = card.filled(size=len(frame), sha256=file_sha256(path),
                         file=str(path.relative_to(layout.data)), mined_with="stage1")
    write_card(record, layout.card(card.name))


def quantised(scores: torch.Tensor, decimals: int) -> torch.Tensor:
    """int64 grid points round(score * 10^decimals) (float64 product): the rounded score mining ranks by.

    Monotone in the score (IEEE products and rounding are monotone), so a higher float score is
    never on a lower grid point; :func:`block_best_keys` relies on it.
    """
    return torch.round(scores.double() * 10**decimals).long()


def ranking_keys(scores: torch.Tensor, pool_offset: int, decimals: int) -> torch.Tensor:
    """int64 keys ordering candidates by rounded score (descending), then pool index (ascending).

    key = round(score * 10^decimals) * 2^32 - (pool_offset + column): unique per candidate, so
    ``topk`` on keys is exact and independent of the kernel's tie handling.
    """
    index = torch.arange(scores.shape[1], dtype=torch.long, device=scores.device) + pool_offset
    return (quantised(scores, decimals) << _TIE_BITS) - index


def block_best_keys(scores: torch.Tensor, pool_offset: int, k: int, decimals: int) -> torch.Tensor:
    """The ``k`` best :func:`ranking_keys` of each row of one [B, P] score block, best first.

    Exact without keying every score: take the ``2k`` best float scores of each row (one float
    ``topk``) and key only those. Every column left out scores at most the ``2k``-th value s_2k, so
    it sits on grid point q(s_2k) or lower; where q(s_2k) < q(s_k) (the k-th value), no left-out
    column can reach the k best keys, whatever its index. Rows where q(s_2k) = q(s_k) (more than k
    scores on one grid point: duplicate vectors, coarse ``decimals``) are keyed in full.
    """
    width = scores.shape[1]
    if k == 0 or width <= 2 * k:
        return ranking_keys(scores, pool_offset, decimals).topk(min(k, width), dim=1).values
    values, columns = scores.topk(2 * k, dim=1)  # sorted, best first
    grid = quantised(values, decimals)
    best = ((grid << _TIE_BITS) - (columns + pool_offset)).topk(k, dim=1).values
    tied = (grid[:, -1] == grid[:, k - 1]).nonzero().squeeze(1)
    if len(tied):
        best[tied] = ranking_keys(scores[tied], pool_offset, decimals).topk(k, dim=1).values
    return best


def keys_above(scores: torch.Tensor, pool_offset: int, floor: torch.Tensor, decimals: int) -> torch.Tensor:
    """[B, c] :func:`ranking_keys` of the columns of a score block that may lie above grid point
    ``floor[b]`` of their row (the rest of each row padded with the smallest int64), c the most any row has.

    A column reaches grid point floor + 1 only if score * 10^d >= floor + 0.5, so a float threshold
    (floor + 0.5) / 10^d, lowered by 1e-6 against float32 rounding, keeps a superset of them: one
    comparison per score instead of a ``topk``.
    """
    threshold = ((floor.double() + 0.5) / 10**decimals - 1e-6).float()
    rows, columns = (scores >= threshold[:, None]).nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=len(scores))
    slot = torch.arange(len(rows), device=scores.device) - (torch.cumsum(counts, 0) - counts)[rows]  # rank of the column within its row
    keys = torch.full((len(scores), int(counts.max()) if len(rows) else 0), torch.iinfo(torch.long).min, dtype=torch.long,
                      device=scores.device)
    keys[rows, slot] = (quantised(scores[rows, columns], decimals) << _TIE_BITS) - (columns + pool_offset)
    return keys


def grid_of(keys: torch.Tensor) -> torch.Tensor:
    """The grid point round(score * 10^d) a :func:`ranking_keys` key carries in its high bits."""
    return (keys + (1 << _TIE_BITS) - 1) >> _TIE_BITS


def pool_indices(keys: torch.Tensor) -> np.ndarray:
    """The pool index each :func:`ranking_keys` key carries in its low 32 bits."""
    low = keys & ((1 << _TIE_BITS) - 1)
    return (((1 << _TIE_BITS) - low) % (1 << _TIE_BITS)).cpu().numpy()


def top_ranked(query_vecs: np.ndarray, pool_vecs: np.ndarray, k: int, cfg: MiningConfig,
               device: torch.device | str = "cpu") -> np.ndarray:
    """[Q, k] pool indices of each query's k best candidates by :func:`ranking_keys`, best first.

    Blocked and exact: for each block of ``cfg.block_queries`` queries, the pool is scanned
    ``cfg.block_pool`` candidates at a time, in pool order, into a running [block_queries, k]
    top-k of keys. Each [block_queries, block_pool] score block (cosine = dot product of unit
    vectors) contributes its k best keys (:func:`block_best_keys`) until the running top-k is
    full; after that only the columns above the grid point of each row's k-th key
    (:func:`keys_above`): a later column has a larger pool index, so on the k-th key's grid point
    it ranks below it. Keys are unique, so the result equals ranking each full row of the
    queries x pool matrix, ties included, for any block sizes; memory is
    O(block_queries x (block_pool + k)) beside the embeddings, whatever Q and the pool size.

    On ``device`` (e.g. the encoder's GPU): the pool is copied there once, each query block as it
    is scored; only the [Q, k] indices come back. Float kernels differ by device; the rounded
    ranking keys absorb that except at a rounding boundary (as across CPUs).
    """
    k = min(k, len(pool_vecs))
    pool = torch.from_numpy(pool_vecs).to(device)
    out = np.empty((len(query_vecs), k), dtype=np.int64)
    for q0 in range(0, len(query_vecs), cfg.block_queries):
        queries = torch.from_numpy(query_vecs[q0 : q0 + cfg.block_queries]).to(device)
        best = torch.empty(len(queries), 0, dtype=torch.long, device=device)
        for p0 in range(0, len(pool), cfg.block_pool):
            scores = queries @ pool[p0 : p0 + cfg.block_pool].T
            if best.shape[1] < k:
                block = block_best_keys(scores, p0, k, cfg.score_decimals)
            else:
                block = keys_above(scores, p0, grid_of(best[:, -1]), cfg.score_decimals)
            best = torch.cat([best, block], dim=1).topk(min(k, best.shape[1] + block.shape[1]), dim=1).values
        out[q0 : q0 + len(queries)] = pool_indices(best)
    return out


def encode_sharded(encoder: Encoder, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """[len(texts), H] float32 embeddings: each process encodes its contiguous shard of ``texts``
    (``batch_size`` at a time, :meth:`Encoder.encode`) and the shards are gathered in order. On one
    process this is ``encoder.encode(texts, batch_size)``."""
    return gather_rows(encoder.encode(list(texts[shard(len(texts))]), batch_size))


def top_ranked_sharded(query_vecs: np.ndarray, pool_vecs: np.ndarray, k: int, cfg: MiningConfig,
                       device: torch.device | str = "cpu") -> np.ndarray:
    """:func:`top_ranked` (on ``device``) with the queries split into one contiguous shard per process,
    gathered in order (every process gets the whole [Q, k]); :func:`top_ranked` itself on one process."""
    return gather_rows(top_ranked(query_vecs[shard(len(query_vecs))], pool_vecs, k, cfg, device))


def _on_grid(score: float, decimals: int) -> int:
    """A score on the ranking grid (what :func:`ranking_keys` compares)."""
    return round(float(score) * 10**decimals)


def related_by_key(related: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """A word -> related words map re-keyed by :func:`~kalm_lib.builders.word_key` on both sides
    (spellings of one word pool their relations)."""
    keyed: dict[str, set[str]] = {}
    for word, others in related.items():
        keyed.setdefault(word_key(word), set()).update(word_key(o) for o in others)
    return keyed


def banned_keys(query: str, positive: str, related: Mapping[str, set[str]]) -> set[str]:
    """Word keys a row must never get as negatives: its query text, its positive and every word
    related to either (``related`` keyed as :func:`related_by_key` returns it)."""
    keys = {word_key(query), word_key(positive)}
    return keys.union(*(related.get(k, set()) for k in list(keys)))


def mine_hard_negatives(
    frame: pd.DataFrame,
    card: DataCard,
    encoder: Encoder,
    pool: Sequence[str],
    cfg: MiningConfig,
    related: Mapping[str, set[str]] | None = None,
    batch_size: int = 256,
) -> MiningResult:
    """Fill ``negatives`` up to ``cfg.count`` per row from the rank window of ``pool``.

    The pool is extended with the set's own positives and given negatives. Given negatives (e.g.
    antonyms) come first; mined ones follow, drawn uniformly from the window; a row whose window
    holds too few candidates is padded with random pool candidates. Queries are encoded with the
    card's instruction, candidates with it only for symmetric cards (documents stay bare).

    Each query's k = ``rank_max + banned_margin`` best candidates are ranked exactly by
    (rounded score, pool index) in blocks (:func:`top_ranked`); banned candidates are removed from
    that list before the window [rank_min, rank_max) is read. Encoding and ranking are split
    across processes when torch.distributed is initialised (every process gets the same result);
    on one process they run in a loop.
    """
    related = related_by_key(related or {})
    pool = sorted(set(pool) | set(frame["positive"]) | {n for negs in frame["negatives"] for n in negs})
    pool_keys = [word_key(text) for text in pool]
    if len(pool) <= cfg.rank_min:
        raise ValueError(f"{card.name}: candidate pool of {len(pool)} is not larger than rank_min={cfg.rank_min}")
    doc_instruction = card.instruction if card.symmetric else ""
    pool_vecs = encode_sharded(encoder, [format_instructed(doc_instruction, t) for t in pool], batch_size)
    query_vecs = encode_sharded(encoder, [format_instructed(card.instruction, q) for q in frame["query"]], batch_size)
    position = {text: i for i, text in enumerate(pool)}
    positive_scores = np.einsum("qd,qd->q", query_vecs, pool_vecs[[position[p] for p in frame["positive"]]])
    ranked = top_ranked_sharded(query_vecs, pool_vecs, cfg.rank_max + cfg.banned_margin, cfg, encoder.device)

    keep, mined, padded = [], [], 0
    for row, (query, positive, given) in enumerate(zip(frame["query"], frame["positive"], frame["negatives"])):
        banned = banned_keys(query, positive, related)
        order = [i for i in ranked[row] if pool_keys[i] not in banned]
        window = sorted(order[cfg.rank_min : cfg.rank_max])  # pool order: membership matters, not rank
        if cfg.consistency_filter and len(order) > cfg.rank_min:
            start = query_vecs[row] @ pool_vecs[order[cfg.rank_min]]
            if _on_grid(positive_scores[row], cfg.score_decimals) < _on_grid(start, cfg.score_decimals):
                continue
        rng = np.random.default_rng([cfg.seed, row])
        chosen = [n for n in dict.fromkeys(given) if word_key(n) not in banned][: cfg.count]
        taken = banned | {word_key(n) for n in chosen}
        picks = [pool[i] for i in rng.permutation(window) if pool_keys[i] not in taken]
        chosen += picks[: cfg.count - len(chosen)]
        if len(chosen) < cfg.count:
            padded += 1
            chosen += _random_candidates(pool, pool_keys, taken | {word_key(n) for n in chosen}, cfg.count - len(chosen), rng)
        keep.append(row)
        mined.append(chosen)
    out = frame.iloc[keep].copy()
    out["negatives"] = mined
    out = out.reset_index(drop=True)
    vectors = (query_vecs[keep], pool_vecs, position)
    return MiningResult(
        frame=out,
        dropped_inconsistent=len(frame) - len(keep),
        padded_rows=padded,
        quality=mining_quality(out, vectors, cfg.seed),
        samples=out[["query", "positive", "negatives"]].head(5),
    )


def _random_candidates(pool: Sequence[str], keys: Sequence[str], banned: set[str], count: int,
                       rng: np.random.Generator) -> list[str]:
    """``count`` random pool candidates with distinct word keys outside ``banned`` (fewer if the
    pool runs out)."""
    picks: list[str] = []
    taken = set(banned)
    for index in rng.permutation(len(pool)):
        if keys[index] not in taken:
            picks.append(pool[index])
            taken.add(keys[index])
            if len(picks) == count:
                break
    return picks


def mining_quality(
    mined: pd.DataFrame, vectors: tuple[np.ndarray, np.ndarray, Mapping[str, int]], seed: int
) -> dict[str, float]:
    """Is the mining hard and diverse? Over every negative slot of ``mined``:

    * ``distinct_ratio`` = distinct negatives / slots (1 = no negative repeats);
    * ``top10_share`` = slots filled by the 10 most frequent negatives / slots (hubs show here);
    * ``mean_cos_negative`` = mean cos(q, negative) and ``mean_cos_random`` = mean cos(q, r) for one
      uniformly drawn pool candidate r per slot: hard negatives must sit clearly above random.
    """
    query_vecs, pool_vecs, position = vectors
    slots = [n for negatives in mined["negatives"] for n in negatives]
    if not slots:
        return {"slots": 0.0}
    counts = Counter(slots)
    rows = np.repeat(np.arange(len(mined)), [len(n) for n in mined["negatives"]])
    negatives = np.array([position[n] for n in slots])
    random = np.random.default_rng(seed).integers(len(pool_vecs), size=len(slots))
    return {
        "slots": float(len(slots)),
        "distinct_ratio": len(counts) / len(slots),
        "top10_share": sum(c for _, c in counts.most_common(10)) / len(slots),
        "mean_cos_negative": float(paired_dots(query_vecs, rows, pool_vecs, negatives).mean()),
        "mean_cos_random": float(paired_dots(query_vecs, rows, pool_vecs, random).mean()),
    }


def paired_dots(left: np.ndarray, left_rows: np.ndarray, right: np.ndarray, right_rows: np.ndarray,
                chunk: int = 65536) -> np.ndarray:
    """left[left_rows[s]] . right[right_rows[s]] for every slot s, ``chunk`` slots at a time (never
    a [slots, dim] copy of the vectors)."""
    return np.concatenate([
        np.einsum("sd,sd->s", left[left_rows[start : start + chunk]], right[right_rows[start : start + chunk]])
        for start in range(0, len(left_rows), chunk)
    ])
