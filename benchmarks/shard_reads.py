"""Training's reads of a streamed set: seconds per random batch and memory vs set size, side by side.

A streamed stage-1 set is a folder of Parquet shards written by datatrove (1,000-row row groups).
Training draws batches of random rows (:func:`kalm_lib.batching.batch_plan`). Two readers, each
point in a fresh child process (``--child``) on the same shards and the same batches:

* ``arrow_copy``: :class:`kalm_lib.shards.ShardRows` on the shards' Arrow copy
  (:func:`~kalm_lib.shards.write_arrow_copy`, written by notebook 00; here in ``setup_seconds``),
  memory-mapped, a batch gathered from the map;
* ``row_groups``: the previous ``ShardRows.take`` (kept here verbatim as the baseline): per batch,
  read each row group the batch lands in, take its rows, restore the asked order.

Every batch is checked row by row (each synthetic query starts with its row number). Per point:
``seconds_per_batch`` (median over ``--batches``, all kept), ``anon_after_setup_mib`` /
``anon_max_mib`` (anonymous resident set after setup and the largest seen after any batch:
``RssAnon``, page cache excluded), ``anon_growth_mib`` (their difference: what reading holds),
``file_mib`` (file-backed resident pages at the end: mapped pages, counted in the resident set
and a cgroup's memory, which the kernel may drop), ``peak_rss_mib``, and the disk of the shards
and of the Arrow copy. Headlines: the row-group reader's seconds per batch over the Arrow copy's
at the largest size (a ratio, one run, same batches), and the Arrow copy's ``anon_max_mib`` growth
from the smallest to the largest set (goal: within ``GROWTH_GOAL_MIB``).

    python -m benchmarks.shard_reads [--quick] [--out DIR] [--threads N] [--sizes 100000 1000000] [--batch 4096]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kalm_lib.dedup import EXAMPLE_SCHEMA, parquet_files
from kalm_lib.layout import REPO_ROOT
from kalm_lib.shards import ShardRows, write_arrow_copy

from .common import headline, out_dir, parser, set_threads, write_result
from .memory import MIB, proc_status_kib

NAME = "shard_reads"
READERS = ("arrow_copy", "row_groups")
FULL_SIZES = (100_000, 1_000_000)
QUICK_SIZES = (5_000, 20_000)
ROW_GROUP_ROWS = 1_000  # datatrove's ParquetWriter default batch
SHARD_ROWS = 100_000
GROWTH_GOAL_MIB = 64.0  # RSS readings move by tens of MiB between processes


@dataclass(frozen=True)
class Point:
    """One measurement: a reader on the shards under ``folder`` (``rows`` rows)."""

    reader: str
    folder: str
    rows: int
    batch: int
    batches: int
    threads: int
    seed: int


def write_shards(folder: Path, rows: int, seed: int) -> None:
    """``rows`` example rows (query: the row number in 9 digits and letters, 60 characters; positive
    600 letters; one negative) as Parquet shards of
    ``SHARD_ROWS`` rows in ``ROW_GROUP_ROWS``-row groups, as the streamed curation writes them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for index, start in enumerate(range(0, rows, SHARD_ROWS)):
        count = min(SHARD_ROWS, rows - start)
        letters = rng.integers(ord("a"), ord("z") + 1, size=(count, 660), dtype=np.uint8)
        numbers = np.char.zfill(np.arange(start, start + count).astype(str), 9).astype("S9").view(np.uint8).reshape(count, 9)
        query, positive = _strings(np.hstack([numbers, letters[:, 9:60]])), _strings(letters[:, 60:])
        negatives = pa.ListArray.from_arrays(np.arange(count + 1, dtype=np.int32), positive)
        words = pa.ListArray.from_arrays(np.zeros(count + 1, dtype=np.int32), pa.array([], pa.string()))
        table = pa.Table.from_arrays([query, positive, negatives, words], schema=EXAMPLE_SCHEMA)
        pq.write_table(table, folder / f"{index:05d}.parquet", row_group_size=ROW_GROUP_ROWS)


def _strings(letters: np.ndarray) -> pa.StringArray:
    """One string per row of a [rows, width] uint8 array of ASCII letters, as one Arrow array."""
    array = pa.array(letters.copy().view(f"S{letters.shape[1]}").ravel(), pa.binary())
    return pa.chunked_array([array] if isinstance(array, pa.Array) else array.chunks).combine_chunks().cast(pa.string())


class RowGroupReader:
    """The baseline: the previous ``kalm_lib.shards.ShardRows`` (footers held, a batch reads the row
    groups its rows lie in), its ``take`` unchanged."""

    def __init__(self, paths: list[Path]) -> None:
        self.files = [pq.ParquetFile(path) for path in paths]
        self.groups = [(f, g) for f, file in enumerate(self.files) for g in range(file.metadata.num_row_groups)]
        sizes = [self.files[f].metadata.row_group(g).num_rows for f, g in self.groups]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    def take(self, positions: np.ndarray) -> pd.DataFrame:
        """The rows at ``positions`` (in that order) as a frame, reading only their row groups."""
        group_of = np.searchsorted(self.starts, positions, side="right") - 1
        tables, order = [], []
        for group in np.unique(group_of):
            chosen = np.flatnonzero(group_of == group)
            file, row_group = self.groups[group]
            tables.append(self.files[file].read_row_group(row_group).take(pa.array(positions[chosen] - self.starts[group])))
            order.append(chosen)
        frame = pa.concat_tables(tables).to_pandas()
        return frame.iloc[np.argsort(np.concatenate(order), kind="stable")].reset_index(drop=True)



def open_reader(reader: str, folder: Path) -> ShardRows | RowGroupReader:
    """``reader`` on the shards under ``folder``/shards (the Arrow copy written first)."""
    paths = parquet_files(folder / "shards")
    if reader == "arrow_copy":
        write_arrow_copy(paths, folder / "set.arrow")
        return ShardRows(folder / "set.arrow")
    return RowGroupReader(paths)


def disk_mib(path: Path) -> float:
    """Bytes of a file, or of the files under a folder, in MiB."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / MIB


def child(point: Point) -> dict[str, Any]:
    """Read ``point.batches`` random batches with ``point.reader`` in this (fresh) process."""
    set_threads(point.threads)
    pa.set_cpu_count(point.threads)
    folder = Path(point.folder)
    began = time.perf_counter()
    reader = open_reader(point.reader, folder)
    setup = time.perf_counter() - began
    anon_after_setup = anon_max = proc_status_kib("RssAnon") / 1024
    rng = np.random.default_rng(point.seed)
    seconds = []
    for _ in range(point.batches):
        positions = rng.choice(point.rows, point.batch, replace=False)
        began = time.perf_counter()
        batch = reader.take(positions)
        seconds.append(time.perf_counter() - began)
        if not np.array_equal(batch["query"].str.slice(0, 9).astype(np.int64).to_numpy(), positions):
            raise AssertionError(f"{point.reader}: a batch does not hold the asked rows in the asked order")
        anon_max = max(anon_max, proc_status_kib("RssAnon") / 1024)
    copy = folder / "set.arrow"
    return {"reader": point.reader, "rows": point.rows, "batch": point.batch, "setup_seconds": setup,
            "seconds_per_batch": statistics.median(seconds), "seconds": seconds, "anon_after_setup_mib": anon_after_setup,
            "anon_max_mib": anon_max, "anon_growth_mib": anon_max - anon_after_setup, "file_mib": proc_status_kib("RssFile") / 1024,
            "peak_rss_mib": proc_status_kib("VmHWM") / 1024, "shards_disk_mib": disk_mib(folder / "shards"),
            "arrow_copy_disk_mib": disk_mib(copy) if point.reader == "arrow_copy" else None}



def measure(point: Point) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter; an ``error`` entry if it failed."""
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{NAME}", "--child", json.dumps(asdict(point))],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode:
        return {"reader": point.reader, "rows": point.rows, "error": f"exit {done.returncode}: {done.stderr[-2000:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Headlines: the speed-up at the largest size and the Arrow copy's memory growth over sizes."""
    done = {(p["reader"], p["rows"]): p for p in points if "error" not in p}
    sizes = sorted({rows for _, rows in done})
    largest = sizes[-1] if sizes else None
    pair = [done.get((reader, largest)) for reader in READERS]
    speedup = pair[1]["seconds_per_batch"] / pair[0]["seconds_per_batch"] if all(pair) else None
    copied = [done[("arrow_copy", rows)] for rows in sizes if ("arrow_copy", rows) in done]
    growth = copied[-1]["anon_max_mib"] - copied[0]["anon_max_mib"] if len(copied) > 1 else None
    rows = [headline(f"row_groups / arrow_copy seconds per batch at {largest} rows (x)", speedup),
            headline("arrow_copy largest anonymous memory, growth from the smallest to the largest set (MiB)", growth,
                     GROWTH_GOAL_MIB, higher_is_better=False)]
    return {"rows": rows, "failed": [f"{p['reader']}@{p['rows']}" for p in points if "error" in p]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Write shards for every size, read them with both readers and write ``shard_reads.json``."""
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=int, default=None, help=f"set sizes (default {FULL_SIZES}; --quick {QUICK_SIZES})")
    p.add_argument("--batch", type=int, default=None, help="rows per batch (default 4096; --quick 512)")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--child", default=None, help="internal: a JSON Point to measure in this process")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(Point(**json.loads(args.child)))))
        return {}
    out = out_dir(args)
    threads = set_threads(args.threads)
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    batch = args.batch or (512 if args.quick else 4096)
    points = []
    with tempfile.TemporaryDirectory(prefix="kalm-shard-reads-") as scratch:
        for rows in sizes:
            folder = Path(scratch) / str(rows)
            write_shards(folder / "shards", rows, args.seed)
            points += [measure(Point(reader, str(folder), rows, batch, args.batches, threads, args.seed)) for reader in READERS]
    settings = {"sizes": list(sizes), "batch": batch, "batches": args.batches, "row_group_rows": ROW_GROUP_ROWS,
                "shard_rows": SHARD_ROWS, "threads": threads, "seed": args.seed, "quick": args.quick, "growth_goal_mib": GROWTH_GOAL_MIB}
    return write_result(out, NAME, settings, {"points": points}, summarise(points))


if __name__ == "__main__":
    main()
