"""Streamed curation of a hub set to Parquet shards, with memory independent of the set's size.

The path the paper's hub sets need (S2ORC alone has 41.8M rows), for ``hub_pairs`` cards:

1. load: :func:`~kalm_lib.sources.hub_batches` streams the source as Arrow tables; each becomes
   one Parquet shard of example rows (query, positive, negatives, words), normalised with Arrow
   kernels (NFKC, white space collapsed, stripped).
2. filter (datatrove, one task per shard): length filter -> decontamination (held-out words in any
   spelling, evaluation texts repeated as query, positive or negative) -> a seeded Bernoulli pool
   of about twice the cap of the rows left (with a cap, the cleaning runs as its own pass first,
   so the pool's rate is known) -> near-duplicates of evaluation texts (the in-memory path's LSH
   test, ``eval_near_dup_threshold``). The evaluation sets are :mod:`kalm_lib.eval_index` arrays
   built once before the tasks and memory-mapped by each: they grow with the evaluation texts,
   not with the set, and no task holds the texts.
3. de-duplicate: :func:`~kalm_lib.dedup.minhash_dedup` (exact duplicates included: equal texts
   share every band).
4. cap: a second seeded Bernoulli draw of about ``cap`` rows when more are left.

Every datatrove step here runs unchanged on datatrove's Slurm or Ray executors; the local one
runs it on this host. Differences from the in-memory :func:`~kalm_lib.curation.curate` (which
the small offline sets keep): samples are Bernoulli draws by a hash of the row (so their sizes
are about, not exactly, 2 x cap and cap), exact duplicates go with the near-duplicates, and one
row per near-duplicate cluster is kept. docs/decisions.md has the measured comparison.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.stats import PipelineStats

from .builders import word_key
from .config import DataConfig
from .curation import CurationResult, file_sha256, flag_below_one_batch, sample_seed
from .data_cards import DataCard, DataCardError, write_card
from .dedup import EXAMPLE_SCHEMA, count_rows, minhash_dedup, parquet_files, row_reader, row_writer, run_steps
from .eval_index import BandIndex, TextHashes
from .layout import RunLayout
from .shards import write_arrow_copy
from .sources import DataFiles, hub_batches

# White space as Python's ``\s`` and ``str.strip`` see it (RE2's ``\s`` is ASCII only).
_SPACE = r"[\s\v\x{1c}-\x{1f}\x{85}\p{Z}]+"


@dataclass(frozen=True)
class StreamSettings:
    """What one streamed curation needs besides its card: the filters' thresholds and sizes."""

    min_chars: int
    max_chars: int
    eval_near_dup_threshold: float
    near_dup_threshold: float
    cap: int  # rows to keep; 0 = no cap and no pool (every row that survives the filters)
    seed: int  # of the pool and cap draws
    shard_rows: int = 100_000
    workers: int = 1

    @classmethod
    def from_config(cls, cfg: DataConfig, cap: int, seed: int) -> StreamSettings:
        """The settings of a profile's data section, for one set's cap and sample seed."""
        return cls(cfg.min_chars, cfg.max_chars, cfg.eval_near_dup_threshold, cfg.near_dup_threshold, cap, seed,
                   cfg.shard_rows, cfg.curation_workers)


def normalise_column(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """:func:`kalm_lib.curation.normalise` with Arrow kernels: NFKC, white space runs to one space, stripped."""
    folded = pc.utf8_normalize(column.cast(pa.string()), "NFKC")
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(folded, _SPACE, " "))


def example_table(table: pa.Table) -> pa.Table:
    """Example rows of a hub source table (fields ``query``, ``positive``, optional ``negative``):
    :func:`~kalm_lib.builders.hub_pairs`, in Arrow kernels only (no Python object per row, whose
    freed memory the allocator need not give back between shards)."""
    rows = table.num_rows
    query, positive = normalise_column(table["query"]), normalise_column(table["positive"])
    if "negative" in table.column_names:
        negatives = pa.ListArray.from_arrays(np.arange(rows + 1, dtype=np.int32), normalise_column(table["negative"]).combine_chunks())
    else:
        negatives = _empty_lists(rows)
    return pa.Table.from_arrays([query, positive, negatives, _empty_lists(rows)], schema=EXAMPLE_SCHEMA)


def _empty_lists(rows: int) -> pa.ListArray:
    """``rows`` empty string lists."""
    return pa.ListArray.from_arrays(np.zeros(rows + 1, dtype=np.int32), pa.array([], pa.string()))


def write_source_shards(card: DataCard, folder: Path, shard_rows: int, data_files: DataFiles | None = None) -> int:
    """Stream the source of a ``hub_pairs`` card into Parquet shards of example rows under
    ``folder`` (``<n>.parquet``, at most ``shard_rows`` rows each); return the rows written."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = 0
    for index, table in enumerate(hub_batches(card, data_files, shard_rows)):
        pq.write_table(example_table(table), folder / f"{index:05d}.parquet")
        rows += table.num_rows
    return rows


def row_fraction(text: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) of a row's text and a seed (same on every worker)."""
    digest = hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class LengthFilter(BaseFilter):
    """Keep rows whose query and positive lengths lie in [min_chars, max_chars]."""

    name = "length"

    def __init__(self, min_chars: int, max_chars: int) -> None:
        super().__init__()
        self.min_chars, self.max_chars = min_chars, max_chars

    def filter(self, doc: Document) -> bool:
        return all(self.min_chars <= len(doc.metadata[c]) <= self.max_chars for c in ("query", "positive"))


class DecontaminationFilter(BaseFilter):
    """Drop rows touching a held-out word (by :func:`~kalm_lib.builders.word_key`) or repeating an
    evaluation text as query, positive or negative (:func:`kalm_lib.curation.decontaminate`), a
    batch of rows at a time. Both sets are :class:`~kalm_lib.eval_index.TextHashes` saved at
    ``texts_path`` and ``word_keys_path`` before the tasks and memory-mapped by each (a task
    never holds the evaluation texts themselves)."""

    name = "decontamination"

    def __init__(self, texts_path: Path, word_keys_path: Path, batch_size: int = 2048) -> None:
        super().__init__(batch_size=batch_size)
        self.texts_path, self.word_keys_path = texts_path, word_keys_path
        self.sets: tuple[TextHashes, TextHashes] | None = None

    def filter(self, doc: Document) -> bool:
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[Document]) -> list[bool]:
        if self.sets is None:
            self.sets = TextHashes.load(self.texts_path), TextHashes.load(self.word_keys_path)
        eval_texts, word_keys = self.sets
        rows = [doc.metadata for doc in batch]
        texts = [[row["query"], row["positive"], *row["negatives"]] for row in rows]
        keys = [[word_key(word) for word in row["words"]] for row in rows]
        touched = _any_per_row(eval_texts, texts) | _any_per_row(word_keys, keys)
        return (~touched).tolist()


def _any_per_row(members: TextHashes, texts: list[list[str]]) -> np.ndarray:
    """Per row of ``texts``: is any of its texts a member?"""
    owner = np.repeat(np.arange(len(texts)), [len(row) for row in texts])
    found = members.contains([text for row in texts for text in row])
    return np.bincount(owner[found], minlength=len(texts)) > 0


class SampleFilter(BaseFilter):
    """Keep each row with probability ``rate``, decided by :func:`row_fraction` (reproducible, the
    same however the rows are split into tasks)."""

    name = "sample"

    def __init__(self, rate: float, seed: int) -> None:
        super().__init__()
        self.rate, self.seed = rate, seed

    def filter(self, doc: Document) -> bool:
        return row_fraction(doc.text, self.seed) < self.rate


class EvalNearDuplicateFilter(BaseFilter):
    """Drop rows whose query or positive is a near-duplicate of an evaluation text: the
    :class:`~kalm_lib.eval_index.BandIndex` saved at ``index_path`` (built once before the tasks,
    memory-mapped by each: the same test as :func:`~kalm_lib.curation.drop_eval_near_duplicates`),
    a batch of rows at a time."""

    name = "eval near-duplicates"

    def __init__(self, index_path: Path, batch_size: int = 2048) -> None:
        super().__init__(batch_size=batch_size)
        self.index_path = index_path
        self.index: BandIndex | None = None

    def filter(self, doc: Document) -> bool:
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[Document]) -> list[bool]:
        if self.index is None:
            self.index = BandIndex.load(self.index_path)
        near = self.index.flags([text for doc in batch for text in (doc.metadata["query"], doc.metadata["positive"])])
        return [not (near[2 * i] or near[2 * i + 1]) for i in range(len(batch))]


def forwarded(stats: PipelineStats, steps: int) -> list[int]:
    """Rows each of the first ``steps`` pipeline steps passed on (datatrove's merged stats)."""
    return [int(step.stats["forwarded"].total) for step in stats.stats[1 : steps + 1]]


def curate_stream(
    card: DataCard,
    source: DataCard,
    settings: StreamSettings,
    eval_words: frozenset[str],
    eval_texts: frozenset[str],
    out: Path,
    work: Path,
    data_files: DataFiles | None = None,
) -> dict[str, int | str]:
    """Curate the ``hub_pairs`` set ``card`` (its source card ``source``) into Parquet shards under
    ``out``; ``work`` (emptied first) holds the intermediate shards, signatures and datatrove logs.
    Returns the rows surviving each step (the curation summary's columns where they apply).
    """
    if card.builder != "hub_pairs" or source.loader != "hub":
        raise DataCardError(f"{card.path}: streamed curation needs a hub_pairs card on a hub source, got {card.builder!r}")
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    counts: dict[str, int | str] = {"set": card.name, "stage": card.stage}
    counts["built"] = write_source_shards(source, work / "source", settings.shard_rows, data_files)
    index_path, texts_path, word_keys_path = work / "eval_index.npy", work / "eval_texts.npy", work / "eval_word_keys.npy"
    BandIndex.build(eval_texts, settings.eval_near_dup_threshold).save(index_path)
    TextHashes.build(eval_texts).save(texts_path)
    TextHashes.build(word_key(word) for word in eval_words).save(word_keys_path)
    cleaning: list[BaseFilter] = [LengthFilter(settings.min_chars, settings.max_chars), DecontaminationFilter(texts_path, word_keys_path)]
    near = EvalNearDuplicateFilter(index_path)
    if settings.cap:  # the pool's rate needs the rows the cleaning left: two passes
        passed = _filter(work / "source", work / "clean", cleaning, settings.workers, work / "logs_clean")
        rate = min(1.0, 2 * settings.cap / max(passed["decontamination"], 1))
        passed.update(_filter(work / "clean", work / "filtered", [SampleFilter(rate, settings.seed), near], settings.workers,
                              work / "logs_filter"))
    else:
        passed = _filter(work / "source", work / "filtered", [*cleaning, near], settings.workers, work / "logs_filter")
    counts["after_length"], counts["after_decontamination"] = passed["length"], passed["decontamination"]
    pool = passed.get("sample", passed["decontamination"])
    counts["eval_near_duplicates"] = pool - passed["eval near-duplicates"]
    if not passed["eval near-duplicates"]:
        raise DataCardError(f"{card.path}: derived set {card.name!r} is empty after curation (no row passed the filters)")
    deduped = work / "deduped" if settings.cap else out
    minhash_dedup(work / "filtered", deduped, work / "dedup", settings.near_dup_threshold, EXAMPLE_SCHEMA, settings.workers)
    counts["after_near_dedup_of_pool"] = count_rows(deduped)
    if settings.cap:
        _cap(deduped, out, work, settings, counts["after_near_dedup_of_pool"])
    counts["kept"] = count_rows(out)
    if not counts["kept"]:
        raise DataCardError(f"{card.path}: derived set {card.name!r} is empty after curation")
    return counts


def _filter(source: Path, target: Path, filters: list[BaseFilter], workers: int, logs: Path) -> dict[str, int]:
    """Run ``filters`` over the shards under ``source`` into shards under ``target`` (one datatrove
    task per shard); the rows each filter passed on, by its name (none without shards: datatrove's
    writer leaves no file for a task that kept nothing, and an executor of zero tasks runs nothing)."""
    if not parquet_files(source):
        return dict.fromkeys((f.name for f in filters), 0)
    stats = run_steps([row_reader(source), *filters, row_writer(target, EXAMPLE_SCHEMA)], len(parquet_files(source)), workers, logs)
    return dict(zip([f.name for f in filters], forwarded(stats, len(filters))))


def _cap(source: Path, out: Path, work: Path, settings: StreamSettings, rows: int) -> None:
    """Shards under ``out`` of about ``settings.cap`` rows drawn from those under ``source``
    (all of them when there are no more)."""
    if rows <= settings.cap:
        shutil.copytree(source, out)
        return
    draw = SampleFilter(settings.cap / rows, settings.seed + 1)
    run_steps([row_reader(source), draw, row_writer(out, EXAMPLE_SCHEMA)], len(parquet_files(source)), settings.workers,
              work / "logs_cap")


def streamed_sets(cards: dict[str, DataCard]) -> frozenset[str]:
    """The sets ``data.stream_hub_sets`` streams: derived stage-1 ``hub_pairs`` cards on a hub
    source (stage-2 sets stay in memory: mining reads them whole, and their caps are small)."""
    return frozenset(
        name for name, card in cards.items()
        if card.kind == "derived" and card.stage == "pretrain" and card.builder == "hub_pairs" and cards[card.inputs[0]].loader == "hub"
    )


def shards_sha256(folder: Path) -> str:
    """Hex SHA-256 of a folder of shards: over each file's name and SHA-256, in name order."""
    digest = hashlib.sha256()
    for path in parquet_files(folder):
        digest.update(f"{path.relative_to(folder)}\t{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def curate_streamed_sets(result: CurationResult, cfg: DataConfig, seed: int, cards: dict[str, DataCard], names: frozenset[str],
                         layout: RunLayout, hub_files_dir: Path | None = None,
                         batch_sizes: Mapping[str, int] | None = None) -> None:
    """Stream every set in ``names`` into its shard folder (:meth:`RunLayout.shard_dir`), against
    ``result``'s held-out words and evaluation texts; write its filled card and add its counts to
    ``result.summary``; and the shards' Arrow copy that training memory-maps
    (:func:`~kalm_lib.shards.write_arrow_copy`). Intermediate files are removed once a set is done. With ``hub_files_dir``, a
    hub source streams ``<card name>.parquet`` there instead of the hub (as in :func:`curate`).
    ``batch_sizes`` flags a streamed set smaller than one batch, as :func:`curate` does for the others."""
    for name in sorted(names):
        card = cards[name]
        out, work = layout.shard_dir(card.stage, name), layout.streaming_work(name)
        settings = StreamSettings.from_config(cfg, cfg.max_stage1_pairs_per_source, sample_seed(cfg, seed))
        source = cards[card.inputs[0]]
        local = hub_files_dir / f"{source.name}.parquet" if hub_files_dir is not None and source.loader == "hub" else None
        counts = curate_stream(card, source, settings, result.eval_words, result.eval_texts, out, work, local)
        shutil.rmtree(work)
        write_arrow_copy(parquet_files(out), layout.arrow_copy(card.stage, name))
        filled = card.filled(size=counts["kept"], sha256=shards_sha256(out), file=str(out.relative_to(layout.data)))
        write_card(filled, layout.card(name))
        flag_below_one_batch([counts], batch_sizes or {})
        result.summary.append(counts)
