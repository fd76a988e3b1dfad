"""The ablation grid end to end on the tiny profile (shares the session's tiny run)."""

import json

import pandas as pd


def test_variant_reuses_upstream_and_runs_stage2(tiny_grid):
    manifest = json.loads((tiny_grid / "no_focal" / "manifest.json").read_text())
    assert manifest["reused_from"]["notebooks"] == ["00_data_curation", "01_bidirectional_conversion", "02_pretraining"]
    assert set(manifest["wall_seconds"]) == {"03_finetuning", "04_model_soup", "05_mteb_evaluation", "06_ablations_report"}
    assert manifest["parameters"]["finetune"]["focal_gamma"] == 0.0
    reference = tiny_grid / "full" / "data" / "curation_summary.csv"
    assert (tiny_grid / "no_focal" / "data" / "curation_summary.csv").stat().st_ino == reference.stat().st_ino
    scores = pd.read_csv(tiny_grid / "no_focal" / "metrics" / "mteb_scores.csv")
    assert "base" not in set(scores["stage"]) and "stage2_seed0" in set(scores["stage"])


def test_variants_differ_only_in_stage2(tiny_grid):
    full = json.loads((tiny_grid / "full" / "manifest.json").read_text())
    variant = json.loads((tiny_grid / "no_focal" / "manifest.json").read_text())
    assert full["data_sha256"] == variant["data_sha256"]
    a = pd.read_csv(tiny_grid / "full" / "metrics" / "mteb_scores.csv")
    b = pd.read_csv(tiny_grid / "no_focal" / "metrics" / "mteb_scores.csv")
    merged = a.merge(b, on=["stage", "task", "metric"], suffixes=("_full", "_variant"))
    assert (merged["score_full"] != merged["score_variant"]).any()  # focal loss changed stage 2


def test_grid_report_and_manifest(tiny_grid):
    manifest = json.loads((tiny_grid / "manifest.json").read_text())
    assert manifest["grid"]["reference"] == "full" and set(manifest["runs"]) == {"full", "no_focal"}
    html = (tiny_grid / "report.html").read_text()
    assert "no_focal" in html and "delta_vs_reference" in html
    assert html.count("data:image/png;base64") >= 4
