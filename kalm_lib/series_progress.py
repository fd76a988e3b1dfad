"""The runner's record of an incomplete run, so that ``kalm_lib run --resume NAME`` can continue it.

The progress record (:attr:`kalm_lib.layout.RunLayout.series_progress`) says how the run was
started (profile, overrides, reused upstream), which notebooks completed, when, and the SHA-256 of
every file the run folder held when each completed. It is rewritten (atomically) after every
notebook. On resume the recorded files are hashed again: a file that changed or vanished since
its notebook completed means the folder was altered and the run is not continued, except for
files modified after the last completed notebook finished, which only the interrupted notebook
can have written (it runs again from its start and rewrites them).

Resumable training states (``state_<step>``), partial folders and temporary files are not
recorded: they are the interrupted notebook's business (:mod:`kalm_lib.training`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .curation import file_sha256
from .layout import RUNNER_LOCK, SERIES_PROGRESS, RunLayout
from .outputs import write_output

# Not outputs of a completed notebook: training states, partial folders, temp files, the runner's own files.
TRANSIENT_PARTS = ("state_",)
TRANSIENT_SUFFIXES = (".partial", ".tmp", ".replaced")


class AlteredRunError(RuntimeError):
    """Outputs of completed notebooks changed or vanished: the run cannot be continued safely."""


@dataclass
class SeriesProgress:
    """One incomplete run: how it started, what completed (stem -> seconds, finished_utc), the
    recorded outputs (relative path -> [sha256, size, mtime_ns]) and every resume."""

    name: str
    profile: str
    overrides: dict[str, Any]
    started_utc: str
    git: dict[str, Any]
    reuse_from: str | None = None
    reused: list[str] = field(default_factory=list)
    completed: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, list[Any]] = field(default_factory=dict)
    last_completed_ns: int = 0
    resumes: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, run_dir: Path) -> SeriesProgress:
        """The record of the incomplete run in ``run_dir`` (FileNotFoundError naming it if none)."""
        path = RunLayout(run_dir).series_progress
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {run_dir} is not an interrupted run this runner can resume")
        return cls(**json.loads(path.read_text()))

    def write(self, run_dir: Path) -> None:
        write_output(asdict(self), RunLayout(run_dir).series_progress)

    def complete(self, run_dir: Path, stem: str, seconds: float) -> None:
        """Record notebook ``stem`` as complete, with the outputs the folder now holds."""
        self.completed[stem] = {"seconds": seconds, "finished_utc": datetime.now(UTC).isoformat()}
        self.outputs = snapshot(run_dir, self.outputs)
        self.last_completed_ns = time.time_ns()
        self.write(run_dir)


def is_transient(relative: Path) -> bool:
    """True for paths that are no completed notebook's output (see the module docstring)."""
    return (any(part.startswith(TRANSIENT_PARTS) or part.endswith(TRANSIENT_SUFFIXES) for part in relative.parts)
            or relative.name in {SERIES_PROGRESS, RUNNER_LOCK})


def snapshot(run_dir: Path, known: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """[sha256, size, mtime_ns] of every non-transient file under ``run_dir``; a file whose size
    and mtime match ``known`` keeps its recorded hash (not read again)."""
    record = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(run_dir)
        if is_transient(relative):
            continue
        stat = path.stat()
        old = known.get(str(relative))
        same = old is not None and old[1:] == [stat.st_size, stat.st_mtime_ns]
        record[str(relative)] = old if same else [file_sha256(path), stat.st_size, stat.st_mtime_ns]
    return record


def altered_outputs(run_dir: Path, progress: SeriesProgress) -> list[str]:
    """Recorded outputs that are missing, or whose content changed before the interrupted
    notebook started (a change after it is that notebook's own rewrite); empty = safe to resume."""
    altered = []
    for relative, (sha256, _, _) in progress.outputs.items():
        path = run_dir / relative
        if not path.is_file():
            altered.append(f"{relative} (missing)")
        elif path.stat().st_mtime_ns <= progress.last_completed_ns and file_sha256(path) != sha256:
            altered.append(f"{relative} (changed)")
    return altered
