"""MinHash near-duplicate removal on datatrove, over Parquet shards of example rows.

The engine is datatrove's four-stage MinHash pipeline (signatures -> buckets -> clusters ->
filter; docs/decisions.md says why it was chosen over Ray Data and an in-memory datasketch LSH).
Every stage reads and writes files, so memory does not grow with the number of rows, and the same
steps run on a cluster by handing them to datatrove's Slurm or Ray executor instead of
:class:`~datatrove.executor.LocalPipelineExecutor`.

Only the shingles are ours (:class:`CharShingleSignature`): character 5-grams of the casefolded word
tokens, the same similarity measure as the in-memory path, with the LSH bands (b, r) that datasketch
picks for the same threshold and :data:`NUM_PERM` permutations. A document is one example row; its
text is ``query || positive`` and its metadata the row's columns, written back unchanged.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from datasketch import MinHash, MinHashLSH
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import ParquetReader
from datatrove.pipeline.writers import ParquetWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.stats import PipelineStats
from datatrove.utils.word_tokenizers import WordTokenizer

from .builders import word_tokens

NUM_PERM = 64  # MinHash permutations of every signature (evaluation index and de-duplication)
SHINGLE_WIDTH = 5  # characters per shingle
EXAMPLE_SCHEMA = pa.schema([
    ("query", pa.string()), ("positive", pa.string()), ("negatives", pa.list_(pa.string())), ("words", pa.list_(pa.string())),
])
_TOKEN = re.compile(r"[^\W_]+")  # runs of letters and digits, as word_tokens finds them
ROW = "row"  # column holding a row's position, when a frame is de-duplicated through shards


def shingles(text: str, width: int = SHINGLE_WIDTH) -> list[bytes]:
    """Character ``width``-grams (the whole text if shorter) of the text's canonical form: its
    casefolded word tokens joined by single spaces, so case and punctuation never matter
    ("Unmarried." and "unmarried" have the same shingles)."""
    canonical = " ".join(word_tokens(text))
    return [g.encode() for g in {canonical[i : i + width] for i in range(max(1, len(canonical) - width + 1))}]


def signatures(texts: Sequence[str]) -> list[MinHash]:
    """MinHash signatures (:data:`NUM_PERM` permutations) of the texts' :func:`shingles`, in bulk."""
    return MinHash.bulk([shingles(text) for text in texts], num_perm=NUM_PERM)


def lsh_bands(threshold: float, num_perm: int = NUM_PERM, weights: tuple[float, float] = (0.5, 0.5)) -> tuple[int, int]:
    """(bands, rows per band) datasketch's MinHashLSH chooses for ``threshold`` and (false positive,
    false negative) ``weights`` (equal by default), so both engines cut at the same Jaccard."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=weights)
    return lsh.b, lsh.r


def minhash_config(threshold: float) -> MinhashConfig:
    """datatrove's MinHash settings for ``threshold``: :func:`lsh_bands`, 32-bit values as datasketch's."""
    bands, rows = lsh_bands(threshold)
    return MinhashConfig(n_grams=SHINGLE_WIDTH, num_buckets=bands, hashes_per_bucket=rows, hash_config=HashConfig(precision=32))


class CanonicalTokenizer(WordTokenizer):
    """datatrove word tokenizer of :func:`~kalm_lib.builders.word_tokens` (casefolded runs of
    letters and digits): no spaCy or NLTK models to install on any worker."""

    def word_tokenize(self, text: str) -> list[str]:
        return word_tokens(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [match.span() for match in _TOKEN.finditer(text)]


class CharShingleSignature(MinhashDedupSignature):
    """datatrove's signature stage on :func:`shingles` (its own are word n-grams, which leave
    texts shorter than n words without a signature, and so never de-duplicated), signed by
    datasketch: a row's bands are exactly those of its datasketch MinHash (seed 1, 32-bit
    ``affine32`` values), the ones the in-memory path compares."""

    def __init__(self, output_folder: str, config: MinhashConfig) -> None:
        super().__init__(output_folder, config=config, language=CanonicalTokenizer())
        reference = MinHash(num_perm=NUM_PERM)
        self.permutations, self.scheme = reference.permutations, reference.scheme

    def get_shingles(self, text: str) -> np.ndarray:
        """The datasketch MinHash values of :func:`shingles` of ``text`` (the parent's ``run``
        hands them to :meth:`get_signature`)."""
        minhash = MinHash(num_perm=NUM_PERM, permutations=self.permutations, scheme=self.scheme)
        minhash.update_batch(shingles(text))
        return minhash.hashvalues

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        """The first ``num_buckets x hashes_per_bucket`` MinHash values, cut into bands."""
        rows = self.config.hashes_per_bucket
        return [shingles[band * rows : (band + 1) * rows].tolist() for band in range(self.config.num_buckets)]


def row_document(reader: ParquetReader, data: dict, path: str, id_in_file: int | str) -> dict[str, Any]:
    """A datatrove document of one example row: text ``query || positive``, the row as metadata
    (a :class:`~datatrove.pipeline.readers.ParquetReader` adapter)."""
    return {"text": f"{data['query']} || {data['positive']}", "id": f"{path}/{id_in_file}", "metadata": data}


def document_row(writer: ParquetWriter, document: Document) -> dict[str, Any]:
    """The example row a document carries (a :class:`~datatrove.pipeline.writers.ParquetWriter` adapter)."""
    return document.metadata


def row_reader(folder: Path) -> ParquetReader:
    """Reader of the example rows in the Parquet files under ``folder``, in file and row order."""
    return ParquetReader(str(folder), adapter=row_document, glob_pattern="*.parquet")


def row_writer(folder: Path, schema: pa.Schema) -> ParquetWriter:
    """Writer of example rows as Parquet shards ``<rank>.parquet`` under ``folder``."""
    return ParquetWriter(str(folder), adapter=document_row, schema=schema, use_content_defined_chunking=False)


def parquet_files(folder: Path) -> list[Path]:
    """The Parquet files under ``folder``, sorted."""
    return sorted(folder.rglob("*.parquet"))


def count_rows(folder: Path) -> int:
    """Rows in the Parquet files under ``folder`` (from their footers, nothing read)."""
    return sum(pq.ParquetFile(path).metadata.num_rows for path in parquet_files(folder))


def run_steps(pipeline: Sequence[PipelineStep], tasks: int, workers: int, logs: Path) -> PipelineStats:
    """Run ``pipeline`` on datatrove's local executor (``tasks`` ranks, ``workers`` processes at
    once); its logs and stats go to ``logs`` (and its console output to ``logs``.txt, not to this
    process's stderr); returns the steps' merged stats (rows each passed on: ``forwarded``)."""
    logs.parent.mkdir(parents=True, exist_ok=True)
    with logs.with_suffix(".txt").open("a") as console, contextlib.redirect_stderr(console):
        executor = LocalPipelineExecutor(list(pipeline), tasks=tasks, workers=min(workers, tasks), logging_dir=str(logs),
                                         skip_completed=False)
        return executor.run()


def minhash_dedup(source: Path, target: Path, work: Path, threshold: float, schema: pa.Schema, workers: int = 1) -> None:
    """Copy the rows under ``source`` to Parquet shards under ``target``, keeping one row of each
    cluster of near-duplicates (``query || positive`` shingle Jaccard about ``threshold`` or more).

    ``work`` holds the signatures, duplicate pairs, removal lists and logs. One task per source
    file in the signature and filter stages, one per band in the bucket stage, one clustering.
    """
    config = minhash_config(threshold)
    tasks = max(1, len(parquet_files(source)))
    signatures, buckets, clusters = work / "signatures", work / "buckets", work / "clusters"
    run_steps([row_reader(source), CharShingleSignature(str(signatures), config=config)], tasks, workers, work / "logs_signatures")
    run_steps([MinhashDedupBuckets(str(signatures), str(buckets), config=config)], config.num_buckets, workers, work / "logs_buckets")
    run_steps([MinhashDedupCluster(str(buckets), str(clusters), config=config)], 1, 1, work / "logs_clusters")
    run_steps([row_reader(source), MinhashDedupFilter(str(clusters)), row_writer(target, schema)], tasks, workers, work / "logs_filter")


def near_dedup_shards(frame: pd.DataFrame, threshold: float, workers: int = 1) -> pd.DataFrame:
    """:func:`minhash_dedup` of an in-memory frame (columns ``query`` and ``positive`` at least):
    the rows kept, in their order, with their index."""
    with tempfile.TemporaryDirectory(prefix="kalm-dedup-") as tmp:
        work = Path(tmp)
        (work / "rows").mkdir()
        rows = pa.table({ROW: np.arange(len(frame)), "query": frame["query"].to_numpy(), "positive": frame["positive"].to_numpy()})
        pq.write_table(rows, work / "rows" / "00000.parquet")
        minhash_dedup(work / "rows", work / "kept", work, threshold, rows.schema, workers)
        files = parquet_files(work / "kept")
        kept = pq.read_table(files, columns=[ROW]).column(ROW).to_numpy() if files else np.array([], dtype=np.int64)
    return frame.iloc[np.sort(kept)]
