"""Run manifests name the code: commit and whether tracked files had changes."""

import subprocess

from kalm_lib.manifest import git_state


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True, capture_output=True)


def test_git_state_flags_tracked_changes_outside_excluded_paths(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "out.json").write_text("{}\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "start")
    clean = git_state(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False

    (tmp_path / "results" / "out.json").write_text('{"new": 1}\n')
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert git_state(tmp_path, exclude=["results"])["dirty"] is False
    assert git_state(tmp_path)["dirty"] is True

    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path, exclude=["results"])["dirty"] is True


def test_git_state_outside_a_repository(tmp_path):
    assert git_state(tmp_path) == {"commit": "unknown", "dirty": False}
