"""Execute the notebook series headless with papermill into a run folder, then render the report.

The run is written to ``runs/.incomplete-<name>`` and renamed to ``runs/<name>`` only when every
notebook has run, the report is rendered and ``manifest.json`` is written: a folder without the
``.incomplete-`` prefix is always a complete run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nbformat
import papermill
from nbconvert import HTMLExporter

from .config import REPO_ROOT, load_profile
from .encoder import resolve_model_path
from .manifest import data_hashes, git_state, machine_info, package_versions

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
REPORT_NOTEBOOK = "06_ablations_report.ipynb"


def notebook_series(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The ordered notebooks ``NN_*.ipynb``."""
    series = sorted(notebooks_dir.glob("[0-9][0-9]_*.ipynb"))
    if not series:
        raise FileNotFoundError(f"no notebooks found in {notebooks_dir}")
    return series


def render_report(executed: Path, html_path: Path) -> Path:
    """Render an executed notebook to one self-contained HTML file (figures inlined, code hidden)."""
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
    html_path.write_text(body, encoding="utf-8")
    return html_path


UPSTREAM_NOTEBOOKS = ("00_data_curation", "01_bidirectional_conversion", "02_pretraining")
UPSTREAM_OUTPUTS = ("data", "checkpoints/stage1", "metrics/bidirectional_check.csv", "metrics/stage1_history.json")


def reuse_upstream(source: Path, work: Path) -> list[str]:
    """Hard-link curation and stage-1 outputs (and their executed notebooks) from a finished run."""
    for relative in UPSTREAM_OUTPUTS:
        origin = source / relative
        if not origin.exists():
            raise FileNotFoundError(f"cannot reuse {source}: {relative} is missing")
        target = work / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_dir():
            shutil.copytree(origin, target, copy_function=os.link)
        else:
            os.link(origin, target)
    for stem in UPSTREAM_NOTEBOOKS:
        shutil.copy2(source / "notebooks" / f"{stem}.ipynb", work / "notebooks" / f"{stem}.ipynb")
    return list(UPSTREAM_NOTEBOOKS)


def execute(notebook: Path, output: Path, parameters: dict[str, Any], kernel_name: str = "python3") -> float:
    """Execute one notebook with papermill (cwd = repo root); return its wall time in seconds."""
    began = time.perf_counter()
    papermill.execute_notebook(
        str(notebook), str(output), parameters=parameters, kernel_name=kernel_name, cwd=str(REPO_ROOT), progress_bar=False
    )
    return round(time.perf_counter() - began, 2)


def run_series(
    profile: str,
    runs_dir: Path,
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
    notebooks: list[Path] | None = None,
    kernel_name: str = "python3",
    reuse_from: Path | None = None,
) -> Path:
    """Run every notebook for ``profile``; return the completed run folder.

    With ``reuse_from`` (a finished run of the same data and stage-1 settings), notebooks 00-02 are
    not re-executed: their outputs are hard-linked from that run and the manifest says so.
    """
    overrides = dict(overrides or {})
    resolved = load_profile(profile, overrides)  # fail fast on unknown profile / parameter
    if not resolved.model.random_init:
        resolve_model_path(resolved.model.name_or_path)  # fail fast on a missing model folder
    name = name or f"{resolved.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    final = runs_dir / name
    if final.exists():
        raise FileExistsError(f"run folder already exists: {final}")
    work = runs_dir / f".incomplete-{name}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "notebooks").mkdir(parents=True)
    timings = {}
    started = datetime.now(timezone.utc).isoformat()
    code = git_state(REPO_ROOT)  # the code as the run starts (notebooks import it as they go)
    reused = reuse_upstream(reuse_from, work) if reuse_from else []
    parameters = {"profile": profile, "run_dir": str(work.resolve()), "overrides": overrides}
    for notebook in notebooks or notebook_series():
        if notebook.stem not in reused:
            timings[notebook.stem] = execute(notebook, work / "notebooks" / notebook.name, parameters, kernel_name)
    report = work / "notebooks" / REPORT_NOTEBOOK
    if report.exists():
        render_report(report, work / "report.html")
    manifest = {
        "run": name,
        "started_utc": started,
        "finished_utc": datetime.now(timezone.utc).isoformat(),
        "profile": profile,
        "overrides": overrides,
        "seed": resolved.seed,
        "parameters": resolved.to_dict(),
        "git": code,
        "packages": package_versions(),
        "machine": machine_info(),
        "data_sha256": data_hashes(work),
        "reused_from": {"run": str(reuse_from), "notebooks": reused} if reuse_from else None,
        "wall_seconds": timings,
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
    work.rename(final)
    return final
