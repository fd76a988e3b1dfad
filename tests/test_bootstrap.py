"""Paired bootstrap over queries / pairs: hand-checked intervals and run-folder comparisons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from kalm_lib.bootstrap import (
    COMPARISON_COLUMNS,
    cosine_average_precision,
    mean_ndcg_at_10,
    paired_bootstrap,
    paired_comparisons,
    read_per_item,
)
from kalm_lib.evaluation import PER_ITEM_COLUMNS
from kalm_lib.layout import RunLayout
from kalm_lib.outputs import write_output

# --- paired_bootstrap --------------------------------------------------------------------------


def test_two_items_by_hand() -> None:
    """a = [0, 1], b = [1, 1]: delta 0.5. A resample of 2 indices holds index 0 zero, one or two
    times (p = 1/4, 1/2, 1/4), so its delta is 0, 0.5 or 1: the 2.5 % quantile is 0, the 97.5 % is 1."""
    assert paired_bootstrap(np.array([0.0, 1.0]), np.array([1.0, 1.0]), mean_ndcg_at_10) == (0.5, 0.0, 1.0)


def test_identical_items_give_a_zero_width_interval() -> None:
    values = np.random.default_rng(1).random(50)
    assert paired_bootstrap(values, values.copy(), mean_ndcg_at_10, n_resamples=500) == (0.0, 0.0, 0.0)


def test_a_constant_shift_is_recovered_exactly() -> None:
    values = np.random.default_rng(2).random(40)
    delta, low, high = paired_bootstrap(values, values + 0.125, mean_ndcg_at_10, n_resamples=500)
    assert delta == pytest.approx(0.125) and low == pytest.approx(0.125) and high == pytest.approx(0.125)


def test_a_noisy_shift_lies_inside_a_narrow_interval() -> None:
    rng = np.random.default_rng(3)
    a = rng.random(400)
    b = a + 0.05 + rng.normal(0.0, 0.02, size=400)
    delta, low, high = paired_bootstrap(a, b, mean_ndcg_at_10, n_resamples=2000)
    assert low < 0.05 < high and low < delta < high
    assert high - low < 0.01  # 4 * 0.02 / sqrt(400) = 0.004 for a normal interval


def test_pairing_matters() -> None:
    """Items differ a lot (queries easy and hard), models by a small, steady margin: the paired
    interval excludes zero; resampling each model's items independently cannot see the margin."""
    rng = np.random.default_rng(4)
    a = rng.random(60)
    b = a + 0.03
    _, low, high = paired_bootstrap(a, b, mean_ndcg_at_10, n_resamples=2000)
    assert low > 0.0 and high - low < 1e-9

    draws = [rng.integers(0, 60, size=(2000, 60)) for _ in range(2)]
    unpaired = b[draws[1]].mean(axis=1) - a[draws[0]].mean(axis=1)
    unpaired_low, unpaired_high = np.percentile(unpaired, [2.5, 97.5])
    assert unpaired_low < 0.0 < unpaired_high


def test_resamples_are_the_same_for_both_models_and_repeatable() -> None:
    """Swapping the models negates delta and mirrors the interval (same indices for both); a seed
    gives the same interval every time."""
    rng = np.random.default_rng(5)
    a, b = rng.random(30), rng.random(30)
    delta, low, high = paired_bootstrap(a, b, mean_ndcg_at_10, n_resamples=300, seed=7)
    assert paired_bootstrap(b, a, mean_ndcg_at_10, n_resamples=300, seed=7) == pytest.approx((-delta, -high, -low))
    assert paired_bootstrap(a, b, mean_ndcg_at_10, n_resamples=300, seed=7) == (delta, low, high)
    assert paired_bootstrap(a, b, mean_ndcg_at_10, n_resamples=300, seed=8) != (delta, low, high)


def test_average_precision_resamples_keep_both_classes() -> None:
    """With strata = labels every resample keeps the class counts, so AP is always defined; identical
    scores give zero; the full-sample AP is scikit-learn's."""
    cosine = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.1, 0.5])
    labels = np.array([1, 1, 0, 1, 0, 0, 0, 1])
    a = np.column_stack([cosine, labels])
    better = np.column_stack([np.where(labels == 1, cosine + 1.0, cosine), labels])
    assert cosine_average_precision(a) == pytest.approx(average_precision_score(labels, cosine))
    assert cosine_average_precision(better) == 1.0
    assert paired_bootstrap(a, a.copy(), cosine_average_precision, n_resamples=200, strata=labels) == (0.0, 0.0, 0.0)
    delta, low, high = paired_bootstrap(a, better, cosine_average_precision, n_resamples=500, strata=labels)
    assert delta == pytest.approx(1.0 - average_precision_score(labels, cosine))
    assert 0.0 <= low <= delta <= high <= 1.0


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "message"),
    [
        (np.zeros(3), np.zeros(4), {}, "3 items for model a but 4 for model b"),
        (np.zeros(0), np.zeros(0), {}, "no items"),
        (np.zeros(3), np.zeros(3), {"n_resamples": 0}, "n_resamples must be >= 1"),
        (np.zeros(3), np.zeros(3), {"strata": np.zeros(2)}, "strata has 2 entries for 3 items"),
    ],
)
def test_bad_input_is_named(a: np.ndarray, b: np.ndarray, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(a, b, mean_ndcg_at_10, **kwargs)


# --- comparisons from run folders --------------------------------------------------------------


def per_item_rows(model: str, ndcg: list[float], cosine: list[float], labels: list[int]) -> pd.DataFrame:
    retrieval = pd.DataFrame({"task": "Retrieval", "item": [f"q{i}" for i in range(len(ndcg))], "ndcg_at_10": ndcg})
    pairs = pd.DataFrame({"task": "Pairs", "item": [str(i) for i in range(len(cosine))], "cosine": cosine, "label": labels})
    rows = pd.concat([retrieval, pairs], ignore_index=True).assign(model=model, split="test", subset="default")
    return rows.reindex(columns=PER_ITEM_COLUMNS)


def write_run(folder: Path, frames: list[pd.DataFrame]) -> Path:
    write_output(pd.concat(frames, ignore_index=True), RunLayout(folder).per_item_scores)
    return folder


NDCG = [1.0, 0.5, 0.0, 0.63, 1.0, 0.0]
COSINE = [0.9, 0.2, 0.8, 0.1, 0.7, 0.4]
LABELS = [1, 0, 1, 0, 0, 1]


def test_read_per_item_restores_types(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [per_item_rows("seed0", NDCG, COSINE, LABELS)])
    items = read_per_item(run)
    assert list(items.columns) == PER_ITEM_COLUMNS
    assert items["item"].tolist()[:2] == ["q0", "q1"] and items["item"].tolist()[6:8] == ["0", "1"]
    assert str(items["label"].dtype) == "Int64"
    with pytest.raises(FileNotFoundError, match="per-item scores"):
        read_per_item(tmp_path / "empty")


def test_paired_comparisons_within_one_run(tmp_path: Path) -> None:
    shifted = [min(v + 0.1, 1.0) for v in NDCG]
    run = write_run(tmp_path / "run", [
        per_item_rows("seed0", NDCG, COSINE, LABELS),
        per_item_rows("seed1", NDCG, COSINE, LABELS),
        per_item_rows("soup", shifted, COSINE, LABELS),
    ])
    table = paired_comparisons(run, n_resamples=200)
    assert list(table.columns) == COMPARISON_COLUMNS
    pairs = set(zip(table["model_a"], table["model_b"], strict=True))
    assert pairs == {("seed0", "seed1"), ("seed0", "soup"), ("seed1", "soup")}
    assert set(table["statistic"]) == {"mean_ndcg_at_10", "cosine_ap"}
    assert (table["n_items"] == 6).all() and set(table["run_a"]) == set(table["run_b"]) == {"run"}
    same = table[table["model_b"] == "seed1"]
    assert (same[["delta", "ci_low", "ci_high"]] == 0.0).all().all()
    soup = table[(table["model_a"] == "seed0") & (table["model_b"] == "soup") & (table["task"] == "Retrieval")].iloc[0]
    assert soup["delta"] == pytest.approx(np.mean(shifted) - np.mean(NDCG))
    assert soup["score_a"] == pytest.approx(np.mean(NDCG)) and soup["ci_low"] <= soup["delta"] <= soup["ci_high"]

    chosen = paired_comparisons(run, pairs=[("soup", "seed0")], n_resamples=200)
    assert set(zip(chosen["model_a"], chosen["model_b"], strict=True)) == {("soup", "seed0")}
    with pytest.raises(ValueError, match="model 'nope' not in"):
        paired_comparisons(run, pairs=[("soup", "nope")])


def test_paired_comparisons_across_runs_match_models_by_label(tmp_path: Path) -> None:
    reference = write_run(tmp_path / "full", [per_item_rows("seed0", NDCG, COSINE, LABELS)])
    variant = write_run(tmp_path / "no_focal", [per_item_rows("seed0", [v / 2 for v in NDCG], COSINE, LABELS)])
    table = paired_comparisons(reference, variant, n_resamples=200)
    assert set(zip(table["run_a"], table["model_a"], table["run_b"], table["model_b"], strict=True)) == {
        ("full", "seed0", "no_focal", "seed0")
    }
    retrieval = table[table["task"] == "Retrieval"].iloc[0]
    assert retrieval["delta"] == pytest.approx(-np.mean(NDCG) / 2)

    other_payload = write_run(tmp_path / "other", [per_item_rows("seed0", NDCG, COSINE, LABELS[::-1])])
    with pytest.raises(ValueError, match="Pairs .*labels differ"):
        paired_comparisons(reference, other_payload, n_resamples=10)
    fewer = write_run(tmp_path / "fewer", [per_item_rows("seed0", NDCG[:4], COSINE, LABELS)])
    with pytest.raises(ValueError, match="Retrieval .*items differ"):
        paired_comparisons(reference, fewer, n_resamples=10)
