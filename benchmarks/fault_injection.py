"""Fault injection: kill the study's runner at random moments and check that every run resumes.

One uninterrupted run of a profile (default ``tiny``) is the reference. Each trial starts the same
run under a new name, waits until notebook k is executing (k cycles over the series, so the kills
are spread over every notebook), waits a random share of that notebook's reference duration and
kills the runner and its kernel with SIGKILL (a node failure: nothing gets to clean up). Then
``python -m kalm_lib run --resume NAME`` must finish the run, and its results must equal the
reference's byte for byte (``mteb_scores.csv``, ``per_item_scores.csv``, ``soup_trace.csv``,
the data hashes of the manifest). Every file of every finished run is opened by its reader
(JSON, YAML, CSV, Parquet, safetensors); a file that fails, or a leftover temporary or partial
file, counts as corrupt. One more trial sends SIGTERM (preemption) to the kernel while stage 1
trains: the stage must save a resumable state before the process ends, and the resume must again
match the reference.

    .venv/bin/python -m benchmarks.fault_injection                 # 10 SIGKILL trials + 1 SIGTERM
    .venv/bin/python -m benchmarks.fault_injection --trials 3 --out /tmp/fi

Writes ``results/reliability/fault_injection.json``: ``trials``, ``resumed``,
``identical_final_metrics``, ``corrupt_files``, ``kill_points`` (notebook, share, seconds into
it, whether the kill hit a running process), ``sigterm`` and the machine. Goal: every trial
resumes, metrics identical, 0 corrupt files.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import yaml
from safetensors import safe_open

from benchmarks.common import machine_info
from kalm_lib.layout import RESULTS_DIR, RunLayout, incomplete_run
from kalm_lib.outputs import write_output
from kalm_lib.runner import notebook_series
from kalm_lib.series_progress import TRANSIENT_SUFFIXES

RELIABILITY_DIR = RESULTS_DIR / "reliability"
COMPARED = ("mteb_scores", "per_item_scores", "soup_trace")  # RunLayout attributes that must match the reference


def runner(args: Sequence[str], runs_dir: Path) -> subprocess.Popen:
    """Start ``python -m kalm_lib run ...`` in its own session (its output to a log in ``runs_dir``)."""
    log = open(runs_dir / "runner.log", "a")  # noqa: SIM115 - the child owns it for its lifetime
    return subprocess.Popen([sys.executable, "-m", "kalm_lib", "run", "--runs-dir", str(runs_dir), *args],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_tree(process: subprocess.Popen, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` to the runner and every descendant (its papermill kernel) at once; True if the
    runner was still running."""
    try:
        parent = psutil.Process(process.pid)
        tree = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    alive = process.poll() is None
    for member in tree:
        try:
            member.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)
    process.wait()
    return alive


def completed_notebooks(work: Path) -> int:
    """How many notebooks the incomplete run ``work`` has recorded as complete."""
    try:
        return len(json.loads(RunLayout(work).series_progress.read_text())["completed"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def wait_for_notebook(process: subprocess.Popen, work: Path, index: int, timeout: float = 1800) -> bool:
    """Wait until the runner has started the series in ``work`` (its progress record exists) and
    notebooks ``0..index-1`` are complete, so notebook ``index`` is running; False if the runner
    ended first. (Counting from the runner's start instead let a slow interpreter start-up swallow
    a kill meant for notebook 00.)"""
    deadline = time.monotonic() + timeout
    while not RunLayout(work).series_progress.is_file() or completed_notebooks(work) < index:
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return process.poll() is None


def resume(name: str, runs_dir: Path) -> int:
    """``run --resume name`` to the end; its exit code."""
    return runner(["--resume", name], runs_dir).wait()


def corrupt_files(run_dir: Path) -> list[str]:
    """Files of a finished run that their reader cannot open, and leftover temporary files."""
    bad = []
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file() or p.name.endswith(TRANSIENT_SUFFIXES)):
        relative = str(path.relative_to(run_dir))
        if any(part.endswith(TRANSIENT_SUFFIXES) or part.startswith("state_") for part in path.relative_to(run_dir).parts):
            bad.append(f"{relative} (leftover)")
            continue
        try:
            if path.suffix in (".json", ".ipynb"):
                json.loads(path.read_text())
            elif path.suffix == ".yaml":
                yaml.safe_load(path.read_text())
            elif path.suffix == ".csv":
                pd.read_csv(path)
            elif path.suffix == ".parquet":
                pd.read_parquet(path)
            elif path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as tensors:
                    [tensors.get_tensor(key) for key in tensors.keys()]  # noqa: SIM118 - safe_open has no __iter__
        except Exception as exc:  # noqa: BLE001 - any failure to read is what we count
            bad.append(f"{relative} ({type(exc).__name__})")
    return bad


def results_of(run_dir: Path) -> dict[str, Any]:
    """What must not change with interruptions: result files' bytes and the data hashes."""
    layout = RunLayout(run_dir)
    record: dict[str, Any] = {key: getattr(layout, key).read_bytes() for key in COMPARED}
    record["data_sha256"] = json.loads(layout.manifest.read_text())["data_sha256"]
    return record


def sigterm_trial(profile: str, runs_dir: Path, reference: dict[str, Any]) -> dict[str, Any]:
    """SIGTERM to the kernel while stage 1 trains (notebook 02): a state must be saved, the resume
    must finish and match the reference."""
    name = "sigterm"
    work = incomplete_run(runs_dir, name)
    process = runner(["--profile", profile, "--name", name], runs_dir)
    stage02 = [i for i, nb in enumerate(notebook_series()) if nb.stem.startswith("02")][0]
    running = wait_for_notebook(process, work, stage02)
    stage = RunLayout(work).stage1.root
    deadline = time.monotonic() + 600
    while running and not any(stage.glob("state_*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first checkpoint shows stage 1 is stepping
    kernels = psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []
    for kernel in kernels:
        kernel.send_signal(signal.SIGTERM)
    process.wait()
    states = sorted(path.name for path in stage.glob("state_*"))
    code = resume(name, runs_dir)
    final = runs_dir / name
    return {"signalled_processes": len(kernels), "states_after_sigterm": states, "resumed": code == 0,
            "identical_final_metrics": code == 0 and results_of(final) == reference,
            "corrupt_files": corrupt_files(final) if code == 0 else None}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the trials and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RELIABILITY_DIR)
    parser.add_argument("--runs-dir", type=Path, default=None, help="where the runs go (default: a temp folder)")
    args = parser.parse_args(argv)
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="kalm-faults-"))
    runs_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    began = time.perf_counter()
    if runner(["--profile", args.profile, "--name", "reference"], runs_dir).wait() != 0:
        raise SystemExit(f"the uninterrupted reference run failed; see {runs_dir / 'runner.log'}")
    reference_dir = runs_dir / "reference"
    reference = results_of(reference_dir)
    durations = json.loads(RunLayout(reference_dir).manifest.read_text())["wall_seconds"]
    stems = [nb.stem for nb in notebook_series()]
    points, resumed, identical, corrupt = [], 0, 0, {}
    for trial in range(args.trials):
        index, share = trial % len(stems), rng.uniform(0.05, 0.95)
        name = f"trial{trial:02d}"
        process = runner(["--profile", args.profile, "--name", name], runs_dir)
        reached = wait_for_notebook(process, incomplete_run(runs_dir, name), index)
        delay = share * durations[stems[index]]
        time.sleep(delay if reached else 0)
        hit = kill_tree(process)
        final = runs_dir / name
        code = 0 if final.exists() else resume(name, runs_dir)  # a kill that came too late leaves a finished run
        same = code == 0 and results_of(final) == reference
        bad = corrupt_files(final) if code == 0 else ["(run did not finish)"]
        points.append({"trial": trial, "notebook": stems[index], "share": round(share, 3), "seconds_into_notebook": round(delay, 2),
                       "killed_running_process": hit, "resume_exit_code": code, "identical": same, "corrupt": bad})
        resumed += code == 0
        identical += same
        corrupt.update({f"{name}/{path}": True for path in bad})
        print(json.dumps(points[-1]), flush=True)
    sigterm = sigterm_trial(args.profile, runs_dir, reference)
    print(json.dumps(sigterm), flush=True)
    payload = {
        "benchmark": "fault_injection", "profile": args.profile, "seed": args.seed,
        "trials": args.trials, "resumed": resumed, "identical_final_metrics": identical,
        "corrupt_files": len(corrupt), "corrupt_file_list": sorted(corrupt),
        "reference_corrupt_files": corrupt_files(reference_dir),
        "kill_points": points, "sigterm": sigterm,
        "goal": "every trial resumes, metrics identical, 0 corrupt files",
        "goal_met": resumed == identical == args.trials and not corrupt and sigterm["identical_final_metrics"]
                    and not sigterm["corrupt_files"] and bool(sigterm["states_after_sigterm"]),
        "reference_wall_seconds": durations, "seconds": round(time.perf_counter() - began, 1), "machine": machine_info(),
    }
    write_output(payload, args.out / "fault_injection.json")
    return payload


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["goal_met"] else 1)
