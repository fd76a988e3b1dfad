"""Code-health guards: lint clean, one instruction format, run paths named only in the layout."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kalm_lib.layout import NOTEBOOKS_DIR, REPO_ROOT

LIBRARY = sorted((REPO_ROOT / "kalm_lib").glob("*.py"))
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
# Names of files and folders inside a run folder; only kalm_lib/layout.py may spell them.
# A folder name joined with "/" (pathlib or a string path), or a run file's name.
FOLDERS = "data|mined|metrics|checkpoints|mteb|mteb_validation|cards|eval|validation|notebooks|final|stage1"
RUN_PATH_NAMES = re.compile(
    rf"""/\s*["']({FOLDERS})["']|["']({FOLDERS})/"""
    r"""|mteb_scores\.csv|soup_trace\.csv|curation_summary\.csv|bidirectional_check\.csv|_history\.json"""
    r"""|manifest\.json|report\.html|progress\.json|\.incomplete-|per_item_scores\.csv|mining_quality\.csv|mining_samples\.csv|mining_pool\.parquet"""
)


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed")
    result = subprocess.run([ruff, "check", "."], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_instruction_template_lives_in_one_module() -> None:
    spelled = [path.name for path in [*LIBRARY, *NOTEBOOKS] if "Query:" in path.read_text()]
    assert spelled == ["instructions.py"]


def test_run_paths_are_named_only_in_the_layout() -> None:
    offenders = {
        path.name: [match.group(0) for match in RUN_PATH_NAMES.finditer(path.read_text())]
        for path in [*LIBRARY, *NOTEBOOKS]
        if path.name not in {"layout.py", "sources.py"}  # sources.py reads packaged data folders, not runs
    }
    assert {name: hits for name, hits in offenders.items() if hits} == {}
