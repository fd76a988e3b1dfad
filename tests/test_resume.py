"""``kalm_lib run --resume``: an interrupted run continues where it stopped, with the same results.

Fast part: a two-notebook series whose second notebook fails once (papermill, seconds). Slow part:
the tiny profile's real series killed with SIGKILL while stage 2 trains, then resumed, against the
uninterrupted session run (``tiny_run``).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import nbformat
import pytest
from papermill.exceptions import PapermillExecutionError

from benchmarks.fault_injection import corrupt_files, kill_tree, results_of, runner, wait_for_notebook
from kalm_lib.__main__ import main
from kalm_lib.layout import RunLayout, incomplete_run
from kalm_lib.runner import resume_series, run_series
from kalm_lib.series_progress import AlteredRunError, SeriesProgress

pytestmark = pytest.mark.slow

PARAMETERS = 'profile = "tiny"\nrun_dir = "runs/x"\noverrides = {}\n'


def notebook(path: Path, code: str) -> Path:
    """A series notebook: the standard ``parameters`` cell, then ``code``."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}), nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture()
def series(tmp_path: Path) -> tuple[list[Path], Path]:
    """00 writes an output and counts its executions; 01 fails on its first execution only."""
    calls, flag = tmp_path / "calls_00", tmp_path / "failed_once"
    folder = tmp_path / "notebooks"
    folder.mkdir()
    first = notebook(folder / "00_write.ipynb", (
        "from pathlib import Path\nfrom kalm_lib.outputs import write_output\n"
        f"write_output('made by 00', Path(run_dir) / 'metrics' / 'a.txt')\n"
        f"with open({str(calls)!r}, 'a') as f: f.write('x')\n"))
    second = notebook(folder / "01_fail_once.ipynb", (
        "from pathlib import Path\nfrom kalm_lib.outputs import write_output\n"
        f"flag = Path({str(flag)!r})\n"
        "if not flag.exists():\n    flag.touch()\n    raise RuntimeError('interrupted')\n"
        "write_output('made by 01', Path(run_dir) / 'metrics' / 'b.txt')\n"))
    return [first, second], calls


def test_interrupted_run_is_kept_and_resumes_without_rerunning_completed_notebooks(series, tmp_path: Path) -> None:
    notebooks, calls = series
    runs = tmp_path / "runs"
    with pytest.raises(PapermillExecutionError):
        run_series("tiny", runs, "r", notebooks=notebooks)
    work = incomplete_run(runs, "r")
    assert list(SeriesProgress.read(work).completed) == ["00_write"]
    with pytest.raises(FileExistsError, match="--resume r"):
        run_series("tiny", runs, "r", notebooks=notebooks)  # a plain rerun never deletes it
    final = run_series("tiny", runs, "r", notebooks=notebooks, resume=True)
    assert calls.read_text() == "x"  # 00 ran once
    assert (final / "metrics" / "b.txt").read_text() == "made by 01"
    manifest = json.loads(RunLayout(final).manifest.read_text())
    assert [r["completed_before"] for r in manifest["resumes"]] == [["00_write"]]
    assert set(manifest["wall_seconds"]) == {"00_write", "01_fail_once"}
    assert not RunLayout(final).series_progress.exists() and not work.exists()
    with pytest.raises(FileExistsError, match="already complete"):
        resume_series(runs, "r", notebooks)


def test_a_completed_notebooks_output_altered_before_the_resume_is_refused(series, tmp_path: Path) -> None:
    notebooks, _ = series
    runs = tmp_path / "runs"
    with pytest.raises(PapermillExecutionError):
        run_series("tiny", runs, "r", notebooks=notebooks)
    output = incomplete_run(runs, "r") / "metrics" / "a.txt"
    stat = output.stat()
    output.write_text("made by 0X")  # same size, and the old time stamp: only the hash can tell
    os.utime(output, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(AlteredRunError, match=r"metrics/a.txt \(changed\)"):
        resume_series(runs, "r", notebooks)
    output.unlink()
    with pytest.raises(AlteredRunError, match=r"metrics/a.txt \(missing\)"):
        resume_series(runs, "r", notebooks)


def test_a_start_killed_before_its_progress_record_is_started_again(series, tmp_path: Path) -> None:
    """A SIGKILL between creating the folder and writing series_progress.json leaves a folder with no
    notebook run: --resume says to start again, and a plain rerun does (it is not a stuck name)."""
    notebooks, calls = series
    runs = tmp_path / "runs"
    RunLayout(incomplete_run(runs, "r")).notebooks.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="start the run again without --resume"):
        resume_series(runs, "r", notebooks)
    with pytest.raises(PapermillExecutionError):  # 01 fails once, as in every test of this series
        run_series("tiny", runs, "r", notebooks=notebooks)
    assert list(SeriesProgress.read(incomplete_run(runs, "r")).completed) == ["00_write"]


def test_a_folder_with_work_but_no_progress_record_is_never_deleted(series, tmp_path: Path) -> None:
    """Only an empty start is cleared: a folder holding anything else (e.g. written by an older
    runner without progress records) stops the rerun and stays as it was."""
    notebooks, _ = series
    runs = tmp_path / "runs"
    work = incomplete_run(runs, "r")
    RunLayout(work).notebooks.mkdir(parents=True)
    (RunLayout(work).notebooks / "00_write.ipynb").write_text("{}")
    with pytest.raises(FileExistsError, match="--resume r"):
        run_series("tiny", runs, "r", notebooks=notebooks)
    assert (RunLayout(work).notebooks / "00_write.ipynb").read_text() == "{}"


def test_an_empty_start_held_by_another_runner_is_not_deleted(series, tmp_path: Path) -> None:
    notebooks, _ = series
    runs = tmp_path / "runs"
    work = incomplete_run(runs, "r")
    RunLayout(work).notebooks.mkdir(parents=True)
    with open(RunLayout(work).runner_lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FileExistsError, match="being written by another running process"):
            run_series("tiny", runs, "r", notebooks=notebooks)
    assert work.is_dir()


def test_a_run_being_written_cannot_be_resumed_twice(series, tmp_path: Path) -> None:
    notebooks, _ = series
    runs = tmp_path / "runs"
    with pytest.raises(PapermillExecutionError):
        run_series("tiny", runs, "r", notebooks=notebooks)
    with open(RunLayout(incomplete_run(runs, "r")).runner_lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FileExistsError, match="being written by another running process"):
            resume_series(runs, "r", notebooks)


def test_cli_resume_takes_the_runs_own_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--resume", "r", "--profile", "tiny", "--runs-dir", str(tmp_path)]) == 2
    assert "drop --profile" in capsys.readouterr().err
    assert main(["run", "--resume", "nothing", "--runs-dir", str(tmp_path)]) == 2
    assert "no interrupted run 'nothing'" in capsys.readouterr().err


def test_tiny_series_killed_while_stage2_trains_resumes_to_identical_results(tiny_run: Path, tmp_path: Path) -> None:
    name = "killed"
    process = runner(["--profile", "tiny", "--name", name], tmp_path)
    work = incomplete_run(tmp_path, name)
    assert wait_for_notebook(process, work, 3)  # 00-02 complete: 03 (stage 2) is running
    stage = RunLayout(work).stage2(0)
    while process.poll() is None and not any(stage.root.glob("state_*")):
        pass  # until stage 2 has saved a state: the resume must continue from it
    assert kill_tree(process)
    assert any(stage.root.glob("state_*")) and not (tmp_path / name).exists()

    process = runner(["--profile", "tiny", "--name", name], tmp_path)  # a plain rerun refuses
    assert process.wait() == 2 and "--resume killed" in (tmp_path / "runner.log").read_text()
    assert runner(["--resume", name], tmp_path).wait() == 0
    final = tmp_path / name
    assert results_of(final) == results_of(tiny_run)
    assert corrupt_files(final) == []
    assert "03_finetuning" not in json.loads(RunLayout(final).manifest.read_text())["resumes"][0]["completed_before"]


def test_a_full_disk_stops_the_run_naming_the_path_and_nothing_is_complete(series, tmp_path: Path, monkeypatch) -> None:
    import errno

    from kalm_lib import series_progress

    notebooks, _ = series
    runs = tmp_path / "runs"
    real = series_progress.write_output

    def full_after_the_first_notebook(payload, path):
        if payload.get("completed"):
            raise OSError(errno.ENOSPC, f"cannot write {path}: No space left on device")
        return real(payload, path)

    monkeypatch.setattr(series_progress, "write_output", full_after_the_first_notebook)
    with pytest.raises(OSError, match="series_progress.json: No space left on device"):
        run_series("tiny", runs, "r", notebooks=notebooks)
    assert not (runs / "r").exists() and incomplete_run(runs, "r").is_dir()
