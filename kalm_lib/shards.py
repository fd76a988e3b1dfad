"""A training set stored as Parquet shards, read a batch at a time.

:class:`ShardRows` stands where training takes an in-memory frame (``len``, ``.iloc[rows]``,
``.head(n)``), but holds only the shards' footers: a batch reads the row groups its rows lie in
and nothing else, so the memory of training does not grow with the set (the batch plan aside:
:func:`~kalm_lib.batching.batch_plan` draws a permutation of the set's row numbers, 8 bytes a row).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


class ShardRows:
    """The rows of Parquet shards (in the given order) as one read-only, row-indexable set."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.files = [pq.ParquetFile(path) for path in paths]
        self.groups = [(f, g) for f, file in enumerate(self.files) for g in range(file.metadata.num_row_groups)]
        sizes = [self.files[f].metadata.row_group(g).num_rows for f, g in self.groups]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def iloc(self) -> _Positions:
        """``rows.iloc[positions]``: those rows, in that order, as a frame (as ``DataFrame.iloc``)."""
        return _Positions(self)

    def head(self, count: int) -> pd.DataFrame:
        """The first ``count`` rows as a frame."""
        return self.take(np.arange(min(count, len(self))))

    def take(self, positions: np.ndarray) -> pd.DataFrame:
        """The rows at ``positions`` (in that order) as a frame, reading only their row groups."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"row positions must lie in [0, {len(self)})")
        group_of = np.searchsorted(self.starts, positions, side="right") - 1
        tables, order = [], []
        for group in np.unique(group_of):
            chosen = np.flatnonzero(group_of == group)
            file, row_group = self.groups[group]
            tables.append(self.files[file].read_row_group(row_group).take(pa.array(positions[chosen] - self.starts[group])))
            order.append(chosen)
        if not tables:
            return self.files[0].schema_arrow.empty_table().to_pandas()
        frame = pa.concat_tables(tables).to_pandas()
        return frame.iloc[np.argsort(np.concatenate(order), kind="stable")].reset_index(drop=True)

    def min_list_length(self, column: str) -> int:
        """The shortest list in list column ``column`` (read a row group at a time); 0 if no rows."""
        lengths = [pc.min(pc.list_value_length(self.files[f].read_row_group(g, columns=[column])[column])).as_py()
                   for f, g in self.groups]
        return min((length for length in lengths if length is not None), default=0)


class _Positions:
    """The ``iloc`` indexer of :class:`ShardRows`."""

    def __init__(self, rows: ShardRows) -> None:
        self.rows = rows

    def __getitem__(self, positions: np.ndarray) -> pd.DataFrame:
        return self.rows.take(positions)
