"""The findings table: effects, intervals and readings checked by hand."""

import math

import numpy as np
import pandas as pd
import pytest

from kalm_lib.findings import grid_findings, reading, stage2_vs_stage1

T_975_2 = 4.302653  # Student t, 97.5% quantile, 2 degrees of freedom


def test_reading_follows_the_interval_not_the_point_estimate():
    assert reading("x", "retrieval", 0.02, 0.01, 0.03) == "x raises retrieval by 0.0200 (95% CI +0.0100 to +0.0300)."
    assert reading("x", "retrieval", -0.02, -0.03, -0.01).startswith("x lowers retrieval by 0.0200")
    assert reading("x", "retrieval", 0.02, -0.01, 0.05).startswith("x: no measurable effect on retrieval (+0.0200")
    assert "no interval" in reading("x", "retrieval", 0.02, math.nan, math.nan)


def test_stage2_vs_stage1_is_paired_by_seed():
    scores = pd.DataFrame({
        "stage": ["stage1", "stage2_seed0", "stage2_seed1", "stage2_seed2", "soup_uniform"],
        "task": ["A"] * 5, "score": [0.50, 0.52, 0.53, 0.54, 0.9],
    })
    (row,) = stage2_vs_stage1(scores).to_dict("records")
    deltas = np.array([0.02, 0.03, 0.04])
    assert row["effect"] == pytest.approx(0.03)
    half = T_975_2 * deltas.std(ddof=1) / math.sqrt(3)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.03 - half, 0.03 + half))
    assert row["n"] == 3 and "raises A" in row["reading"]


def test_grid_findings_pair_variants_with_the_reference_by_seed():
    # The variant's rows come in another seed order: pairing must follow the seed, not the position.
    table = pd.DataFrame({
        "variant": ["ref"] * 3 + ["v"] * 3, "replicate": [""] * 6,  # collect()'s columns: one curation
        "model": ["stage2_seed0", "stage2_seed1", "stage2_seed2", "stage2_seed2", "stage2_seed0", "stage2_seed1"],
        "seed": pd.array([0, 1, 2, 2, 0, 1], dtype="Int64"), "task": ["A"] * 6,
        "score": [0.50, 0.60, 0.70, 0.678, 0.482, 0.58],
    })
    rows = grid_findings(table, "ref").set_index("task")
    assert set(rows.index) == {"A", "average"}
    assert rows.loc["A", "effect"] == pytest.approx(-0.02)
    half = T_975_2 * np.std([-0.018, -0.02, -0.022], ddof=1) / math.sqrt(3)
    assert rows.loc["A", "ci_high"] == pytest.approx(-0.02 + half)
    assert rows.loc["A", "reading"].startswith("v vs ref lowers A by 0.0200")


def test_markdown_table_bolds_measurable_effects_only():
    from kalm_lib.findings import finding_row, findings_markdown

    rows = pd.DataFrame([finding_row("a vs b", "T", 0.02, 0.01, 3, "t over 3 stage-2 seeds"),
                         finding_row("c vs b", "T", 0.02, 0.05, 3, "t over 3 stage-2 seeds"),
                         finding_row("d vs b", "T", 0.02, (math.nan, math.nan), 1, "single")])
    lines = findings_markdown(rows).splitlines()
    assert lines[0] == "| finding | task | effect | 95% interval | n | interval |"
    assert lines[2] == "| a vs b | T | **+0.0200** | [+0.0100, +0.0300] | 3 | t over 3 stage-2 seeds |"
    assert lines[3] == "| c vs b | T | +0.0200 | [-0.0300, +0.0700] | 3 | t over 3 stage-2 seeds |"
    assert lines[4] == "| d vs b | T | +0.0200 | – | 1 | single |"


def test_scores_table_as_markdown():
    from kalm_lib.findings import scores_markdown

    table = pd.DataFrame({"T1": [0.5, 0.25], "average": [0.5, 0.125]}, index=pd.Index(["base", "stage1"], name="stage"))
    assert scores_markdown(table).splitlines() == [
        "| model | T1 | average |", "| --- | --- | --- |", "| base | 0.5000 | 0.5000 |", "| stage1 | 0.2500 | 0.1250 |",
    ]


def test_findings_command_reports_a_missing_run(tmp_path, capsys):
    from kalm_lib.__main__ import main

    assert main(["findings", "--run-dir", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
