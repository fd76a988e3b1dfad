"""Execute the notebook series headless with papermill into a run folder, then render the report.

The run is written to an incomplete folder (:func:`kalm_lib.layout.incomplete_run`) and renamed to
``<runs>/<name>`` only when every notebook has run, the report is rendered and the manifest is
written: a folder without the incomplete prefix is always a complete run. An interrupted run
(killed, preempted, out of disk) keeps its incomplete folder and continues with
``python -m kalm_lib run --resume NAME`` (:func:`resume_series`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nbformat
import papermill
from nbconvert import HTMLExporter

from .config import load_profile
from .encoder import resolve_model_path
from .layout import NOTEBOOKS_DIR, REPO_ROOT, RUNS_DIR, RunLayout, incomplete_run
from .manifest import data_hashes, git_state, machine_info, package_versions
from .mteb_tasks import check_standard_names
from .outputs import write_output
from .series_progress import AlteredRunError, SeriesProgress, altered_outputs

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
    resume: bool = False,
) -> Path:
    """Run every notebook for ``profile``; return the completed run folder.

    With ``reuse_from`` (a finished run of the same data and stage-1 settings), notebooks 00-02 are
    not re-executed: their outputs are hard-linked from that run and the manifest says so.
    With ``resume``, the interrupted run ``name`` continues (:func:`resume_series`); without it, an
    interrupted run of that name is never deleted: the error says how to resume it.
    """
    if resume:
        if name is None:
            raise ValueError("resume needs the run's name")
        return resume_series(runs_dir, name, notebooks, kernel_name)
    overrides = dict(overrides or {})
    resolved = load_profile(profile, overrides)  # fail fast on unknown profile / parameter
    check_standard_names(resolved.evaluation.standard_tasks, resolved.evaluation.benchmarks)
    if not resolved.model.random_init:
        resolve_model_path(resolved.model.name_or_path)  # fail fast on a missing model folder
    name = name or f"{resolved.name}-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    final = runs_dir / name
    if final.exists():
        raise FileExistsError(f"run folder already exists: {final}")
    work = incomplete_run(runs_dir, name)
    if _never_started(work):
        with runner_lock(work):  # refuses while another runner holds it (a start in progress)
            shutil.rmtree(work)
    if work.exists():
        raise FileExistsError(
            f"an interrupted run {name!r} is at {work}: continue it with `python -m kalm_lib run --resume {name}`"
            f"{f' --runs-dir {runs_dir}' if runs_dir != RUNS_DIR else ''}, or delete that folder to start over"
        )
    RunLayout(work).notebooks.mkdir(parents=True)
    with runner_lock(work):
        progress = SeriesProgress(name, profile, overrides, datetime.now(UTC).isoformat(), git_state(REPO_ROOT),
                                  str(reuse_from) if reuse_from else None)
        progress.write(work)
        progress.reused = reuse_upstream(reuse_from, work) if reuse_from else []
        progress.write(work)
        return _finish_series(work, final, progress, notebooks, kernel_name)


def resume_series(runs_dir: Path, name: str, notebooks: list[Path] | None = None, kernel_name: str = "python3") -> Path:
    """Continue the interrupted run ``name`` with the profile and overrides it started with:
    completed notebooks are not run again (their recorded outputs are checked first, see
    :func:`kalm_lib.series_progress.altered_outputs`); the interrupted one starts again and its
    training stages continue from their newest complete state. The manifest lists every resume."""
    final, work = runs_dir / name, incomplete_run(runs_dir, name)
    if final.exists():
        raise FileExistsError(f"run {name!r} is already complete: {final}")
    if not work.is_dir():
        raise FileNotFoundError(f"no interrupted run {name!r} to resume: {work} does not exist")
    if not RunLayout(work).series_progress.is_file():
        raise FileNotFoundError(f"{work} has no progress record: it was killed before its first notebook started; "
                                f"start the run again without --resume")
    with runner_lock(work):
        progress = SeriesProgress.read(work)
        load_profile(progress.profile, progress.overrides)
        altered = altered_outputs(work, progress)
        if altered:
            raise AlteredRunError(f"cannot resume {work}: outputs of completed notebooks were altered: {', '.join(altered)}; "
                               "delete the folder and start the run again")
        progress.resumes.append({"utc": datetime.now(UTC).isoformat(), "completed_before": list(progress.completed),
                                 "git": git_state(REPO_ROOT)})
        progress.write(work)
        return _finish_series(work, final, progress, notebooks, kernel_name)


def _never_started(work: Path) -> bool:
    """True for a run folder killed between its creation and its first progress record: no
    progress record (:attr:`RunLayout.series_progress`) and nothing in it but an empty notebook folder and the lock file (a
    folder holding anything else, e.g. from an older runner, is never deleted)."""
    layout = RunLayout(work)
    if not work.is_dir() or layout.series_progress.exists():
        return False
    allowed = {layout.notebooks.name, layout.runner_lock.name}
    return {p.name for p in work.iterdir()} <= allowed and not any(layout.notebooks.glob("*"))


@contextmanager
def runner_lock(work: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder; a second runner on the same folder is refused."""
    with open(RunLayout(work).runner_lock, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"{work} is being written by another running process") from None
        yield


def _finish_series(work: Path, final: Path, progress: SeriesProgress, notebooks: list[Path] | None, kernel_name: str) -> Path:
    """Execute the notebooks not yet complete, render the report, write the manifest, rename the
    folder to its final name."""
    layout = RunLayout(work)
    parameters = {"profile": progress.profile, "run_dir": str(work.resolve()), "overrides": progress.overrides}
    for notebook in notebooks or notebook_series():
        if notebook.stem not in progress.reused and notebook.stem not in progress.completed:
            seconds = execute(notebook, layout.notebooks / notebook.name, parameters, kernel_name)
            progress.complete(work, notebook.stem, seconds)
    report = layout.notebooks / REPORT_NOTEBOOK
    if report.exists():
        render_report(report, layout.report_html)
    resolved = load_profile(progress.profile, progress.overrides)
    manifest = {
        "run": progress.name,
        "started_utc": progress.started_utc,
        "finished_utc": datetime.now(UTC).isoformat(),
        "profile": progress.profile,
        "overrides": progress.overrides,
        "seed": resolved.seed,
        "parameters": resolved.to_dict(),
        "git": progress.git,  # the code as the run started (notebooks import it as they go)
        "packages": package_versions(),
        "machine": machine_info(),
        "data_sha256": data_hashes(work),
        "reused_from": {"run": progress.reuse_from, "notebooks": progress.reused} if progress.reuse_from else None,
        "wall_seconds": {stem: done["seconds"] for stem, done in progress.completed.items()},
        "resumes": progress.resumes,
    }
    write_output(manifest, layout.manifest)
    layout.series_progress.unlink()
    work.rename(final)
    return final
