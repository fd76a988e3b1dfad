"""Time per kalm_lib training step vs sequence length and vs batch size, with log-log growth exponents.

Texts are real WordNet glosses joined back to back, long enough that every text is truncated to
exactly ``max_length`` tokens (no padding: the length axis is exact). Each grid point is a
``train_stage`` run; step 1 is warm-up, the median of steps 2..N is the point's time. Grid points
alternate within each repeat. The exponent is the slope of log(step time) over log(size): 1 is
linear growth, 2 quadratic; below 1 means fixed per-step costs still weigh at the small sizes.

    python -m benchmarks.scaling [--quick] [--out DIR] [--threads N]
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kalm_lib.config import TrainConfig
from kalm_lib.data_cards import DataCard, load_cards
from kalm_lib.training import train_stage

from .common import (
    CARDS_DIR,
    StepClock,
    alternate,
    headline,
    kalm_encoder,
    load_glosses,
    out_dir,
    parser,
    planned_batches,
    rounds,
    set_threads,
    token_counts,
    write_result,
)

NAME = "scaling"
GLOSSES_PER_TEXT = 32


@dataclass(frozen=True)
class Point:
    """One grid point."""

    axis: str
    batch_size: int
    max_length: int


def grid(quick: bool) -> list[Point]:
    """Sequence lengths at a fixed batch, then batch sizes at a fixed length."""
    lengths, batch = ((8, 16), 4) if quick else ((16, 32, 64, 128), 32)
    batches, length = ((4, 8), 16) if quick else ((16, 32, 64, 128), 64)
    return [Point("max_length", batch, n) for n in lengths] + [Point("batch_size", b, length) for b in batches]


def key(point: Point) -> str:
    """Name of a grid point, e.g. ``max_length=64``."""
    return f"{point.axis}={getattr(point, point.axis)}"


def long_pairs(rows: int, seed: int) -> pd.DataFrame:
    """``rows`` (query, positive) pairs, each text ``GLOSSES_PER_TEXT`` real glosses joined."""
    glosses = load_glosses(2 * rows * GLOSSES_PER_TEXT, seed)
    texts = [" ".join(glosses[i : i + GLOSSES_PER_TEXT]) for i in range(0, len(glosses), GLOSSES_PER_TEXT)]
    empty = [[] for _ in range(rows)]
    return pd.DataFrame({"query": texts[0::2], "positive": texts[1::2], "negatives": empty, "words": [[] for _ in range(rows)]})


def point_config(point: Point, steps: int) -> TrainConfig:
    """kalm_lib's stage config at ``point`` (logging every step, which the clock needs)."""
    return TrainConfig(steps=steps, batch_size=point.batch_size, log_every=1)


def step_time(point: Point, frame: pd.DataFrame, card: DataCard, steps: int, seed: int) -> dict[str, Any]:
    """Per-step seconds of one train_stage run at ``point`` (steps 2..N) and their median."""
    clock = StepClock()
    cfg = point_config(point, steps)
    with tempfile.TemporaryDirectory(prefix="kalm-bench-") as work:
        train_stage(kalm_encoder(point.max_length), {card.name: (frame, card)}, cfg, Path(work), seed, on_log=clock.tick)
    seconds = clock.step_seconds()
    return {"step_seconds": seconds, "median_step_s": statistics.median(seconds)}


def exponent(sizes: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) over log(size)."""
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def growth(axis: str, slope: float) -> str:
    """Plain-words reading of a growth exponent."""
    if slope > 1.15:
        how = "superlinear: attention's quadratic term or cache effects weigh"
    elif slope >= 0.85:
        how = "about linear: cost per token roughly constant"
    else:
        how = "sublinear: fixed per-step costs (optimizer over all parameters, overheads) still weigh"
    return f"step time ~ {axis}^{slope:.2f}, {how}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time every grid point, fit both exponents and write ``scaling.json``."""
    p = parser(__doc__.splitlines()[0], repeats=3)
    args = p.parse_args(argv)
    out = out_dir(args)
    threads = set_threads(args.threads)
    steps, repeats = (2 if args.quick else 6), rounds(args)
    points = grid(args.quick)
    card = load_cards(CARDS_DIR)["pt_oewn_glosses"]
    frame = long_pairs(max(pt.batch_size for pt in points) * steps, args.seed)
    encoder, padding = kalm_encoder(points[0].max_length), {}
    for pt in points:
        encoder.max_length = pt.max_length
        counts = [token_counts(encoder, b, point_config(pt, steps)) for b in planned_batches(frame, card, pt.batch_size, steps, args.seed)]
        padding[key(pt)] = 1 - sum(c["real"] for c in counts) / sum(c["padded"] for c in counts)
    runs = {key(pt): (lambda pt=pt: step_time(pt, frame, card, steps, args.seed)) for pt in points}
    raw = alternate(runs, repeats)
    medians = {name: statistics.median(r["median_step_s"] for r in reps) for name, reps in raw.items()}
    fits = {}
    for axis in ("max_length", "batch_size"):
        along = [pt for pt in points if pt.axis == axis]
        fits[axis] = exponent([getattr(pt, axis) for pt in along], [medians[key(pt)] for pt in along])
    summary = {
        "rows": [headline(f"step time exponent in {axis} (log-log slope)", slope) for axis, slope in fits.items()],
        "exponents": fits,
        "growth": {axis: growth(axis, slope) for axis, slope in fits.items()},
        "median_step_s": medians,
        "us_per_token": {key(pt): 1e6 * medians[key(pt)] / (2 * pt.batch_size * pt.max_length) for pt in points},
        "padding_share": padding,
    }
    settings = {"grid": [asdict(pt) for pt in points], "steps": steps, "repeats": repeats, "threads": threads,
                "seed": args.seed, "quick": args.quick, "glosses_per_text": GLOSSES_PER_TEXT}
    return write_result(out, NAME, settings, raw, summary)


if __name__ == "__main__":
    main()
