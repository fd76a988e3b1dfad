"""Peak memory of one kalm_lib training step vs batch size, with and without GradCache.

Each configuration runs in a fresh child process (``--child``): load the packaged all-MiniLM-L6-v2
and one batch of real (gloss -> lemma) pairs, note the baseline, then run ``train_stage`` for one
step and read the peak in its ``on_log`` callback (after the optimizer step, before the final
save). CPU: the peak resident set (``VmHWM``, reset to the current RSS by writing 5 to
``/proc/self/clear_refs`` just before the step; ``ru_maxrss`` where that reset is refused, which
then also holds the loading peak). CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``. ``delta_mib`` = peak - baseline: activations, gradients, AdamW state
and temporaries of the step (gradients plus AdamW state alone are 3 x ``params_mib``). Without
GradCache a batch is skipped when the previous size's delta, scaled linearly, would exceed 3/4 of
the free memory.

Sweeps: ``plain`` (the whole step in the graph); ``gradcache`` at a mini-batch of 8 texts (a chunk
budget of 8 x max_length padded tokens, filled from batch 128 on; at 32 and 64 the padding cap
closes the largest chunk a little short of it, so those batches read somewhat lower); on CPU also ``gradcache_live``, the same runs with
glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``): every larger block is
mapped on allocation and unmapped on free, so the resident set follows the live tensors instead
of what glibc's default (a threshold that rises with each freed block) keeps in its heap.
``step_seconds`` (train_stage's start to the end of its step, setup included) shows what each
reading's allocator costs in time.

    python -m benchmarks.memory [--quick] [--out DIR] [--threads N]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kalm_lib.config import REPO_ROOT, TrainConfig
from kalm_lib.training import train_stage

from .common import device, headline, kalm_encoder, load_pairs, out_dir, parser, set_threads, write_result

NAME = "memory"
GOAL = 1.2
MIB = 2**20
LIVE_MMAP_THRESHOLD = 128 * 1024


@dataclass(frozen=True)
class Probe:
    """One child-process measurement."""

    batch_size: int
    mini_batch_size: int
    max_length: int
    threads: int
    seed: int
    mmap_threshold: int = 0  # bytes for MALLOC_MMAP_THRESHOLD_; 0 = glibc's default


class PeakMeter:
    """Baseline and peak memory of this process around one training step."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.peak_mib = 0.0
        self.seconds = 0.0
        self.began = time.perf_counter()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.method = "torch.cuda.max_memory_allocated"
            self.baseline_mib = torch.cuda.memory_allocated() / MIB
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss (includes the loading peak)"
        self.baseline_mib = _proc_status_kib("VmRSS") / 1024

    def read(self, *_: object) -> None:
        """Record the peak so far and the seconds since construction (train_stage's ``on_log``)."""
        self.seconds = time.perf_counter() - self.began
        if self.cuda:
            self.peak_mib = torch.cuda.max_memory_allocated() / MIB
        elif self.method.startswith("VmHWM"):
            self.peak_mib = _proc_status_kib("VmHWM") / 1024
        else:
            self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def free_mib() -> float:
    """Memory still available: free device memory on CUDA, ``MemAvailable`` on Linux."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0] / MIB
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise KeyError("MemAvailable")


def child(probe: Probe) -> dict[str, Any]:
    """Run one training step in this (fresh) process and return its memory figures."""
    set_threads(probe.threads)
    frame, card = load_pairs(probe.batch_size, probe.seed)
    encoder = kalm_encoder(probe.max_length).to(device())
    cfg = TrainConfig(steps=1, batch_size=probe.batch_size, mini_batch_size=probe.mini_batch_size, warmup_ratio=0.0, log_every=1)
    with tempfile.TemporaryDirectory(prefix="kalm-bench-") as work:
        meter = PeakMeter()
        train_stage(encoder, {card.name: (frame, card)}, cfg, Path(work), probe.seed, on_log=meter.read)
    params_mib = sum(p.numel() * p.element_size() for p in encoder.parameters()) / MIB
    return {"baseline_mib": meter.baseline_mib, "peak_mib": meter.peak_mib, "delta_mib": meter.peak_mib - meter.baseline_mib,
            "params_mib": params_mib, "method": meter.method, "step_seconds": meter.seconds}


def measure(probe: Probe) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter; an ``error`` entry if it failed (e.g. killed for memory)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(probe.mmap_threshold)} if probe.mmap_threshold else None
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--child", json.dumps(asdict(probe))],
        cwd=REPO_ROOT, capture_output=True, text=True, env=env,
    )
    if done.returncode:
        return {**asdict(probe), "error": f"exit {done.returncode}: {done.stderr[-2000:]}"}
    return {**asdict(probe), **json.loads(done.stdout.strip().splitlines()[-1])}


def sweep(sizes: list[int], base: Probe) -> list[dict[str, Any]]:
    """Measure ``base`` at every batch size; without GradCache, skip sizes predicted to exhaust memory."""
    rows: list[dict[str, Any]] = []
    for size in sizes:
        done = [r for r in rows if "delta_mib" in r]
        if not base.mini_batch_size and done:
            predicted = done[-1]["delta_mib"] * size / done[-1]["batch_size"]
            if predicted > 0.75 * free_mib():
                rows.append({"batch_size": size, "mini_batch_size": 0, "skipped": f"predicted delta {predicted:.0f} MiB > 3/4 of free memory"})
                continue
        rows.append(measure(replace(base, batch_size=size)))
    return rows


def ratio(rows: list[dict[str, Any]], key: str) -> float | None:
    """``key`` at the largest measured batch over ``key`` at the smallest; None if fewer than two."""
    done = [r for r in rows if key in r]
    return done[-1][key] / done[0][key] if len(done) > 1 else None


def span(rows: list[dict[str, Any]]) -> str:
    """``largest/smallest`` measured batch size, for labels."""
    done = [r["batch_size"] for r in rows if "delta_mib" in r]
    return f"{done[-1]}/{done[0]}" if done else "none measured"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Sweep batch sizes with and without GradCache and write ``memory.json``."""
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--child", default=None, help="internal: a JSON Probe to measure in this process")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(Probe(**json.loads(args.child)))))
        return {}
    out = out_dir(args)
    threads = set_threads(args.threads)
    sizes = [8, 16] if args.quick else [32, 64, 128, 256, 512, 1024]
    mini = 4 if args.quick else 8
    max_length = 16 if args.quick else 64
    base = Probe(sizes[0], mini, max_length, threads, args.seed)
    raw = {"gradcache": sweep(sizes, base)}
    if not torch.cuda.is_available():
        raw["gradcache_live"] = sweep(sizes, replace(base, mmap_threshold=LIVE_MMAP_THRESHOLD))
    raw["plain"] = sweep(sizes, replace(base, mini_batch_size=0))
    ratios = {mode: {"delta": ratio(rows, "delta_mib"), "peak": ratio(rows, "peak_mib")} for mode, rows in raw.items()}
    if "gradcache_live" in raw:
        ratios["gradcache_live"]["step_seconds_over_default"] = [
            live["step_seconds"] / default["step_seconds"] for live, default in zip(raw["gradcache_live"], raw["gradcache"])
        ]
    labels = {"gradcache": "GradCache", "gradcache_live": "GradCache, live (128 KiB mmap threshold)"}
    summary = {
        "rows": [
            *(headline(f"step memory delta, batch {span(raw[mode])}, {label}", ratios[mode]["delta"], GOAL, higher_is_better=False)
              for mode, label in labels.items() if mode in raw),
            headline(f"step memory delta, batch {span(raw['plain'])}, no GradCache", ratios["plain"]["delta"]),
        ],
        "ratios": ratios,
        "device": str(device()),
    }
    settings = {"batch_sizes": sizes, "mini_batch_size": mini, "chunk_tokens_gradcache": mini * max_length,
                "max_length": max_length, "threads": threads, "seed": args.seed, "quick": args.quick,
                "live_mmap_threshold": LIVE_MMAP_THRESHOLD,
                "step": "train_stage, 1 step, AdamW (state allocated in the step)"}
    return write_result(out, NAME, settings, raw, summary)


if __name__ == "__main__":
    main()
