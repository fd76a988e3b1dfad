"""Encoding throughput of kalm_lib's ``Encoder.encode`` beside ``SentenceTransformer.encode``.

Same packaged all-MiniLM-L6-v2, same real WordNet glosses, batch size, max length and threads;
both sort by length and return unit-norm float32 numpy rows. One untimed warm-up call each (whose
embeddings are compared, ``max_abs_diff``), then timed calls over all texts, alternated A B A B.

    python -m benchmarks.encode_throughput [--quick] [--out DIR] [--threads N]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .common import (
    alternate,
    headline,
    kalm_encoder,
    load_glosses,
    median_of,
    out_dir,
    parser,
    rounds,
    set_threads,
    st_model,
    write_result,
)

NAME = "encode_throughput"
GOAL = 1.0
WARMUP_TEXTS = 256


@dataclass(frozen=True)
class Settings:
    """What both contenders share."""

    texts: int
    batch_size: int
    max_length: int
    repeats: int
    seed: int


def timed(encode: Callable[[list[str]], np.ndarray], texts: list[str], real_tokens: int) -> dict[str, Any]:
    """Seconds, texts/s and real tokens/s of one ``encode`` call over all ``texts``."""
    began = time.perf_counter()
    encode(texts)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "texts_per_s": len(texts) / seconds, "real_tokens_per_s": real_tokens / seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure both encoders and write ``encode_throughput.json``."""
    p = parser(__doc__.splitlines()[0], repeats=5)
    args = p.parse_args(argv)
    out = out_dir(args)
    threads = set_threads(args.threads)
    settings = Settings(
        texts=64 if args.quick else 5000,
        batch_size=16 if args.quick else 64,
        max_length=16 if args.quick else 64,
        repeats=rounds(args),
        seed=args.seed,
    )
    texts = load_glosses(settings.texts, settings.seed)
    encoder = kalm_encoder(settings.max_length)
    model = st_model(settings.max_length)
    encoders: dict[str, Callable[[list[str]], np.ndarray]] = {
        "kalm": lambda t: encoder.encode(t, batch_size=settings.batch_size),
        "st": lambda t: model.encode(t, batch_size=settings.batch_size, convert_to_numpy=True, show_progress_bar=False),
    }
    warm = {name: encode(texts[:WARMUP_TEXTS]) for name, encode in encoders.items()}
    lengths = encoder.tokenizer(texts, truncation=True, max_length=settings.max_length)["input_ids"]
    real_tokens = sum(map(len, lengths))
    raw = alternate({name: lambda e=encode: timed(e, texts, real_tokens) for name, encode in encoders.items()}, settings.repeats)
    medians = {name: {k: median_of(runs, k) for k in ("texts_per_s", "real_tokens_per_s")} for name, runs in raw.items()}
    ratio = medians["kalm"]["texts_per_s"] / medians["st"]["texts_per_s"]
    summary = {
        "rows": [headline(f"encode texts/s kalm/ST (batch {settings.batch_size})", ratio, GOAL)],
        "median": medians,
        "ratio_kalm_over_st": ratio,
        "paired_ratios": [s["seconds"] / k["seconds"] for k, s in zip(raw["kalm"], raw["st"])],
        "max_abs_diff": float(np.abs(warm["kalm"] - warm["st"]).max()),
        "real_tokens": real_tokens,
    }
    return write_result(out, NAME, {**asdict(settings), "threads": threads, "quick": args.quick}, raw, summary)


if __name__ == "__main__":
    main()
