"""Execute the notebook series headless with papermill into a run folder, then render the report.

The run is written to an incomplete folder (:func:`kalm_lib.layout.incomplete_run`) and renamed to
``<runs>/<name>`` only when every notebook has run, the report is rendered and the manifest is
written: a folder without the incomplete prefix is always a complete run.
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nbformat
import papermill
from nbconvert import HTMLExporter

from .config import load_profile
from .encoder import resolve_model_path
from .layout import NOTEBOOKS_DIR, REPO_ROOT, RunLayout, incomplete_run
from .manifest import data_hashes, git_state, machine_info, package_versions
from .outputs import write_output

REPORT_NOTEBOOK = "06_ablations_report.ipynb"


def notebook_series(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The ordered notebooks ``NN_*.ipynb``."""
    series = sorted(notebooks_dir.glob("[0-9][0-9]_*.ipynb"))
    if not series:
        raise FileNotFoundError(f"no notebooks found in {notebooks_dir}")
    return series


# Wide tables scroll inside their cell instead of running off the page; numbers stay aligned.
REPORT_CSS = """<style>
.jp-OutputArea-output { overflow-x: auto; max-width: 100%; }
.jp-RenderedHTMLCommon table { font-size: 12px; font-variant-numeric: tabular-nums; }
.jp-RenderedHTMLCommon td, .jp-RenderedHTMLCommon th { padding: 2px 6px; }
body { max-width: 1200px; margin: auto; }
</style>"""


def render_report(executed: Path, html_path: Path) -> Path:
    """Render an executed notebook to one self-contained HTML file (figures inlined, code hidden,
    wide tables scrollable)."""
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
    write_output(body.replace("</head>", f"{REPORT_CSS}\n</head>", 1), html_path)
    return html_path


UPSTREAM_NOTEBOOKS = ("00_data_curation", "01_bidirectional_conversion", "02_pretraining")


def reuse_upstream(source: Path, work: Path) -> list[str]:
    """Hard-link curation and stage-1 outputs (and their executed notebooks) from a finished run."""
    source_layout, work_layout = RunLayout(source), RunLayout(work)
    for origin, target in zip(source_layout.upstream(), work_layout.upstream()):
        if not origin.exists():
            raise FileNotFoundError(f"cannot reuse {source}: {origin.relative_to(source)} is missing")
        target.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_dir():
            shutil.copytree(origin, target, copy_function=os.link)
        else:
            os.link(origin, target)
    for stem in UPSTREAM_NOTEBOOKS:
        shutil.copy2(source_layout.notebooks / f"{stem}.ipynb", work_layout.notebooks / f"{stem}.ipynb")
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
    name = name or f"{resolved.name}-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    final = runs_dir / name
    if final.exists():
        raise FileExistsError(f"run folder already exists: {final}")
    work = incomplete_run(runs_dir, name)
    shutil.rmtree(work, ignore_errors=True)
    layout = RunLayout(work)
    layout.notebooks.mkdir(parents=True)
    timings = {}
    started = datetime.now(UTC).isoformat()
    code = git_state(REPO_ROOT)  # the code as the run starts (notebooks import it as they go)
    reused = reuse_upstream(reuse_from, work) if reuse_from else []
    parameters = {"profile": profile, "run_dir": str(work.resolve()), "overrides": overrides}
    for notebook in notebooks or notebook_series():
        if notebook.stem not in reused:
            timings[notebook.stem] = execute(notebook, layout.notebooks / notebook.name, parameters, kernel_name)
    report = layout.notebooks / REPORT_NOTEBOOK
    if report.exists():
        render_report(report, layout.report_html)
    manifest = {
        "run": name,
        "started_utc": started,
        "finished_utc": datetime.now(UTC).isoformat(),
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
    write_output(manifest, layout.manifest)
    work.rename(final)
    return final
