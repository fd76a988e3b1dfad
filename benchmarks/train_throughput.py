"""Training throughput of kalm_lib's ``train_stage`` beside sentence-transformers' trainer.

Both sides train the packaged all-MiniLM-L6-v2 on the same real (gloss -> lemma) batches in the
same order (kalm_lib's batch plan; ST reads them in order through a sequential batch sampler),
with AdamW at the same learning rate and weight decay, linear warm-up/decay, gradient clipping at
1.0, temperature 0.05 (ST ``scale=20``), batch size, max length and torch threads.

Timing: step 1 is warm-up; steps 2..N are timed from the end of one optimizer step to the end of
the next (kalm_lib: train_stage's ``on_log`` with ``log_every=1``; ST: ``on_step_end``), so data,
tokenisation, forward, backward, clipping, optimizer and scheduler count, model loading and the
final save do not. Contenders alternate A B A B ... Two cases: ``plain`` (the whole step in the
graph vs MultipleNegativesRankingLoss) and ``gradcache`` (``TrainConfig.mini_batch_size`` vs
CachedMultipleNegativesRankingLoss) at a large batch. Each side computes the batch its own way:
kalm_lib in length-sorted chunks (:mod:`kalm_lib.chunking`), ST one padded pass per column (per
mini-batch when cached); the JSON records both sides' padding shares.

    python -m benchmarks.train_throughput [--quick] [--out DIR] [--threads N] [--data SHARD.parquet]
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import SequentialSampler

from kalm_lib.batching import Batch
from kalm_lib.config import TrainConfig
from kalm_lib.data_cards import DataCard
from kalm_lib.encoder import Encoder
from kalm_lib.training import train_stage

from .common import (
    StepClock,
    alternate,
    headline,
    kalm_encoder,
    load_pairs,
    median_of,
    out_dir,
    parser,
    planned_batches,
    rounds,
    set_threads,
    st_model,
    token_counts,
    write_result,
)

NAME = "train_throughput"
GOAL = 1.2


@dataclass(frozen=True)
class Case:
    """One comparison: batch size, GradCache mini-batch (0 = off) and steps (the first is warm-up)."""

    name: str
    batch_size: int
    mini_batch_size: int
    steps: int


@dataclass(frozen=True)
class Settings:
    """What both contenders share."""

    max_length: int
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    temperature: float
    repeats: int
    seed: int


def cases(quick: bool) -> list[Case]:
    """The measured cases; ``quick`` shrinks them to seconds."""
    if quick:
        return [Case("plain", 8, 0, 2), Case("gradcache", 16, 8, 2)]
    return [Case("plain", 64, 0, 21), Case("gradcache", 256, 32, 6)]


def train_config(case: Case, settings: Settings) -> TrainConfig:
    """kalm_lib's stage config for ``case`` (logging every step, which the clock needs)."""
    return TrainConfig(
        steps=case.steps,
        batch_size=case.batch_size,
        mini_batch_size=case.mini_batch_size,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_ratio=settings.warmup_ratio,
        temperature=settings.temperature,
        log_every=1,
    )


def rates(clock: StepClock, batch_size: int, real_tokens: list[int]) -> dict[str, Any]:
    """Pairs/s and real tokens/s over the timed steps 2..N, with every step's duration."""
    step_seconds = clock.step_seconds()
    seconds = sum(step_seconds)
    return {
        "step_seconds": step_seconds,
        "seconds": seconds,
        "pairs_per_s": len(step_seconds) * batch_size / seconds,
        "real_tokens_per_s": sum(real_tokens[1:]) / seconds,
        "torch_threads_after": torch.get_num_threads(),
    }


def run_kalm(case: Case, settings: Settings, frame: pd.DataFrame, card: DataCard, real_tokens: list[int]) -> dict[str, Any]:
    """One kalm_lib training run through ``train_stage``, timed per step."""
    encoder = kalm_encoder(settings.max_length)
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="kalm-bench-") as work:
        train_stage(encoder, {card.name: (frame, card)}, train_config(case, settings), Path(work), settings.seed, on_log=clock.tick)
    return rates(clock, case.batch_size, real_tokens)


def _in_order(dataset: Any, batch_size: int, drop_last: bool, **_: Any) -> Any:
    """ST batch sampler that reads the dataset in order (it holds the planned batches back to back)."""
    from sentence_transformers.base.sampler import DefaultBatchSampler

    return DefaultBatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=drop_last)


def run_st(case: Case, settings: Settings, pairs: dict[str, list[str]], real_tokens: list[int]) -> dict[str, Any]:
    """One SentenceTransformerTrainer run on the same batches, timed per step."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
    from transformers import TrainerCallback

    clock = StepClock()

    class Clock(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            clock.tick()

    model = st_model(settings.max_length)
    scale = 1.0 / settings.temperature
    loss = (
        CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=case.mini_batch_size)
        if case.mini_batch_size
        else MultipleNegativesRankingLoss(model, scale=scale)
    )
    with tempfile.TemporaryDirectory(prefix="st-bench-") as work:
        args = SentenceTransformerTrainingArguments(
            output_dir=work,
            max_steps=case.steps,
            per_device_train_batch_size=case.batch_size,
            learning_rate=settings.learning_rate,
            weight_decay=settings.weight_decay,
            warmup_steps=int(settings.warmup_ratio * case.steps),
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            optim="adamw_torch_fused",  # the same fused AdamW kalm_lib uses
            seed=settings.seed,
            batch_sampler=_in_order,
            dataloader_drop_last=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=Dataset.from_dict(pairs), loss=loss, callbacks=[Clock()]
        )
        trainer.train()
    return rates(clock, case.batch_size, real_tokens)


def st_padded_tokens(encoder: Encoder, batch: Batch, mini_batch_size: int) -> int:
    """Tokens sentence-transformers computes for ``batch``: each column padded on its own (per
    mini-batch of ``mini_batch_size`` rows with the cached loss)."""
    size = mini_batch_size or len(batch.queries)
    pieces = [g[i : i + size] for g in (batch.queries, batch.positives) for i in range(0, len(g), size)]
    return sum(encoder.features(piece)["attention_mask"].numel() for piece in pieces)


def compare(case: Case, settings: Settings, frame: pd.DataFrame, card: DataCard) -> dict[str, Any]:
    """Alternated runs of both contenders on ``case``: raw repeats, medians and the kalm/ST ratio."""
    batches = planned_batches(frame, card, case.batch_size, case.steps, settings.seed)
    if any(b.negatives for b in batches):
        raise ValueError("the ST side trains on (anchor, positive) pairs; use a set without hard negatives")
    encoder = kalm_encoder(settings.max_length)
    counts = [token_counts(encoder, b, train_config(case, settings)) for b in batches]
    st_padded = [st_padded_tokens(encoder, b, case.mini_batch_size) for b in batches]
    real = [c["real"] for c in counts]
    pairs = {"anchor": [q for b in batches for q in b.queries], "positive": [p for b in batches for p in b.positives]}
    raw = alternate(
        {
            "kalm": lambda: run_kalm(case, settings, frame, card, real),
            "st": lambda: run_st(case, settings, pairs, real),
        },
        settings.repeats,
    )
    medians = {name: {k: median_of(runs, k) for k in ("pairs_per_s", "real_tokens_per_s")} for name, runs in raw.items()}
    paired = [k["pairs_per_s"] / s["pairs_per_s"] for k, s in zip(raw["kalm"], raw["st"])]
    return {
        "case": asdict(case),
        "tokens_per_step": counts,
        "kalm_padding_share": 1 - sum(real) / sum(c["padded"] for c in counts),
        "st_padding_share": 1 - sum(real) / sum(st_padded),
        "raw": raw,
        "median": medians,
        "ratio_kalm_over_st": medians["kalm"]["pairs_per_s"] / medians["st"]["pairs_per_s"],
        "paired_ratios": paired,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure both cases and write ``train_throughput.json``."""
    p = parser(__doc__.splitlines()[0], repeats=5)
    p.add_argument("--data", type=Path, default=None, help="a curated stage-1 shard (parquet) instead of WordNet glosses")
    args = p.parse_args(argv)
    out = out_dir(args)
    threads = set_threads(args.threads)
    settings = Settings(
        max_length=16 if args.quick else 64,
        learning_rate=3e-5,
        weight_decay=0.01,
        warmup_ratio=0.1,
        temperature=0.05,
        repeats=rounds(args),
        seed=args.seed,
    )
    measured = {}
    for case in cases(args.quick):
        frame, card = load_pairs(case.batch_size * case.steps, args.seed, args.data)
        measured[case.name] = compare(case, settings, frame, card)
    summary = {
        "rows": [
            headline(f"train pairs/s kalm/ST ({name}, batch {m['case']['batch_size']})", m["ratio_kalm_over_st"], GOAL)
            for name, m in measured.items()
        ],
        **{
            name: {k: m[k] for k in ("median", "ratio_kalm_over_st", "kalm_padding_share", "st_padding_share")}
            for name, m in measured.items()
        },
    }
    settings_out = {**asdict(settings), "threads": threads, "quick": args.quick, "data": str(args.data or "oewn_glosses"),
                    "cases": [asdict(c) for c in cases(args.quick)],
                    "optimizer": "torch.optim.AdamW(fused=True) on both sides (HF also exempts biases/LayerNorm from decay, same cost)",
                    "timed": "steps 2..N, end of optimizer step to end of next"}
    return write_result(out, NAME, settings_out, measured, summary)


if __name__ == "__main__":
    main()
