"""Model FLOPs utilisation of kalm_lib training, against this machine's matmul peak measured in the same run.

Peak: square matmuls (float32 on CPU, bf16 on CUDA) at the same thread count; the best of each
repeat's timed products, 2 n^3 FLOP each. Training FLOP: ``torch.utils.flop_counter.FlopCounterMode``
around a ``train_stage`` run, read per step in ``on_log`` (every matmul, linear and attention
kernel of forward and backward, padding included: what the hardware computes); timed runs of the
same plan then give FLOP/s over steps 2..N. Also reported: the textbook estimate
``6 * non-embedding params * real tokens/s`` (padding excluded). Peak and training alternate.

    python -m benchmarks.mfu [--quick] [--out DIR] [--threads N]
"""

from __future__ import annotations

import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kalm_lib.capacity import cpu_sdpa_flop_formulas, dims_from_config, forward_passes, step_flops
from kalm_lib.config import TrainConfig
from kalm_lib.data_cards import DataCard
from kalm_lib.training import step_chunks, train_stage

from .common import (
    StepClock,
    alternate,
    device,
    headline,
    kalm_encoder,
    load_pairs,
    median_of,
    out_dir,
    parser,
    planned_batches,
    rounds,
    set_threads,
    sync,
    token_counts,
    write_result,
)

NAME = "mfu"
GOAL = 0.40


@dataclass(frozen=True)
class Settings:
    """Training and peak-measurement sizes."""

    batch_size: int
    max_length: int
    steps: int
    matmul_size: int
    matmuls: int
    repeats: int
    seed: int


def matmul_peak(size: int, count: int) -> dict[str, Any]:
    """GFLOP/s of ``count`` timed ``size``-square matmuls (after one untimed), the best and all."""
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    a, b = (torch.randn(size, size, device=device(), dtype=dtype) for _ in range(2))
    rates = []
    for index in range(count + 1):
        sync()
        began = time.perf_counter()
        torch.mm(a, b)
        sync()
        if index:
            rates.append(2 * size**3 / (time.perf_counter() - began) / 1e9)
    return {"dtype": str(dtype), "gflops": rates, "best_gflops": max(rates)}


def non_embedding_params(model: nn.Module) -> int:
    """Parameters outside ``nn.Embedding`` tables (the N of 6 N tokens)."""
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    return sum(p.numel() for p in model.parameters()) - embedding


def train_config(settings: Settings) -> TrainConfig:
    """kalm_lib's stage config for the timed runs (logging every step, which the clock needs)."""
    return TrainConfig(steps=settings.steps, batch_size=settings.batch_size, learning_rate=3e-5, log_every=1)


def train(settings: Settings, frame: pd.DataFrame, card: DataCard, count_flops: bool) -> dict[str, Any]:
    """One train_stage run (bf16 autocast on CUDA, like the peak): per-step seconds, or per-step FLOP."""
    encoder = kalm_encoder(settings.max_length)
    cfg = train_config(settings)
    clock, flops = StepClock(), []
    counter = FlopCounterMode(display=False, custom_mapping=cpu_sdpa_flop_formulas())  # the fused CPU attention kernel
    on_log = (lambda _: flops.append(counter.get_total_flops())) if count_flops else clock.tick
    with tempfile.TemporaryDirectory(prefix="kalm-bench-") as work:
        with counter if count_flops else nullcontext():
            train_stage(encoder, {card.name: (frame, card)}, cfg, Path(work), settings.seed, torch.cuda.is_available(), on_log=on_log)
    if count_flops:
        return {"step_flops": [b - a for a, b in zip([0, *flops], flops)]}
    return {"step_seconds": clock.step_seconds()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure peak and training FLOP/s and write ``mfu.json``."""
    p = parser(__doc__.splitlines()[0], repeats=3)
    args = p.parse_args(argv)
    out = out_dir(args)
    threads = set_threads(args.threads)
    cuda = torch.cuda.is_available()
    settings = Settings(
        batch_size=8 if args.quick else 64,
        max_length=16 if args.quick else 64,
        steps=2 if args.quick else 11,
        matmul_size=256 if args.quick else (8192 if cuda else 2048),
        matmuls=2 if args.quick else 10,
        repeats=rounds(args),
        seed=args.seed,
    )
    frame, card = load_pairs(settings.batch_size * settings.steps, settings.seed)
    encoder = kalm_encoder(settings.max_length)
    batches = planned_batches(frame, card, settings.batch_size, settings.steps, settings.seed)
    real = [token_counts(encoder, b, train_config(settings))["real"] for b in batches]
    n_params = non_embedding_params(encoder.backbone)
    counted_flops = train(settings, frame, card, count_flops=True)["step_flops"]
    dims = dims_from_config(encoder.backbone.config, "benchmark encoder")
    cfg = train_config(settings)
    passes = forward_passes(grad_cache=cfg.mini_batch_size > 0, checkpointing=False)  # kalm_encoder checkpoints nothing
    formula_flops = [step_flops(dims, [tuple(c.features["input_ids"].shape) for c in step_chunks(encoder, b, cfg)], passes)
                     for b in batches]
    raw = alternate(
        {
            "peak": lambda: matmul_peak(settings.matmul_size, settings.matmuls),
            "train": lambda: train(settings, frame, card, count_flops=False),
        },
        settings.repeats,
    )
    for run in raw["train"]:
        seconds = sum(run["step_seconds"])
        run["counted_flops_per_s"] = sum(counted_flops[1:]) / seconds
        run["six_n_flops_per_s"] = 6 * n_params * sum(real[1:]) / seconds
    peak = max(r["best_gflops"] for r in raw["peak"]) * 1e9
    counted = median_of(raw["train"], "counted_flops_per_s")
    six_n = median_of(raw["train"], "six_n_flops_per_s")
    summary = {
        "rows": [headline("MFU (FlopCounterMode FLOP/s / matmul peak)", counted / peak, GOAL),
                 headline("MFU (6 N real tokens/s / matmul peak)", six_n / peak)],
        "peak_flops_per_s": peak,
        "counted_flops_per_s": counted,
        "six_n_flops_per_s": six_n,
        "mfu_counted": counted / peak,
        "mfu_six_n": six_n / peak,
        "non_embedding_params": n_params,
        "step_flops": counted_flops,
        "formula_step_flops": formula_flops,
        "formula_over_counted": sum(formula_flops) / sum(counted_flops),
        "step_real_tokens": real,
    }
    settings_out = {**asdict(settings), "threads": threads, "quick": args.quick, "device": str(device()),
                    "formula": "mfu_six_n = 6 * non_embedding_params * real_tokens_per_s / peak; "
                               "mfu_counted = FlopCounterMode FLOP of steps 2..N / their seconds / peak; "
                               "formula_step_flops = kalm_lib.capacity.step_flops of the step's padded chunks "
                               "(the loss's matmuls excluded)"}
    return write_result(out, NAME, settings_out, raw, summary)


if __name__ == "__main__":
    main()
