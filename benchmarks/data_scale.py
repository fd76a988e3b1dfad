"""Seconds and peak RSS of the streamed curation (load -> filter -> dedup -> decontaminate -> shards)
at 1e5, 1e6 and 1e7 rows of a synthetic hub set (about 2.5 hours on one core here).

The set has the hub schema of the paper's S2ORC card (``title``, ``abstract``), written as Parquet
files of ``--shard-rows`` rows: random titles (6-12 words) and abstracts (20-40 words) over a
4,000-word vocabulary, with 2% exact copies of earlier rows of the same file, 3% near copies (one
word added to the abstract), 0.1% copying an evaluation text and 0.1% near-copying one (copies
stay within a file, so no duplicate cluster spans two files). Each point runs
:mod:`benchmarks.data_scale_point` in a fresh interpreter (its own peak RSS); the data are written
before, by this process. Goals: peak RSS at the largest size at most 1.5x the smallest's, and
seconds within 1.5x of linear in rows (largest over smallest, per row); both are judged only once
every size asked for is measured.

    python -m benchmarks.data_scale [--quick] [--out DIR] [--sizes 100000 1000000 10000000]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kalm_lib.layout import REPO_ROOT

from .common import headline, out_dir, parser, set_threads, write_result

NAME = "data_scale"
FULL_SIZES = (100_000, 1_000_000, 10_000_000)
QUICK_SIZES = (2_000, 8_000)
VOCABULARY = 4_000
EVAL_TEXTS = 500
SHARES = {"exact_copy": 0.02, "near_copy": 0.03, "eval_copy": 0.001, "eval_near_copy": 0.001}
GOAL = 1.5  # rss_ratio and seconds-per-row ratio goals


def vocabulary(rng: np.random.Generator) -> np.ndarray:
    """Pronounceable random words of 2-4 syllables."""
    syllables = np.array([c + v for c in "bcdfghklmnprstvz" for v in "aeiou"])
    counts = rng.integers(2, 5, size=VOCABULARY)
    return np.array(["".join(rng.choice(syllables, size=n)) for n in counts])


def texts(rng: np.random.Generator, words: np.ndarray, count: int, low: int, high: int) -> list[str]:
    """``count`` texts of ``low``-``high`` random words."""
    lengths = rng.integers(low, high + 1, size=count)
    ids = rng.integers(0, len(words), size=(count, high))
    return [" ".join(words[row[:n]]) for row, n in zip(ids, lengths)]


def synthetic_shard(rng: np.random.Generator, words: np.ndarray, rows: int, eval_texts: list[str]) -> pa.Table:
    """``rows`` hub rows (``title``, ``abstract``) with the documented shares of copies."""
    titles, abstracts = texts(rng, words, rows, 6, 12), texts(rng, words, rows, 20, 40)
    kinds = rng.choice(len(SHARES) + 1, size=rows, p=[1 - sum(SHARES.values()), *SHARES.values()])
    for i in np.flatnonzero(kinds):
        kind, j = list(SHARES)[kinds[i] - 1], int(rng.integers(0, max(i, 1)))
        if kind == "exact_copy":
            titles[i], abstracts[i] = titles[j], abstracts[j]
        elif kind == "near_copy":
            titles[i], abstracts[i] = titles[j], f"{abstracts[j]} {words[rng.integers(len(words))]}"
        else:
            text = eval_texts[int(rng.integers(len(eval_texts)))]
            titles[i] = text if kind == "eval_copy" else f"{text} {words[rng.integers(len(words))]}"
    return pa.table({"title": titles, "abstract": abstracts})


def write_synthetic(folder: Path, rows: int, shard_rows: int, seed: int) -> Path:
    """Write ``rows`` synthetic hub rows as Parquet files under ``folder`` and the evaluation texts
    as ``folder``/eval_texts.json; return that JSON file."""
    rng = np.random.default_rng(seed)
    words = vocabulary(rng)
    eval_texts = texts(rng, words, EVAL_TEXTS, 8, 16)
    (folder / "data").mkdir(parents=True)
    for index, start in enumerate(range(0, rows, shard_rows)):
        table = synthetic_shard(rng, words, min(shard_rows, rows - start), eval_texts)
        pq.write_table(table, folder / "data" / f"{index:05d}.parquet", row_group_size=shard_rows)
    path = folder / "eval_texts.json"
    path.write_text(json.dumps(eval_texts))
    return path


def measure(rows: int, shard_rows: int, seed: int, scratch: Path) -> dict[str, Any]:
    """One point: synthetic data written here, curated by :mod:`benchmarks.data_scale_point` in a
    fresh interpreter; the scratch folder is removed afterwards."""
    folder = scratch / f"rows_{rows}"
    try:
        eval_texts = write_synthetic(folder, rows, shard_rows, seed)
        command = [sys.executable, "-m", "benchmarks.data_scale_point", "--data", str(folder / "data"),
                   "--eval-texts", str(eval_texts), "--work", str(folder / "work"), "--shard-rows", str(shard_rows)]
        done = subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, text=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"stage": "curation", "rows": rows, "pool": None, **result}


def ratio(points: list[dict[str, Any]], value: Callable[[dict[str, Any]], float]) -> float | None:
    """``value`` at the largest size over the smallest (None with one point)."""
    return value(points[-1]) / value(points[0]) if len(points) > 1 else None


def summarise(points: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """rss_ratio and the per-row time ratio (largest over smallest size measured); their goals are
    judged (met: True/False) only when every size in ``sizes`` is measured, else None. Written after
    every point, so a run cut short keeps the points it measured without claiming the goals."""
    rss_ratio = ratio(points, lambda p: p["peak_rss_mib"])
    time_ratio = ratio(points, lambda p: p["seconds"] / p["rows"])
    complete = [p["rows"] for p in points] == sorted(sizes)
    rows = [headline("peak RSS, largest over smallest size", rss_ratio, GOAL, higher_is_better=False),
            headline("seconds per row, largest over smallest size", time_ratio, GOAL, higher_is_better=False)]
    rss_row, time_row = rows if complete else [{**row, "met": None} for row in rows]
    return {
        "rows": [rss_row, time_row],
        "complete": complete,
        "rss_ratio": rss_ratio,
        "rss_ratio_goal_met": rss_row["met"],
        "rss_above_imports_ratio": ratio(points, lambda p: p["peak_rss_mib"] - p["baseline_rss_mib"]),
        "seconds_per_row_ratio": time_ratio,
        "seconds_linear_goal_met": time_row["met"],
        "cpu_seconds_per_row_ratio": ratio(points, lambda p: p["cpu_seconds"] / p["rows"]),
        "seconds_per_million_rows": {str(p["rows"]): 1e6 * p["seconds"] / p["rows"] for p in points},
        "cpu_seconds_per_million_rows": {str(p["rows"]): 1e6 * p["cpu_seconds"] / p["rows"] for p in points},
        "sizes": [p["rows"] for p in points],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure every size (smallest first), writing ``data_scale.json`` after each."""
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help=f"rows per point (default {FULL_SIZES}; {QUICK_SIZES} with --quick)")
    p.add_argument("--shard-rows", type=int, default=None, help="rows per Parquet file and shard (default 100000; 1000 with --quick)")
    args = p.parse_args(argv)
    out = out_dir(args)
    threads = set_threads(args.threads)
    sizes = sorted(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES))
    shard_rows = args.shard_rows or (1_000 if args.quick else 100_000)
    settings = {"sizes": sizes, "shard_rows": shard_rows, "shares": SHARES, "vocabulary": VOCABULARY, "eval_texts": EVAL_TEXTS,
                "threads": threads, "seed": args.seed, "quick": args.quick, "workers": 1}
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kalm-data-scale-") as scratch:
        for rows in sizes:
            points.append(measure(rows, shard_rows, args.seed, Path(scratch)))
            payload = write_result(out, NAME, {**settings, "measured_sizes": [p["rows"] for p in points]}, points,
                                   {**summarise(points, sizes), "points": points})
    return payload


if __name__ == "__main__":
    main()
