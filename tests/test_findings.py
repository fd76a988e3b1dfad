"""The findings table: effects, intervals and readings checked by hand."""

import math

import numpy as np
import pandas as pd
import pytest

from kalm_lib.findings import (
    grid_findings,
    matryoshka_findings,
    reading,
    stage2_vs_stage1,
    stage2_vs_stage1_across_curations,
)

T_975_1 = 12.706205  # Student t, 97.5% quantile, 1 degree of freedom
T_975_2 = 4.302653  # ... 2 degrees of freedom


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


def grid_table(rows: list[tuple[str, str, str, str, float]]) -> pd.DataFrame:
    """A :func:`kalm_lib.ablations.collect`-shaped table from (variant, replicate, model, task, score)."""
    table = pd.DataFrame(rows, columns=["variant", "replicate", "model", "task", "score"])
    seeds = table["model"].str.fullmatch(r"stage2_seed\d+")
    table["seed"] = pd.array(table["model"].str.extract(r"^stage2_seed(\d+)$")[0].where(seeds).astype(float), dtype="Int64")
    return table


def test_stage2_vs_stage1_across_curations_pairs_within_each_curation():
    table = grid_table([
        ("ref", "", "stage1", "A", 0.40), ("ref", "", "stage2_seed0", "A", 0.50), ("ref", "", "stage2_seed1", "A", 0.46),
        ("ref", "", "stage1", "B", 0.20), ("ref", "", "stage2_seed0", "B", 0.30), ("ref", "", "stage2_seed1", "B", 0.20),
        ("ref", "cs2", "stage1", "A", 0.30), ("ref", "cs2", "stage2_seed0", "A", 0.35), ("ref", "cs2", "stage2_seed1", "A", 0.33),
        ("ref", "cs2", "stage1", "B", 0.10), ("ref", "cs2", "stage2_seed0", "B", 0.15), ("ref", "cs2", "stage2_seed1", "B", 0.13),
        ("v", "", "stage2_seed0", "A", 0.9),  # other variants do not enter
    ])
    rows = stage2_vs_stage1_across_curations(table, "ref").set_index("task")
    # per curation, the mean over seeds of stage 2 - stage 1, then t over the two curations:
    # A: 0.08 and 0.04; B: 0.05 and 0.04; task average (0.40, 0.33 vs 0.30 | 0.25, 0.23 vs 0.20): 0.065 and 0.04
    for task, means in {"A": [0.08, 0.04], "B": [0.05, 0.04], "average": [0.065, 0.04]}.items():
        effect, half = np.mean(means), T_975_1 * np.std(means, ddof=1) / math.sqrt(2)
        assert rows.loc[task, "effect"] == pytest.approx(effect)
        assert (rows.loc[task, "ci_low"], rows.loc[task, "ci_high"]) == pytest.approx((effect - half, effect + half))
        assert rows.loc[task, "n"] == 2
    assert stage2_vs_stage1_across_curations(table[table["replicate"] == ""], "ref").empty  # one curation: none
    assert "ref stage 2 vs stage 1, across curations" in set(grid_findings(table, "ref")["finding"])


def test_matryoshka_findings_pair_truncated_scores_by_seed_and_dim():
    table = grid_table([
        ("ref", "", "stage2_seed0", "A", 0.50), ("ref", "", "stage2_seed1", "A", 0.60),
        ("ref", "", "stage2_seed0@dim16", "A", 0.40), ("ref", "", "stage2_seed1@dim16", "A", 0.44),
        ("ref", "", "stage2_seed0@dim8", "A", 0.30), ("ref", "", "stage2_seed1@dim8", "A", 0.31),
        ("nomat", "", "stage2_seed1@dim16", "A", 0.40), ("nomat", "", "stage2_seed0@dim16", "A", 0.37),  # seed order swapped
        ("nomat", "", "stage2_seed0@dim8", "A", 0.20), ("nomat", "", "stage2_seed1@dim8", "A", 0.25),
        ("ref", "", "soup_uniform@dim16", "A", 0.99),  # soups are no single checkpoints
    ])
    rows = matryoshka_findings(table, "ref").set_index(["finding", "task"])
    assert set(rows.index) == {(f"nomat vs ref @dim{d}", t) for d in (16, 8) for t in ("A", "average")}
    half16 = T_975_1 * np.std([-0.03, -0.04], ddof=1) / math.sqrt(2)
    assert rows.loc[("nomat vs ref @dim16", "A"), "effect"] == pytest.approx(-0.035)
    assert rows.loc[("nomat vs ref @dim16", "A"), "ci_high"] == pytest.approx(-0.035 + half16)
    assert rows.loc[("nomat vs ref @dim8", "A"), "effect"] == pytest.approx(-0.08)


def test_grid_with_only_its_reference_has_no_findings_and_unpaired_dims_are_left_out():
    reference_only = grid_table([("ref", "", "stage1", "A", 0.4), ("ref", "", "stage2_seed0", "A", 0.5)])
    assert grid_findings(reference_only, "ref").empty
    table = grid_table([  # the variant has truncated scores, the reference (an older run) none
        ("ref", "", "stage2_seed0", "A", 0.5), ("v", "", "stage2_seed0", "A", 0.4), ("v", "", "stage2_seed0@dim8", "A", 0.3),
    ])
    assert matryoshka_findings(table, "ref").empty
