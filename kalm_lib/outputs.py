"""Writing run-level files: one helper, main process only, never half-written.

Under ``accelerate launch`` every process runs the same stage code; only process 0 writes files
that belong to the run (histories, tables, manifests). A file is written to a temporary name in
its folder and renamed into place, so a reader (or a crash) never sees part of it. A write that
fails (full disk, read-only folder) raises an :class:`OSError` with the original errno whose
message reads ``cannot write <path>: <reason>``, and leaves neither the file nor its temporary.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from .distributed import world

CANNOT_WRITE = "cannot write"


@contextmanager
def reported_as(path: Path) -> Iterator[None]:
    """Re-raise an :class:`OSError` of the block as the same subclass with the same ``errno``,
    reading ``cannot write <path>: <reason>`` (unchanged when it already says what it could not
    write, e.g. a file inside a folder being written)."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        if reason.startswith(CANNOT_WRITE):
            raise
        wrapped = type(error)(f"{CANNOT_WRITE} {path}: {reason}")
        wrapped.errno = error.errno  # errno alone: with strerror set too, str() would read "[Errno n] ..."
        raise wrapped from error


def is_main_process() -> bool:
    """True on the process that writes run-level files (the only one without torch.distributed)."""
    return world()[0] == 0


def write_output(payload: object, path: Path) -> Path | None:
    """Write ``payload`` to ``path`` from the main process; return the path (None elsewhere).

    A :class:`pandas.DataFrame` is written as Parquet when ``path`` ends in ``.parquet``, else as
    CSV, without its index; a ``str`` as UTF-8 text; anything else as indented JSON (``default=str``
    for paths and timestamps). Parent folders are created; the content goes to a temporary file in
    the same folder and is renamed over ``path`` (a new inode: a hard-linked copy of the old file,
    e.g. in a grid variant that reuses this run, is never changed). An :class:`OSError` is
    re-raised naming ``path`` (:func:`reported_as`), the temporary file removed.
    """
    if not is_main_process():
        return None
    with reported_as(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            _write_payload(payload, handle, temporary, path.suffix)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    return path


def _write_payload(payload: object, handle: int, temporary: str, suffix: str) -> None:
    """Write ``payload`` to the open temporary file ``handle`` (named ``temporary``), as
    :func:`write_output` describes for a final name ending in ``suffix``."""
    if isinstance(payload, pd.DataFrame) and suffix == ".parquet":
        os.close(handle)
        payload.to_parquet(temporary, index=False)
        return
    with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
        if isinstance(payload, pd.DataFrame):
            payload.to_csv(stream, index=False)
        elif isinstance(payload, str):
            stream.write(payload)
        else:
            json.dump(payload, stream, indent=1, default=str)


def replace_folder(partial: Path, path: Path) -> Path:
    """Move a fully written folder ``partial`` to ``path`` (replacing an older ``path``): the
    folder appears at ``path`` complete or not at all. Main process only. An :class:`OSError` is
    re-raised naming ``path`` (:func:`reported_as`)."""
    with reported_as(path):
        if path.exists():
            stale = path.with_name(f".{path.name}.replaced")
            shutil.rmtree(stale, ignore_errors=True)
            path.rename(stale)
            partial.rename(path)
            shutil.rmtree(stale)
        else:
            partial.rename(path)
    return path


def partial_folder(path: Path) -> Path:
    """The temporary name a folder for ``path`` is written under before :func:`replace_folder`
    (the same on every process, so collective writers such as ``accelerator.save_state`` agree)."""
    return path.with_name(f".{path.name}.partial")


def write_folder(path: Path, fill: Callable[[Path], object]) -> Path | None:
    """Write a folder (e.g. a saved model) from the main process: ``fill`` writes into a partial
    folder, which is then renamed to ``path``; a crash leaves no half-written ``path``. An
    :class:`OSError` is re-raised naming ``path`` (:func:`reported_as`), the partial folder removed."""
    if not is_main_process():
        return None
    partial = partial_folder(path)
    shutil.rmtree(partial, ignore_errors=True)
    with reported_as(path):
        try:
            partial.parent.mkdir(parents=True, exist_ok=True)
            fill(partial)
            return replace_folder(partial, path)
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
            raise
