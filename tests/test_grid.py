"""The ablation grid end to end on the tiny profile (shares the session's tiny run)."""

import json
import os
import shutil

import pandas as pd
import pytest
from html_checks import headings, leaks

from kalm_lib.layout import GridLayout

pytestmark = pytest.mark.slow  # papermill, multi-process or benchmark runs: `pytest -m "not slow"` skips them


def test_variant_reuses_upstream_and_runs_stage2(tiny_grid):
    full, variant = GridLayout(tiny_grid).variant("full"), GridLayout(tiny_grid).variant("no_focal")
    manifest = json.loads(variant.manifest.read_text())
    assert manifest["reused_from"]["notebooks"] == ["00_data_curation", "01_bidirectional_conversion", "02_pretraining"]
    assert set(manifest["wall_seconds"]) == {"03_finetuning", "04_model_soup", "05_mteb_evaluation", "06_ablations_report"}
    assert manifest["parameters"]["finetune"]["focal_gamma"] == 0.0
    assert variant.curation_summary.stat().st_ino == full.curation_summary.stat().st_ino
    scores = pd.read_csv(variant.mteb_scores)
    assert "base" not in set(scores["stage"]) and "stage2_seed0" in set(scores["stage"])


def test_variants_differ_only_in_stage2(tiny_grid):
    full, variant = GridLayout(tiny_grid).variant("full"), GridLayout(tiny_grid).variant("no_focal")
    assert json.loads(full.manifest.read_text())["data_sha256"] == json.loads(variant.manifest.read_text())["data_sha256"]
    a = pd.read_csv(full.mteb_scores)
    b = pd.read_csv(variant.mteb_scores)
    merged = a.merge(b, on=["stage", "task", "metric"], suffixes=("_full", "_variant"))
    assert (merged["score_full"] != merged["score_variant"]).any()  # focal loss changed stage 2


def test_grid_report_and_manifest(tiny_grid):
    layout = GridLayout(tiny_grid)
    manifest = json.loads(layout.manifest.read_text())
    assert manifest["grid"]["reference"] == "full" and set(manifest["runs"]) == {"full", "no_focal"}
    html = layout.report_html.read_text()
    sections = headings(html)
    assert sections[0] == "Findings" and "no_focal vs full" in html[: html.index("Evidence")]  # findings open the report
    assert not leaks(html)
    assert html.count("data:image/png;base64") >= 4


def test_report_only_renders_from_the_runs_present(tiny_grid, tmp_path):
    from kalm_lib.ablations import load_grid, run_grid

    spec = tmp_path / "grid.yaml"  # the fixture's grid plus a variant that never ran
    spec.write_text("profile: tiny\nreference: full\nvariants:\n  full: {}\n  no_focal: {finetune.focal_gamma: 0.0}\n"
                    "  gamma_2: {finetune.focal_gamma: 2.0}\n")
    copy = tmp_path / "runs" / tiny_grid.name  # hard-linked: the shared fixture's report stays as it is
    shutil.copytree(tiny_grid, copy, copy_function=os.link)
    folder = run_grid(load_grid(spec), copy.parent, copy.name, report_only=True)
    manifest = json.loads(GridLayout(folder).manifest.read_text())
    assert manifest["missing_runs"] == ["gamma_2"] and set(manifest["runs"]) == {"full", "no_focal"}
    assert not GridLayout(folder).variant("gamma_2").root.exists()


def test_findings_command_prints_variants_also_at_truncated_dims(tiny_grid, capsys):
    from kalm_lib.__main__ import main

    reference = GridLayout(tiny_grid).variant("full").root
    assert main(["findings", "--run-dir", str(reference), "--grid-dir", str(tiny_grid), "--reference", "full"]) == 0
    tables = capsys.readouterr().out.strip().split("\n\n")
    assert len(tables) == 3  # findings, findings at truncated dims, scores
    assert "| no_focal vs full | average |" in tables[0] and "| no_focal vs full @dim16 | average |" in tables[1]
