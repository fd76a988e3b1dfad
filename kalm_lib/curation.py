"""Data curation: normalise, filter, de-duplicate and decontaminate derived sets, then write shards.

Sources are normalised (NFKC, white space) and cleaned (:data:`kalm_lib.builders.SOURCE_CLEANERS`:
no definition containing its own word, no cross-references or markup) when loaded. Order for every
training set: length filter -> exact de-duplication -> drop examples touching held-out evaluation
words (any spelling) or repeating evaluation texts (contamination) -> random pool of twice the cap
-> drop rows whose query or positive is a near-duplicate of an evaluation text (MinHash LSH over
character 5-grams; the local tasks' texts and, on hub hosts, those of the standard mteb tasks) ->
near-duplicate removal within the set (MinHash LSH over ``query || positive``) -> cap to the
profile's size. Each step's row count goes into the curation summary, and a set with fewer rows
than one batch of the stage that trains on it is flagged there (``below_one_batch``) and in the log:
training never draws from it.

Two seeds: the profile seed fixes the held-out split and the evaluation tasks; the sample seed
(:func:`sample_seed`) fixes which training rows are drawn, so curation variance can be measured on
unchanged evaluation tasks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from datasets import Dataset
from datasketch import MinHashLSH
from pandas.api.types import is_string_dtype

from .batching import TrainRows
from .builders import (
    EVAL_BUILDERS,
    SINGLE_INPUT_BUILDERS,
    SOURCE_CLEANERS,
    TRAIN_BUILDERS,
    EvalTask,
    Sources,
    is_held_out,
    word_key,
)
from .config import DataConfig
from .data_cards import DataCard, DataCardError, load_cards, write_card
from .dedup import NUM_PERM, near_dedup_shards, signatures
from .eval_index import BandIndex
from .layout import RunLayout
from .outputs import write_output
from .shards import ShardRows
from .sources import load_source

if TYPE_CHECKING:
    from mteb import AbsTask

_LOG = logging.getLogger(__name__)
_SPACE = re.compile(r"\s+")
_NOT_TEXT = re.compile(r"(?:.*[-_])?(?:id|qid|docid|labels?)", re.IGNORECASE)  # mteb columns holding ids or labels
_EVAL_SIZE = {
    "definition_retrieval_task": "eval_retrieval_queries",
    "synonym_antonym_task": "eval_pairs",
    "synset_clustering_task": "eval_clusters",
}


def normalise(text: str) -> str:
    """NFKC, collapse white space, strip."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", str(text))).strip()


def length_filter(frame: pd.DataFrame, min_chars: int, max_chars: int) -> pd.DataFrame:
    """Keep rows whose query and positive lengths lie in [min_chars, max_chars]."""
    keep = np.ones(len(frame), dtype=bool)
    for column in ("query", "positive"):
        lengths = frame[column].str.len()
        keep &= (lengths >= min_chars).to_numpy() & (lengths <= max_chars).to_numpy()
    return frame[keep]


def exact_dedup(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop rows with the same case-folded (query, positive)."""
    key = frame["query"].str.casefold() + "\x1f" + frame["positive"].str.casefold()
    return frame[~key.duplicated()]


def decontaminate(frame: pd.DataFrame, eval_words: frozenset[str], eval_texts: frozenset[str]) -> pd.DataFrame:
    """Drop rows that touch a held-out word (compared by :func:`~kalm_lib.builders.word_key`, so in
    any spelling) or repeat a held-out text as query, positive or negative."""
    keys = {word_key(word) for word in eval_words}
    held = {word for word in frame["words"].explode().dropna().unique() if word_key(word) in keys}
    touches_word = frame["words"].map(lambda words: any(w in held for w in words))
    repeats_text = frame["query"].isin(eval_texts) | frame["positive"].isin(eval_texts)
    negative_hit = frame["negatives"].map(lambda negs: any(n in eval_texts for n in negs))
    return frame[~(touches_word | repeats_text | negative_hit)]


def drop_eval_near_duplicates(frame: pd.DataFrame, index: BandIndex) -> pd.DataFrame:
    """Drop rows whose query or positive shares an LSH band with an evaluation text
    (:meth:`~kalm_lib.eval_index.BandIndex.flags`: shingle Jaccard about the index's threshold or more)."""
    texts = pd.unique(pd.concat([frame["query"], frame["positive"]])).tolist()
    near = {text for text, flagged in zip(texts, index.flags(texts)) if flagged}
    return frame[~(frame["query"].isin(near) | frame["positive"].isin(near))]


def near_dedup(frame: pd.DataFrame, threshold: float, engine: str = "datatrove", workers: int = 1) -> pd.DataFrame:
    """Drop rows whose ``query || positive`` shingle Jaccard with another row exceeds ``threshold``.

    ``engine`` ``datatrove`` (the default): datatrove's MinHash pipeline through Parquet shards on
    its local executor (:func:`~kalm_lib.dedup.near_dedup_shards`, ``workers`` processes), one row
    kept per cluster of near-duplicates. ``datasketch``: the in-memory LSH the study used before
    issue #14, kept for the old-versus-new comparison (``benchmarks/curation_engines.py``).
    """
    if engine == "datatrove":
        return near_dedup_shards(frame, threshold, workers)
    if engine == "datasketch":
        return _near_dedup_datasketch(frame, threshold)
    raise ValueError(f"near-duplicate engine {engine!r} unknown; known: datatrove, datasketch")


def _near_dedup_datasketch(frame: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Keep the first of each group of rows whose ``query || positive`` Jaccard exceeds threshold
    (in-memory datasketch LSH, rows in order)."""
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    keep = []
    for index, signature in enumerate(signatures((frame["query"] + " || " + frame["positive"]).tolist())):
        if lsh.query(signature):
            continue
        lsh.insert(str(index), signature)
        keep.append(index)
    return frame.iloc[keep]


SHARED_COLLECTIONS = frozenset({"corpus"})  # retrieval / reranking document collections: not decontaminated against


def task_texts(tasks: Iterable[AbsTask]) -> frozenset[str]:
    """The evaluation texts of the given mteb tasks a training row must not copy: after
    ``task.load_data()``, the string values of every column (ids and labels aside) of every
    ``Dataset`` in ``task.dataset``, however nested (subset -> split -> queries / sentences ...),
    lists of strings included, except the document collections (:data:`SHARED_COLLECTIONS`).

    A retrieval corpus is shared with training collections by design (MS MARCO's passages are the
    training and the evaluation corpus) and is large (tens of millions of documents over
    MTEB(eng, v1) and MTEB(cmn, v1)): decontaminating against it would drop the paper's training
    sets and could not be indexed in memory. Test queries, pairs, sentences and labels texts are
    what a model must not have seen."""
    texts: set[str] = set()
    for task in tasks:
        task.load_data()
        texts.update(_dataset_texts(task.dataset))
    return frozenset(text for text in texts if text.strip())


def _dataset_texts(node: Any) -> Iterator[str]:
    """Strings in the text columns of the Datasets inside ``node`` (a Dataset or nested mappings)."""
    if isinstance(node, Dataset):
        for column in node.column_names:
            if not _NOT_TEXT.fullmatch(column):
                yield from _strings(node[column])
    elif isinstance(node, Mapping):
        for key, value in node.items():
            if key not in SHARED_COLLECTIONS:
                yield from _dataset_texts(value)


def _strings(values: Iterable[Any]) -> Iterator[str]:
    """The strings among ``values``, descending into lists."""
    for value in values:
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            yield from _strings(value)


def sample_seed(cfg: DataConfig, seed: int) -> int:
    """Seed of the curation's sampling (which training rows are kept; mining's draws):
    ``cfg.sample_seed``, or the profile ``seed`` when that is None. The held-out split and the
    evaluation tasks always follow the profile seed."""
    return seed if cfg.sample_seed is None else cfg.sample_seed


@dataclass
class CurationResult:
    """Curated training sets, evaluation payloads and the per-step summary."""

    train: dict[str, pd.DataFrame] = field(default_factory=dict)
    evals: dict[str, EvalTask] = field(default_factory=dict)
    summary: list[dict] = field(default_factory=list)
    cards: dict[str, DataCard] = field(default_factory=dict)
    sources: Sources = field(default_factory=dict)
    eval_words: frozenset[str] = frozenset()  # every held-out word (test and validation)
    eval_texts: frozenset[str] = frozenset()  # every evaluation text decontaminated against


def load_all_sources(cards: dict[str, DataCard], needed: set[str], hub_files_dir: Path | None = None) -> Sources:
    """Load every needed source card, :func:`normalise` its string columns (``str`` or all-string
    ``object`` dtype) and clean it with the :data:`~kalm_lib.builders.SOURCE_CLEANERS` entry of its
    loader, if any. With ``hub_files_dir``, each hub source reads ``<card name>.parquet`` there
    instead of the hub (:func:`~kalm_lib.sources.load_hub`)."""
    sources = {}
    for name in sorted(needed):
        card = cards[name]
        if card.kind != "source":
            raise DataCardError(f"{card.path}: {name!r} is used as an input but is a {card.kind} card")
        local = hub_files_dir / f"{card.name}.parquet" if hub_files_dir is not None and card.loader == "hub" else None
        frame = load_source(card, data_files=local)
        for column in frame.columns:
            if is_string_dtype(frame[column]):
                frame[column] = frame[column].map(normalise, na_action="ignore")
        cleaner = SOURCE_CLEANERS.get(card.loader)
        sources[name] = cleaner(frame) if cleaner else frame
    return sources


def curate(
    cfg: DataConfig,
    seed: int,
    cards_dir: Path,
    extra_eval_texts: frozenset[str] = frozenset(),
    batch_sizes: Mapping[str, int] | None = None,
    exclude: frozenset[str] = frozenset(),
    hub_files_dir: Path | None = None,
) -> CurationResult:
    """Run the whole curation for the derived cards under ``cards_dir``.

    ``seed`` fixes the held-out split and the evaluation tasks, :func:`sample_seed` the training
    rows. ``extra_eval_texts`` (e.g. :func:`task_texts` of the standard mteb tasks a profile
    evaluates) are decontaminated against like the local evaluation texts. ``batch_sizes`` maps a
    stage (``pretrain``, ``finetune``) to the batch size it trains with: a set of that stage with
    fewer rows is flagged (:func:`flag_below_one_batch`); stages not in it are not checked. Training
    sets named in ``exclude`` are left out, their sources unread (:mod:`kalm_lib.scale` streams them instead).
    ``hub_files_dir`` holds local Parquet files standing in for the hub sources (:func:`load_all_sources`).
    """
    cards = load_cards(cards_dir)
    derived = {n: c for n, c in cards.items() if c.kind == "derived" and n not in exclude}
    if not derived:
        raise DataCardError(f"{cards_dir}: no derived cards")
    known = {**TRAIN_BUILDERS, **SINGLE_INPUT_BUILDERS, **EVAL_BUILDERS}
    for card in derived.values():
        if card.builder not in known:
            raise DataCardError(f"{card.path}: field 'builder' {card.builder!r} is unknown; known: {sorted(known)}")
    sources = load_all_sources(cards, {i for c in derived.values() for i in c.inputs}, hub_files_dir)
    eval_rng = np.random.default_rng(seed)
    train_rng = np.random.default_rng(sample_seed(cfg, seed))
    result = CurationResult(cards=derived, sources=sources)
    splits = {
        "test": lambda word: is_held_out(word, cfg.eval_word_fraction, seed),
        "validation": lambda word: is_held_out(word, cfg.eval_word_fraction, seed + 1)
        and not is_held_out(word, cfg.eval_word_fraction, seed),
    }
    for name, card in derived.items():
        if card.stage == "eval":
            if card.split not in splits:
                raise DataCardError(f"{card.path}: field 'split' of an eval card must be one of {sorted(splits)}")
            size = getattr(cfg, _EVAL_SIZE[card.builder])
            task = EVAL_BUILDERS[card.builder](sources, splits[card.split], size, eval_rng, card.instruction)
            if not task.words:
                raise DataCardError(f"{card.path}: evaluation set {name!r} came out empty")
            result.evals[name] = task
    eval_words = frozenset().union(*(t.words for t in result.evals.values()))
    eval_texts = frozenset().union(*(t.texts for t in result.evals.values()), map(normalise, extra_eval_texts))
    result.eval_words, result.eval_texts = eval_words, eval_texts
    index = BandIndex.build(eval_texts, cfg.eval_near_dup_threshold)
    for name, card in derived.items():
        if card.stage != "eval":
            cap = cfg.max_stage1_pairs_per_source if card.stage == "pretrain" else cfg.max_stage2_per_source
            result.train[name] = _curate_train(
                card, sources, cfg, cap, train_rng, eval_words, eval_texts, index, result.summary
            )
    flag_below_one_batch(result.summary, batch_sizes or {})
    return result


def flag_below_one_batch(summary: list[dict], batch_sizes: Mapping[str, int]) -> None:
    """Add ``batch_size`` and ``below_one_batch`` to each summary row whose stage is in
    ``batch_sizes`` and log a warning for every set kept with fewer rows than one batch (the
    training plan never draws from such a set, :func:`kalm_lib.batching.batch_plan`)."""
    for counts in summary:
        batch_size = batch_sizes.get(counts["stage"])
        if batch_size is None:
            continue
        counts["batch_size"] = batch_size
        counts["below_one_batch"] = counts["kept"] < batch_size
        if counts["below_one_batch"]:
            _LOG.warning(
                "%s set %r keeps %d rows, fewer than one batch (%d): training will never draw from it",
                counts["stage"], counts["set"], counts["kept"], batch_size,
            )


def _curate_train(
    card: DataCard,
    sources: Sources,
    cfg: DataConfig,
    cap: int,
    rng: np.random.Generator,
    eval_words: frozenset[str],
    eval_texts: frozenset[str],
    eval_index: BandIndex,
    summary: list[dict],
) -> pd.DataFrame:
    """Apply the filter chain to one training set, logging counts into ``summary``."""
    if card.builder in SINGLE_INPUT_BUILDERS:
        frame = SINGLE_INPUT_BUILDERS[card.builder](sources, card.inputs[0])
    else:
        frame = TRAIN_BUILDERS[card.builder](sources)
    counts = {"set": card.name, "stage": card.stage, "built": len(frame)}
    frame = length_filter(frame, cfg.min_chars, cfg.max_chars)
    counts["after_length"] = len(frame)
    frame = exact_dedup(frame)
    counts["after_exact_dedup"] = len(frame)
    frame = decontaminate(frame, eval_words, eval_texts)
    counts["after_decontamination"] = len(frame)
    frame = frame.iloc[rng.permutation(len(frame))[: 2 * cap]]
    pool = len(frame)
    frame = drop_eval_near_duplicates(frame, eval_index)
    counts["eval_near_duplicates"] = pool - len(frame)
    frame = near_dedup(frame, cfg.near_dup_threshold, cfg.dedup_engine, cfg.curation_workers)
    counts["after_near_dedup_of_pool"] = len(frame)
    frame = frame.iloc[:cap].reset_index(drop=True)
    counts["kept"] = len(frame)
    if frame.empty:
        raise DataCardError(f"{card.path}: derived set {card.name!r} is empty after curation")
    summary.append(counts)
    return frame


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_curated(result: CurationResult, layout: RunLayout) -> pd.DataFrame:
    """Write shards (Parquet), eval payloads (JSON), filled cards and the summary table."""
    for name, frame in result.train.items():
        card = result.cards[name]
        path = write_output(frame, layout.shard(card.stage, name))
        _write_filled_card(card, len(frame), path, layout)
    for name, task in result.evals.items():
        card = result.cards[name]
        path = write_output(json.dumps(task.payload, ensure_ascii=False, indent=1),
                            layout.eval_payloads(card.split) / card.extra["eval_file"])
        _write_filled_card(card, len(task.words), path, layout)
    summary = pd.DataFrame(result.summary)
    write_output(summary, layout.curation_summary)
    return summary


def _write_filled_card(card: DataCard, size: int, path: Path, layout: RunLayout) -> None:
    """The card with the written file's size, SHA-256 and path (relative to ``data/``)."""
    filled = card.filled(size=size, sha256=file_sha256(path), file=str(path.relative_to(layout.data)))
    write_card(filled, layout.card(card.name))


def load_train_sets(layout: RunLayout, stage: str) -> dict[str, tuple[TrainRows, DataCard]]:
    """Read back the curated shards and filled cards of one stage: a one-file shard as a frame, a
    streamed set's folder of shards as :class:`~kalm_lib.shards.ShardRows` (its Arrow copy,
    memory-mapped, read a batch at a time)."""
    cards = load_cards(layout.cards, check_inputs=False)
    sets: dict[str, tuple[TrainRows, DataCard]] = {}
    for name, card in cards.items():
        if card.stage == stage:
            path = layout.data / card.extra["file"]
            frame = ShardRows(layout.arrow_copy(card.stage, name)) if path.is_dir() else pd.read_parquet(path)
            if not len(frame):
                raise DataCardError(f"{card.path}: shard {card.extra['file']} is empty")
            sets[name] = (frame, card)
    if not sets:
        raise DataCardError(f"{layout.data}: no curated {stage} sets; run 00_data_curation first")
    return sets
