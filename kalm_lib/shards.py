"""A training set stored as Parquet shards, read a batch at a time from a memory-mapped Arrow copy.

Notebook 00 writes a streamed set twice: Parquet shards (the curated, hashed artefact) and, from
them, one uncompressed Arrow IPC stream file (:func:`write_arrow_copy`, a batch at a time, main
process only). :class:`ShardRows` memory-maps that file with Hugging Face ``datasets``
(``Dataset.from_file``: nothing written, nothing converted at training time, so every training
process reads the same file and a renamed or resumed run finds it where the layout says) and
stands where training takes an in-memory frame (``len``, ``.iloc[rows]``, ``.head(n)``). A
batch gathers exactly its rows whatever the size of the set; the pages it touches are file-backed
(they count in the resident set and in a cgroup's memory, and the kernel may drop them), the
anonymous memory of reading does not grow with the set (the batch plan aside:
:func:`~kalm_lib.batching.batch_plan` draws a permutation of row numbers, 8 bytes a row).

Why not read the Parquet row groups a batch lands in (the previous reader): a random batch of B
rows touches about B row groups and decodes each whole (datatrove writes 1,000-row groups), so a
step decodes up to B x 1,000 rows, more as the set grows. ``benchmarks/shard_reads.py`` measures
both readers side by side (``results/benchmarks/shard_reads.json``: seconds per batch, memory,
disk of both copies).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def write_arrow_copy(paths: Sequence[Path], target: Path, batch_rows: int = 10_000) -> int:
    """Concatenate the Parquet files ``paths`` (in that order) into one Arrow IPC stream file
    ``target`` (written beside, then renamed), ``batch_rows`` rows at a time; return the rows."""
    if not paths:
        raise ValueError(f"no Parquet shards to copy to {target}")
    schema = pq.read_schema(paths[0])
    partial = target.with_name(target.name + ".partial")
    rows = 0
    with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for path in paths:
            with pq.ParquetFile(path) as shard:
                for batch in shard.iter_batches(batch_size=batch_rows):
                    writer.write_batch(batch)
                    rows += batch.num_rows
    partial.replace(target)
    return rows


class ShardRows:
    """The rows of a set's Arrow copy (:func:`write_arrow_copy`) as one read-only, row-indexable set."""

    def __init__(self, arrow_file: Path) -> None:
        if not arrow_file.is_file():
            raise FileNotFoundError(f"{arrow_file}: no Arrow copy of the set's shards (written by notebook 00)")
        self.dataset = datasets.Dataset.from_file(str(arrow_file), in_memory=False).with_format("arrow")

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def iloc(self) -> _Positions:
        """``rows.iloc[positions]``: those rows, in that order, as a frame (as ``DataFrame.iloc``)."""
        return _Positions(self)

    def head(self, count: int) -> pd.DataFrame:
        """The first ``count`` rows as a frame."""
        return self.take(np.arange(min(count, len(self))))

    def take(self, positions: np.ndarray) -> pd.DataFrame:
        """The rows at ``positions`` (in that order) as a frame: ``datasets``' gather of zero-copy
        slices of the mapped batches (a whole-column ``Table.take`` copied the column: anonymous
        memory grew with the set, 517 MiB at 1e6 rows)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"row positions must lie in [0, {len(self)})")
        return self.dataset[positions.tolist()].to_pandas()

    def min_list_length(self, column: str) -> int:
        """The shortest list in list column ``column`` (a mapped batch at a time); 0 if no rows."""
        lengths = [pc.min(pc.list_value_length(batch[column])).as_py() for batch in self.dataset.iter(batch_size=100_000)]
        return min((length for length in lengths if length is not None), default=0)


class _Positions:
    """The ``iloc`` indexer of :class:`ShardRows`."""

    def __init__(self, rows: ShardRows) -> None:
        self.rows = rows

    def __getitem__(self, positions: np.ndarray) -> pd.DataFrame:
        return self.rows.take(positions)
