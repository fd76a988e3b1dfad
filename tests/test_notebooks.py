"""The whole notebook series, executed by papermill on the tiny profile, and the runner's bad inputs."""

import json
import shutil

import nbformat
import pytest
from html_checks import headings, leaks

from kalm_lib.__main__ import main
from kalm_lib.config import ConfigError
from kalm_lib.layout import DATA_CARDS_DIR, INCOMPLETE_PREFIX, RunLayout, incomplete_run
from kalm_lib.runner import notebook_series, run_series

EXPECTED = [
    "00_data_curation", "01_bidirectional_conversion", "02_pretraining", "03_finetuning",
    "04_model_soup", "05_mteb_evaluation", "06_ablations_report",
]


def test_series_is_ordered_and_parameterised():
    series = notebook_series()
    assert [path.stem for path in series] == EXPECTED
    for path in series:
        book = nbformat.read(path, as_version=4)
        tagged = [cell for cell in book.cells if "parameters" in cell.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
        assert "profile" in tagged[0].source and "run_dir" in tagged[0].source


@pytest.mark.slow
def test_run_folder_is_complete(tiny_run):
    layout = RunLayout(tiny_run)
    assert not list(tiny_run.parent.glob(f"{INCOMPLETE_PREFIX}*"))
    executed = sorted(p.stem for p in layout.notebooks.glob("*.ipynb"))
    assert executed == EXPECTED
    for name in EXPECTED:
        book = nbformat.read(layout.notebooks / f"{name}.ipynb", as_version=4)
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in book.cells)
    for path in [layout.curation_summary, layout.mteb_scores, layout.soup_trace, layout.bidirectional_check,
                 layout.history("stage1"), layout.stage1.final / "model.safetensors",
                 layout.soup("greedy") / "model.safetensors", layout.manifest, layout.report_html]:
        assert path.is_file(), path


@pytest.mark.slow
def test_manifest_records_the_run(tiny_run):
    manifest = json.loads(RunLayout(tiny_run).manifest.read_text())
    assert manifest["profile"] == "tiny" and manifest["seed"] == 7
    assert len(manifest["git"]["commit"]) == 40
    assert manifest["packages"]["torch"].startswith("2.13")
    assert set(manifest["wall_seconds"]) == set(EXPECTED)
    assert manifest["parameters"]["finetune"]["focal_gamma"] == 1.0
    assert manifest["data_sha256"] and all(len(h) == 64 for h in manifest["data_sha256"].values())


@pytest.mark.slow
def test_report_is_self_contained_html_with_figures(tiny_run):
    html = RunLayout(tiny_run).report_html.read_text()
    assert html.count("data:image/png;base64") >= 3
    assert "KalmDefinitionRetrieval" in html and "soup_greedy" in html
    assert "KaLM-Embedding-V2 (0.5B)" in html  # the published reference card's summary
    assert headings(html)[0] == "Findings" and not leaks(html)


@pytest.mark.slow
def test_bidirectional_check_in_run(tiny_run):
    check = RunLayout(tiny_run).bidirectional_check.read_text().splitlines()
    causal, bidirectional = map(float, check[1].split(",")[-2:])
    assert causal == 0.0 and bidirectional > 1e-3


def test_unknown_profile_leaves_nothing(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile"):
        run_series("no-such-profile", tmp_path)
    assert not any(tmp_path.iterdir())


def test_cli_reports_bad_parameter(tmp_path, capsys):
    assert main(["run", "--profile", "tiny", "--runs-dir", str(tmp_path), "--set", "finetune.gama=1"]) == 2
    assert "unknown parameter(s) ['finetune.gama']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_failing_notebook_leaves_no_complete_run(tmp_path, capsys):
    cards = tmp_path / "cards"
    shutil.copytree(DATA_CARDS_DIR / "offline", cards)
    (cards / "sources" / "gcide.yaml").write_text("name: gcide\nkind: source\n")
    code = main(["run", "--profile", "tiny", "--runs-dir", str(tmp_path / "runs"), "--name", "broken",
                 "--set", f"data.cards_dir={cards}"])
    err = capsys.readouterr().err
    assert code == 1
    assert "DataCardError" in err and "gcide.yaml" in err and "missing required field" in err
    assert not (tmp_path / "runs" / "broken").exists()
    assert incomplete_run(tmp_path / "runs", "broken").is_dir()


def test_missing_model_path_is_named(tmp_path, capsys):
    missing = tmp_path / "no-model-here"
    code = main(["run", "--profile", "tiny", "--runs-dir", str(tmp_path / "runs"), "--name", "nomodel",
                 "--set", "model.random_init={}", "--set", f"model.name_or_path={missing}"])
    assert code == 2
    assert f"model.name_or_path: folder not found: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "nomodel").exists()
