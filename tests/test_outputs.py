"""Run-level writes on a full or read-only disk: an OSError naming the path, nothing left behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pandas as pd
import pytest

from kalm_lib import outputs
from kalm_lib.outputs import partial_folder, write_folder, write_output

NO_SPACE = os.strerror(errno.ENOSPC)
as_root = pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")


def full_disk(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, NO_SPACE)


def leftovers(folder: Path) -> list[str]:
    """Everything in ``folder`` (temporary files are hidden names)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def fill_then_full(folder: Path) -> None:
    """A model save that writes one file, then runs out of space."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    full_disk()


@pytest.mark.parametrize(
    ("payload", "name"),
    [({"step": 1}, "history.json"), ("text", "report.html"), (pd.DataFrame({"a": [1]}), "table.csv")],
)
def test_a_full_disk_while_writing_text_names_the_path_and_leaves_nothing(tmp_path, monkeypatch, payload, name):
    real_fdopen = os.fdopen

    def filling_stream(handle: int, *args: object, **kwargs: object):
        stream = real_fdopen(handle, *args, **kwargs)
        stream.write = full_disk  # the temporary file exists, its content never fits
        return stream

    monkeypatch.setattr(outputs.os, "fdopen", filling_stream)
    path = tmp_path / "run" / name
    with pytest.raises(OSError) as info:
        write_output(payload, path)
    assert str(info.value) == f"cannot write {path}: {NO_SPACE}"
    assert info.value.errno == errno.ENOSPC
    assert leftovers(path.parent) == []


def test_a_full_disk_while_writing_parquet_removes_the_partial_file(tmp_path, monkeypatch):
    def half_written(self: pd.DataFrame, target: str, **kwargs: object) -> None:
        Path(target).write_bytes(b"PAR1 half a file")
        full_disk()

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_written)
    path = tmp_path / "shard.parquet"
    with pytest.raises(OSError, match=f"^cannot write {path}: {NO_SPACE}$") as info:
        write_output(pd.DataFrame({"a": [1]}), path)
    assert info.value.errno == errno.ENOSPC
    assert leftovers(tmp_path) == []


def test_a_full_disk_keeps_the_previous_file_whole(tmp_path, monkeypatch):
    path = write_output({"completed": ["00"]}, tmp_path / "progress.json")
    monkeypatch.setattr(outputs.os, "replace", full_disk)
    with pytest.raises(OSError, match="^cannot write .*progress.json: "):
        write_output({"completed": ["00", "01"]}, path)
    assert path.read_text() == '{\n "completed": [\n  "00"\n ]\n}'
    assert leftovers(tmp_path) == ["progress.json"]


def test_a_full_disk_while_filling_a_folder_leaves_neither_it_nor_its_partial(tmp_path):
    path = tmp_path / "checkpoints" / "final"
    with pytest.raises(OSError) as info:
        write_folder(path, fill_then_full)
    assert str(info.value) == f"cannot write {path}: {NO_SPACE}"
    assert info.value.errno == errno.ENOSPC
    assert not path.exists() and not partial_folder(path).exists()


def test_an_error_that_names_its_file_is_not_renamed_by_the_folder(tmp_path, monkeypatch):
    path = tmp_path / "final"
    monkeypatch.setattr(outputs.os, "replace", full_disk)
    with pytest.raises(OSError, match=f"^cannot write {partial_folder(path)}/model.safetensors: {NO_SPACE}$"):
        write_folder(path, lambda folder: write_output("x", folder / "model.safetensors"))
    assert leftovers(tmp_path) == []


@as_root
def test_a_read_only_folder_names_the_path(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        for path in (folder / "manifest.json", folder / "metrics" / "scores.csv"):
            with pytest.raises(PermissionError) as info:
                write_output({"a": 1}, path)
            assert str(info.value) == f"cannot write {path}: {os.strerror(errno.EACCES)}"
            assert info.value.errno == errno.EACCES
        with pytest.raises(PermissionError, match=f"^cannot write {folder / 'final'}: "):
            write_folder(folder / "final", lambda partial: partial.mkdir())
        assert leftovers(folder) == []
    finally:
        folder.chmod(0o755)


def test_a_good_write_leaves_only_the_file(tmp_path):
    path = write_output(pd.DataFrame({"a": [1, 2]}), tmp_path / "t.parquet")
    assert pd.read_parquet(path)["a"].tolist() == [1, 2]
    assert write_folder(tmp_path / "f", lambda partial: partial.mkdir()) == tmp_path / "f"
    assert leftovers(tmp_path) == ["f", "t.parquet"]
