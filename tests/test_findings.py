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
        "variant": ["ref"] * 3 + ["v"] * 3,
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
