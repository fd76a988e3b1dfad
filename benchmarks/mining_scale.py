"""Time and peak memory of hard-negative mining's exact blocked ranking vs number of queries and pool size.

Each point runs in a fresh child process (``--child``): draw ``rows`` query and ``pool`` candidate
embeddings (random unit vectors, 384-d, float32, drawn in chunks so no float64 copy of them
exists), free what drawing left behind (:func:`~benchmarks.memory.settle`), reset the peak resident
set (``VmHWM`` via ``/proc/self/clear_refs``, as ``benchmarks.memory`` does) and run
:func:`kalm_lib.mining.top_ranked` for k = rank_max + banned_margin of the paper profile's window.

Per point: ``seconds`` (the ranking), ``peak_rss_mib`` (the process's peak during it, embeddings
included), ``baseline_mib`` (resident set after the embeddings, before ranking), ``extra_mib`` =
peak - baseline (what the ranking itself holds: score blocks, running top-k, the [rows, k] result)
and ``embeddings_mib`` (queries + pool, float32). The ranking must not need memory in proportion to
rows x pool: at equal ``rows``, ``extra_mib`` may not grow with the pool (headline: the largest
growth from the smallest to the largest pool, goal <= ``GROWTH_GOAL_MIB``).

The full grid is 1e4 and 1e5 queries x pools of 1e5 and 1e6 (1e5 x 1e6 is 1e11 scores: about 21
minutes on one core here); ``--sizes`` picks points, ``--quick`` runs small ones with small blocks,
one whose full score matrix (600 x 65,536 float32: 150 MiB) would exceed the growth goal.

    python -m benchmarks.mining_scale [--quick] [--out DIR] [--threads N] [--sizes 10000x100000 ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kalm_lib.layout import REPO_ROOT
from kalm_lib.mining import MiningConfig, top_ranked

from .common import device, headline, out_dir, parser, set_threads, write_result
from .memory import MIB, RssMeter, settle

NAME = "mining_scale"
DIM = 384
FULL_SIZES = ("10000x100000", "10000x1000000", "100000x100000", "100000x1000000")
QUICK_SIZES = ("200x4096", "600x4096", "600x65536")
QUICK_BLOCKS = (128, 1024)  # block_queries, block_pool with --quick: pools span several blocks
GROWTH_GOAL_MIB = 64.0  # RSS readings move by tens of MiB between processes
WINDOW = MiningConfig(count=7, rank_min=50, rank_max=100)  # the paper's ranks 50-100


@dataclass(frozen=True)
class Point:
    """One measurement: sizes, blocks and threads of a child process."""

    rows: int
    pool: int
    block_queries: int
    block_pool: int
    threads: int
    seed: int
    device: str = "cpu"  # where the ranking runs (the GPU when there is one)


def unit_vectors(count: int, rng: np.random.Generator, chunk: int = 65536) -> np.ndarray:
    """[count, DIM] float32 random unit vectors, drawn ``chunk`` rows at a time."""
    out = np.empty((count, DIM), dtype=np.float32)
    for start in range(0, count, chunk):
        block = rng.standard_normal((min(chunk, count - start), DIM), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def child(point: Point) -> dict[str, Any]:
    """Rank ``point.pool`` candidates for ``point.rows`` queries in this (fresh) process; its figures."""
    set_threads(point.threads)
    rng = np.random.default_rng(point.seed)
    queries, pool = unit_vectors(point.rows, rng), unit_vectors(point.pool, rng)
    cfg = MiningConfig(count=WINDOW.count, rank_min=WINDOW.rank_min, rank_max=WINDOW.rank_max,
                       block_queries=point.block_queries, block_pool=point.block_pool)
    k = cfg.rank_max + cfg.banned_margin
    settle()
    meter = RssMeter()
    began = time.perf_counter()
    ranked = top_ranked(queries, pool, k, cfg, point.device)
    seconds = time.perf_counter() - began
    meter.read()
    assert ranked.shape == (point.rows, k)
    return {"stage": "mining", "rows": point.rows, "pool": point.pool, "k": k, "seconds": seconds,
            "peak_rss_mib": meter.peak_mib, "baseline_mib": meter.baseline_mib, "extra_mib": meter.peak_mib - meter.baseline_mib,
            "embeddings_mib": (queries.nbytes + pool.nbytes) / MIB, "method": meter.method}


def measure(point: Point) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter; an ``error`` entry if it failed (e.g. killed for memory)."""
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{NAME}", "--child", json.dumps(asdict(point))],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode:
        return {"stage": "mining", "rows": point.rows, "pool": point.pool, "error": f"exit {done.returncode}: {done.stderr[-2000:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_size(text: str) -> tuple[int, int]:
    """``ROWSxPOOL`` -> (rows, pool)."""
    rows, _, pool = text.partition("x")
    return int(float(rows)), int(float(pool))


def pool_growth(points: list[dict[str, Any]]) -> float | None:
    """Largest growth of ``extra_mib`` from the smallest to the largest pool at equal rows (None: no such pair)."""
    growths = []
    for rows in sorted({p["rows"] for p in points}):
        same = sorted((p for p in points if p["rows"] == rows and "error" not in p), key=lambda p: p["pool"])
        if len(same) > 1:
            growths.append(same[-1]["extra_mib"] - same[0]["extra_mib"])
    return max(growths) if growths else None


def summarise(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline rows: extra-RSS growth with the pool (goal) and the ranking rate of the largest point."""
    done = [p for p in points if "error" not in p]
    largest = max(done, key=lambda p: p["rows"] * p["pool"], default=None)
    rate = largest["rows"] * largest["pool"] / largest["seconds"] / 1e9 if largest else None
    rows = [headline("extra RSS growth, smallest to largest pool at equal rows (MiB)", pool_growth(points), GROWTH_GOAL_MIB,
                     higher_is_better=False),
            headline("scores ranked per second, largest point (1e9/s)", rate)]
    return {"rows": rows, "failed": [f"{p['rows']}x{p['pool']}" for p in points if "error" in p]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure every requested (rows, pool) point in its own process and write ``mining_scale.json``."""
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=None, metavar="ROWSxPOOL",
                   help=f"points to measure (default {' '.join(FULL_SIZES)}; with --quick {' '.join(QUICK_SIZES)})")
    p.add_argument("--child", default=None, help="internal: a JSON Point to measure in this process")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(Point(**json.loads(args.child)))))
        return {}
    out = out_dir(args)
    threads = set_threads(args.threads)
    sizes = [parse_size(s) for s in args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)]
    block_queries, block_pool = QUICK_BLOCKS if args.quick else (WINDOW.block_queries, WINDOW.block_pool)
    where = str(device())
    points = [measure(Point(rows, pool, block_queries, block_pool, threads, args.seed, where)) for rows, pool in sizes]
    settings = {"sizes": [f"{r}x{p}" for r, p in sizes], "dim": DIM, "block_queries": block_queries, "block_pool": block_pool,
                "rank_min": WINDOW.rank_min, "rank_max": WINDOW.rank_max, "banned_margin": WINDOW.banned_margin,
                "score_decimals": WINDOW.score_decimals, "threads": threads, "device": where, "seed": args.seed, "quick": args.quick,
                "growth_goal_mib": GROWTH_GOAL_MIB, "ranking": "kalm_lib.mining.top_ranked (exact, blocked)"}
    return write_result(out, NAME, settings, {"points": points}, summarise(points))


if __name__ == "__main__":
    main()
