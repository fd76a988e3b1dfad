"""Peak memory of one kalm_lib training step vs batch size, with and without GradCache.

Each measurement runs in a fresh child process (``--child``): load the packaged all-MiniLM-L6-v2
and one batch of real (gloss -> lemma) pairs, free what loading left behind (:func:`settle`), note
the baseline, run ``train_stage`` for one step and read the peak in its ``on_log`` callback (after
the optimizer step, before the final save). ``delta_mib`` = peak - baseline: activations,
gradients, AdamW state and temporaries of the step (gradients plus AdamW state alone are
3 x ``params_mib``).

Two readings:

- ``tensors``: the most bytes the step's tensors held at once. CUDA: ``max_memory_allocated``
  after ``reset_peak_memory_stats``. CPU: the same quantity from the profiler's allocation events
  (``profile_memory``; a running total over every allocation and free, stopped at ``on_log``).
  What the code needs, whatever the allocator keeps.
- ``rss`` (CPU only): the peak resident set (``VmHWM``, reset to the current RSS by writing 5 to
  ``/proc/self/clear_refs`` just before the step; ``ru_maxrss`` where that reset is refused, which
  then also holds the loading peak). What the process costs the machine: the tensors plus what the
  allocator keeps of freed blocks, plus library code paged in during the step
  (``file_growth_mib``, RssFile's growth). Taken with glibc's default malloc (a mmap threshold
  that rises with every freed block, so freed activations stay in the heap) and, as ``rss_live``,
  with the threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``: larger blocks are unmapped when
  freed). RSS readings move by tens of MiB between processes, so each GradCache reading is the
  median of ``--repeats`` children (every reading is kept); the plain sweep, which grows tenfold
  and more, is read once.

Sweeps: ``gradcache`` at a mini-batch of 8 texts (a chunk budget of 8 x max_length padded tokens,
filled from batch 128 on; at 32 and 64 the padding cap closes the largest chunk a little short of
it) and ``plain`` (the whole step in the graph). Without GradCache a batch is skipped when the
previous size's delta, scaled linearly, would exceed 3/4 of the free memory. ``step_seconds``
(train_stage's start to the end of its step, setup included) shows what each allocator setting
costs in time; under the profiler (CPU tensor reading) it is slower and not a speed figure.

    python -m benchmarks.memory [--quick] [--out DIR] [--threads N] [--repeats N]
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.profiler import ProfilerActivity, profile

from kalm_lib.config import TrainConfig
from kalm_lib.layout import REPO_ROOT
from kalm_lib.training import train_stage

from .common import device, headline, kalm_encoder, load_pairs, out_dir, parser, rounds, set_threads, write_result

NAME = "memory"
GOAL = 1.2
MIB = 2**20
LIVE_MMAP_THRESHOLD = 128 * 1024
READINGS = ("tensors", "rss")


@dataclass(frozen=True)
class Probe:
    """One child-process measurement."""

    batch_size: int
    mini_batch_size: int
    max_length: int
    threads: int
    seed: int
    reading: str = "tensors"  # one of READINGS
    mmap_threshold: int = 0  # bytes for MALLOC_MMAP_THRESHOLD_; 0 = glibc's default


def proc_status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def settle() -> None:
    """Free what loading left behind before the baseline: collect garbage, have Arrow's allocator
    (jemalloc by default, which otherwise purges the pages freed by loading at a time of its own,
    inside the step or not) and glibc hand their free pages back, so the baseline is what the
    process still holds."""
    gc.collect()
    pyarrow.default_memory_pool().release_unused()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


class RssMeter:
    """Baseline and peak resident set of this process around one training step (CPU)."""

    def __init__(self) -> None:
        self.peak_mib = 0.0
        self.seconds = 0.0
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss (includes the loading peak)"
        self.baseline_mib = proc_status_kib("VmRSS") / 1024
        self.file_baseline_mib = proc_status_kib("RssFile") / 1024
        self.file_growth_mib = 0.0
        self.began = time.perf_counter()

    def read(self, *_: object) -> None:
        """Record the peak so far (train_stage's ``on_log``)."""
        self.seconds = time.perf_counter() - self.began
        if self.method.startswith("VmHWM"):
            self.peak_mib = proc_status_kib("VmHWM") / 1024
        else:
            self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.file_growth_mib = proc_status_kib("RssFile") / 1024 - self.file_baseline_mib

    def figures(self) -> dict[str, Any]:
        return {"baseline_mib": self.baseline_mib, "peak_mib": self.peak_mib, "delta_mib": self.peak_mib - self.baseline_mib,
                "file_growth_mib": self.file_growth_mib, "method": self.method, "step_seconds": self.seconds}


class CudaTensorMeter:
    """Baseline and peak bytes of CUDA tensors around one training step; also the peak when the
    optimizer step begins (a global optimizer pre-hook)."""

    def __init__(self) -> None:
        torch.cuda.reset_peak_memory_stats()
        self.baseline_mib = torch.cuda.memory_allocated() / MIB
        self.peak_mib = self.before_optimizer_peak_mib = 0.0
        self.hook = register_optimizer_step_pre_hook(self._before_optimizer)
        self.began = time.perf_counter()
        self.seconds = 0.0

    def _before_optimizer(self, *_: object) -> None:
        self.before_optimizer_peak_mib = torch.cuda.max_memory_allocated() / MIB

    def read(self, *_: object) -> None:
        """Record the peak so far (train_stage's ``on_log``)."""
        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.began
        self.peak_mib = torch.cuda.max_memory_allocated() / MIB
        self.hook.remove()

    def figures(self) -> dict[str, Any]:
        return {"baseline_mib": self.baseline_mib, "peak_mib": self.peak_mib, "delta_mib": self.peak_mib - self.baseline_mib,
                "before_optimizer_mib": self.before_optimizer_peak_mib - self.baseline_mib,
                "method": "torch.cuda.max_memory_allocated", "step_seconds": self.seconds}


class CpuTensorMeter:
    """Peak bytes held by CPU tensors during one training step, from the profiler's allocation events.

    The profiler starts here and stops at :meth:`read`; the running total of its allocation
    (+bytes) and free (-bytes) events, in time order, is the tensor memory above what was held at
    the start, and its maximum is the step's peak (the CPU counterpart of ``max_memory_allocated``).
    """

    def __init__(self) -> None:
        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.peaks = TensorPeaks(0, 0)
        self.seconds = 0.0
        self.began = time.perf_counter()
        self.profiler.start()

    def read(self, *_: object) -> None:
        """Stop profiling and compute the peaks (train_stage's ``on_log``)."""
        self.seconds = time.perf_counter() - self.began
        self.profiler.stop()
        self.peaks = profiled_peaks(self.profiler)

    def figures(self) -> dict[str, Any]:
        return {"delta_mib": self.peaks.step / MIB, "before_optimizer_mib": self.peaks.before_optimizer / MIB,
                "method": "torch.profiler profile_memory, running peak", "step_seconds": self.seconds}


@dataclass(frozen=True)
class TensorPeaks:
    """Peak tensor bytes of a profiled step: over the whole step, and before the optimizer step
    (activations and gradients, without the AdamW state the first step allocates)."""

    step: int
    before_optimizer: int


def profiled_peaks(prof: profile) -> TensorPeaks:
    """Highest running totals of the CPU allocation events ``prof`` recorded (bytes above its start)."""
    events = list(prof.profiler.kineto_results.events())
    memory = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    optimizer = [e.start_ns() for e in events if e.name().startswith("Optimizer.step#")]
    if not memory or not optimizer:
        raise RuntimeError("the profiler recorded no CPU allocations or no optimizer step: profile_memory did not take effect")
    total = peak = before = 0
    for start, nbytes in memory:
        total += nbytes
        peak = max(peak, total)
        if start < optimizer[0]:
            before = peak
    return TensorPeaks(peak, before)


def make_meter(reading: str) -> RssMeter | CudaTensorMeter | CpuTensorMeter:
    """The meter for ``reading`` on this machine's device."""
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
    if reading == "rss":
        if torch.cuda.is_available():
            raise ValueError("the rss reading is CPU only (on CUDA, tensors are what the device holds)")
        return RssMeter()
    return CudaTensorMeter() if torch.cuda.is_available() else CpuTensorMeter()


def child(probe: Probe) -> dict[str, Any]:
    """Run one training step in this (fresh) process and return its memory figures."""
    set_threads(probe.threads)
    frame, card = load_pairs(probe.batch_size, probe.seed)
    encoder = kalm_encoder(probe.max_length).to(device())
    cfg = TrainConfig(steps=1, batch_size=probe.batch_size, mini_batch_size=probe.mini_batch_size, warmup_ratio=0.0, log_every=1)
    with tempfile.TemporaryDirectory(prefix="kalm-bench-") as work:
        settle()
        meter = make_meter(probe.reading)
        train_stage(encoder, {card.name: (frame, card)}, cfg, Path(work), probe.seed, on_log=meter.read)
    params_mib = sum(p.numel() * p.element_size() for p in encoder.parameters()) / MIB
    return {**meter.figures(), "params_mib": params_mib}


def measure_once(probe: Probe) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter; an ``error`` entry if it failed (e.g. killed for memory)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(probe.mmap_threshold)} if probe.mmap_threshold else None
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--child", json.dumps(asdict(probe))],
        cwd=REPO_ROOT, capture_output=True, text=True, env=env,
    )
    if done.returncode:
        return {"error": f"exit {done.returncode}: {done.stderr[-2000:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(probe: Probe, repeats: int) -> dict[str, Any]:
    """``repeats`` children for ``probe``: the median of every number, and each reading under ``readings``."""
    readings = [measure_once(probe) for _ in range(repeats)]
    failed = [r["error"] for r in readings if "error" in r]
    if failed:
        return {**asdict(probe), "error": failed[0], "readings": readings}
    numbers = {k: statistics.median(r[k] for r in readings) for k, v in readings[0].items() if isinstance(v, float)}
    return {**asdict(probe), **readings[0], **numbers, "readings": readings}


def sweep(sizes: list[int], base: Probe, repeats: int) -> list[dict[str, Any]]:
    """Measure ``base`` at every batch size; without GradCache, skip sizes predicted to exhaust memory."""
    rows: list[dict[str, Any]] = []
    for size in sizes:
        done = [r for r in rows if "delta_mib" in r]
        if not base.mini_batch_size and done:
            predicted = done[-1]["delta_mib"] * size / done[-1]["batch_size"]
            if predicted > 0.75 * free_mib():
                skipped = f"predicted delta {predicted:.0f} MiB > 3/4 of free memory"
                rows.append({"batch_size": size, "mini_batch_size": 0, "skipped": skipped})
                continue
        rows.append(measure(replace(base, batch_size=size), repeats))
    return rows


def free_mib() -> float:
    """Memory still available: free device memory on CUDA, ``MemAvailable`` on Linux."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0] / MIB
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise KeyError("MemAvailable")


def ratio(rows: list[dict[str, Any]], key: str) -> float | None:
    """``key`` at the largest measured batch over ``key`` at the smallest; None if fewer than two."""
    done = [r for r in rows if key in r]
    return done[-1][key] / done[0][key] if len(done) > 1 else None


def span(rows: list[dict[str, Any]]) -> str:
    """``largest/smallest`` measured batch size, for labels."""
    done = [r["batch_size"] for r in rows if "delta_mib" in r]
    return f"{done[-1]}/{done[0]}" if done else "none measured"


def sweeps(sizes: list[int], base: Probe, repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Every sweep this device takes: tensors (with and without GradCache); on CPU also RSS, default and live."""
    plain = replace(base, mini_batch_size=0)
    raw = {"gradcache_tensors": sweep(sizes, base, 1)}
    if not torch.cuda.is_available():
        rss = replace(base, reading="rss")
        raw["gradcache_rss"] = sweep(sizes, rss, repeats)
        raw["gradcache_rss_live"] = sweep(sizes, replace(rss, mmap_threshold=LIVE_MMAP_THRESHOLD), repeats)
        raw["plain_rss"] = sweep(sizes, replace(plain, reading="rss"), 1)
    raw["plain_tensors"] = sweep(sizes, plain, 1)
    return raw


HEADLINES = (  # (sweep, figure, label); GradCache rows carry the goal
    ("gradcache_tensors", "delta_mib", "peak tensor memory delta of a step, {span}, GradCache"),
    ("gradcache_tensors", "before_optimizer_mib",
     "peak tensor memory before the optimizer step (activations, gradients), {span}, GradCache"),
    ("gradcache_rss", "delta_mib", "peak RSS delta of a step, {span}, GradCache, glibc default"),
    ("gradcache_rss_live", "delta_mib", "peak RSS delta of a step, {span}, GradCache, live (128 KiB mmap threshold)"),
    ("plain_tensors", "delta_mib", "peak tensor memory delta of a step, {span}, no GradCache"),
    ("plain_tensors", "before_optimizer_mib", "peak tensor memory before the optimizer step, {span}, no GradCache"),
    ("plain_rss", "delta_mib", "peak RSS delta of a step, {span}, no GradCache"),
)


def summarise(raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Headline rows (the GradCache sweeps carry the goal) and the largest/smallest batch ratios."""
    ratios: dict[str, dict[str, float | None]] = {}
    rows = []
    for mode, key, label in HEADLINES:
        if mode in raw:
            value = ratios.setdefault(mode, {})[key] = ratio(raw[mode], key)
            goal = GOAL if mode.startswith("gradcache") else None
            rows.append(headline(label.format(span=f"batch {span(raw[mode])}"), value, goal, higher_is_better=False))
    summary: dict[str, Any] = {"rows": rows, "ratios": ratios, "device": str(device())}
    if "gradcache_rss_live" in raw:
        summary["live_step_seconds_over_default"] = [
            live["step_seconds"] / default["step_seconds"] for live, default in zip(raw["gradcache_rss_live"], raw["gradcache_rss"])
        ]
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Sweep batch sizes with and without GradCache and write ``memory.json``."""
    p = parser(__doc__.splitlines()[0], repeats=3)
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
    repeats = rounds(args)
    raw = sweeps(sizes, Probe(sizes[0], mini, max_length, threads, args.seed), repeats)
    settings = {"batch_sizes": sizes, "mini_batch_size": mini, "chunk_tokens_gradcache": mini * max_length,
                "max_length": max_length, "threads": threads, "seed": args.seed, "quick": args.quick,
                "rss_repeats": repeats, "live_mmap_threshold": LIVE_MMAP_THRESHOLD,
                "step": "train_stage, 1 step, AdamW (state allocated in the step)"}
    return write_result(out, NAME, settings, raw, summarise(raw))


if __name__ == "__main__":
    main()
