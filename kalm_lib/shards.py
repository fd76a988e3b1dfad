"""A training set stored as Parquet shards, read a batch at a time.

:class:`ShardRows` stands where training takes an in-memory frame (``len``, ``.iloc[rows]``,
``.head(n)``). The shards are converted once into Hugging Face ``datasets``' Arrow cache
(``Dataset.from_parquet``, written a batch at a time) and memory-mapped: a batch gathers exactly
its rows, whatever the size of the set, and the pages it touches are file-backed (the kernel
drops them under pressure), so the memory of training does not grow with the set (the batch plan
aside: :func:`~kalm_lib.batching.batch_plan` draws a permutation of the set's row numbers, 8 bytes
a row).

Why not read the Parquet row groups a batch lands in (the previous reader): a random batch of B
rows touches about B row groups and decodes each whole (datatrove writes 1,000-row groups), so a
step decodes up to B x 1,000 rows, more as the set grows. ``benchmarks/shard_reads.py`` (same
shards, same batches, B = 4096, 1e6 rows, clean d9fb5fd): 1.15 s per batch that way, 0.10 s from the Arrow cache
(11x), with no anonymous memory growth from 1e5 to 1e6 rows; the conversion costs ~7 s per 1e6
rows and about 1.5x the shards' size on disk, once per run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow.compute as pc


class ShardRows:
    """The rows of Parquet shards (in the given order) as one read-only, row-indexable set.

    ``cache_dir`` holds the memory-mapped Arrow copy (``datasets``' cache layout; created or
    reused, safe for several processes at once: ``datasets`` locks while it prepares).
    """

    def __init__(self, paths: Sequence[Path], cache_dir: Path) -> None:
        if not paths:
            raise ValueError(f"no Parquet shards to read (cache {cache_dir})")
        self.dataset = datasets.Dataset.from_parquet([str(path) for path in paths], cache_dir=str(cache_dir),
                                                     keep_in_memory=False).with_format("arrow")

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
        """The rows at ``positions`` (in that order) as a frame, gathered from the memory map."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"row positions must lie in [0, {len(self)})")
        return self.dataset[positions.tolist()].to_pandas()  # datasets' gather: zero-copy slices of the mapped chunks

    def min_list_length(self, column: str) -> int:
        """The shortest list in list column ``column`` (one memory-mapped chunk at a time); 0 if no rows."""
        lengths = [pc.min(pc.list_value_length(chunk)).as_py() for chunk in self.dataset.data.table.column(column).chunks]
        return min((length for length in lengths if length is not None), default=0)


class _Positions:
    """The ``iloc`` indexer of :class:`ShardRows`."""

    def __init__(self, rows: ShardRows) -> None:
        self.rows = rows

    def __getitem__(self, positions: np.ndarray) -> pd.DataFrame:
        return self.rows.take(positions)
