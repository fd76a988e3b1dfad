"""Uncertainty of a difference between two models on one evaluation: a paired bootstrap over items.

The items are a task's queries (retrieval: per-query nDCG@10) or pairs (pair classification: the
cosine similarity and label of each pair), written for every model by notebook 05
(``RunLayout.per_item_scores``, see :func:`kalm_lib.evaluation.per_item_scores`). Two models of one
run, or two runs evaluated on the same payloads (grid variants), are compared on the SAME resampled
items, so what both models find easy or hard cancels out of the difference.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

from .evaluation import PER_ITEM_COLUMNS, PER_ITEM_VALUE_TYPES
from .layout import RunLayout

Statistic = Callable[[np.ndarray], float]
CONFIDENCE = 0.95
GROUP = ["task", "split", "subset"]
COMPARISON_COLUMNS = [
    "task", "split", "subset", "statistic", "run_a", "model_a", "run_b", "model_b",
    "score_a", "score_b", "delta", "ci_low", "ci_high", "n_items",
]


# --- statistics of a set of items ----------------------------------------------------------------


def mean_ndcg_at_10(items: np.ndarray) -> float:
    """Retrieval: the mean of per-query nDCG@10 (``items``: [n]), mteb's ``ndcg_at_10``."""
    return float(np.mean(items))


def cosine_average_precision(items: np.ndarray) -> float:
    """Pair classification: average precision of the pairs ranked by cosine similarity.

    ``items``: [n, 2], columns cosine and 0/1 label; AP = sum_k (R_k - R_{k-1}) P_k over thresholds
    (scikit-learn's ``average_precision_score``, as mteb computes it). mteb's main score ``max_ap`` is
    the largest AP over its similarity functions (model similarity, cosine, dot, euclidean,
    manhattan); this is the cosine one (mteb's ``cosine_ap``). On unit vectors (kalm-study encoders)
    dot, model similarity (cosine) and euclidean distance rank pairs as cosine does, so their APs are
    equal; manhattan ranks differently, so ``max_ap`` = max(``cosine_ap``, ``manhattan_ap``).
    """
    return float(average_precision_score(items[:, 1].astype(int), items[:, 0]))


# --- the paired bootstrap ----------------------------------------------------------------------


def _resample(rng: np.random.Generator, strata: Sequence[np.ndarray]) -> np.ndarray:
    """Indices drawn with replacement within each stratum (an index array), as many as it holds."""
    return np.concatenate([rng.choice(stratum, size=len(stratum), replace=True) for stratum in strata])


def paired_bootstrap(
    per_item_a: np.ndarray,
    per_item_b: np.ndarray,
    statistic: Statistic,
    n_resamples: int = 10_000,
    seed: int = 0,
    *,
    strata: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """Difference ``statistic(b) - statistic(a)`` and its 95 % paired percentile-bootstrap interval.

    ``per_item_a[i]`` and ``per_item_b[i]`` are the two models' values on the same item i (first
    axis, n items). With s = ``statistic``:

        delta   = s(b) - s(a) on all n items
        delta_r = s(b[I_r]) - s(a[I_r]),  r = 1..R (R = ``n_resamples``), where I_r is n indices drawn
                  uniformly with replacement from 0..n-1 (numpy ``default_rng(seed)``), the SAME I_r
                  for both models; with ``strata`` (e.g. pair labels) indices are drawn within each
                  stratum, as many as it holds, so every resample keeps the class counts
        interval = the 2.5th and 97.5th percentiles of delta_1..delta_R (numpy's linear interpolation)

    Returns ``(delta, low, high)``.
    """
    a, b = np.asarray(per_item_a), np.asarray(per_item_b)
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap: {len(a)} items for model a but {len(b)} for model b")
    if len(a) == 0:
        raise ValueError("paired_bootstrap: no items")
    if n_resamples < 1:
        raise ValueError(f"paired_bootstrap: n_resamples must be >= 1, got {n_resamples}")
    labels = np.zeros(len(a), dtype=int) if strata is None else np.asarray(strata)
    if len(labels) != len(a):
        raise ValueError(f"paired_bootstrap: strata has {len(labels)} entries for {len(a)} items")
    groups = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    rng = np.random.default_rng(seed)
    deltas = np.empty(n_resamples)
    for r in range(n_resamples):
        index = _resample(rng, groups)
        deltas[r] = statistic(b[index]) - statistic(a[index])
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return float(statistic(b) - statistic(a)), float(low), float(high)


# --- comparisons read from run folders ---------------------------------------------------------


def read_per_item(run_dir: Path) -> pd.DataFrame:
    """A run's per-item scores (``RunLayout.per_item_scores``), item ids as strings, labels Int64."""
    path = RunLayout(Path(run_dir)).per_item_scores
    if not path.is_file():
        raise FileNotFoundError(f"no per-item scores at {path}; run notebook 05 (run_evaluation) first")
    text_columns = ["model", "task", "split", "subset", "item"]
    frame = pd.read_csv(path, dtype=dict.fromkeys(text_columns, str), keep_default_na=False, na_values={
        column: [""] for column in PER_ITEM_VALUE_TYPES})
    return frame.reindex(columns=PER_ITEM_COLUMNS).astype(PER_ITEM_VALUE_TYPES)


def _values(group: pd.DataFrame) -> tuple[str, Statistic, np.ndarray]:
    """The statistic of one model's (task, split, subset) rows and their values, in row order:
    cosine AP of [cosine, label] rows for pairs, mean nDCG@10 of the queries for retrieval."""
    if group["label"].notna().all():
        return "cosine_ap", cosine_average_precision, group[["cosine", "label"]].to_numpy(dtype=float)
    return "mean_ndcg_at_10", mean_ndcg_at_10, group["ndcg_at_10"].to_numpy(dtype=float)


def _aligned(group_a: pd.DataFrame, group_b: pd.DataFrame, where: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two models' rows of one task in the same item order; their items (and labels) must agree."""
    a, b = group_a.sort_values("item"), group_b.sort_values("item")
    if a["item"].tolist() != b["item"].tolist():
        only = set(a["item"]) ^ set(b["item"])
        raise ValueError(f"{where}: items differ ({len(only)} in one model only, e.g. {sorted(only)[:3]}); "
                         "paired comparisons need the same evaluation payloads")
    if not a["label"].reset_index(drop=True).equals(b["label"].reset_index(drop=True)):
        raise ValueError(f"{where}: pair labels differ; paired comparisons need the same evaluation payloads")
    return a, b


def _compare(group_a: pd.DataFrame, group_b: pd.DataFrame, where: str, n_resamples: int, seed: int) -> dict[str, object]:
    """delta, interval and scores of model b minus model a on one (task, split, subset)."""
    a, b = _aligned(group_a, group_b, where)
    name, statistic, values_a = _values(a)
    _, _, values_b = _values(b)
    strata = values_a[:, 1] if name == "cosine_ap" else None
    delta, low, high = paired_bootstrap(values_a, values_b, statistic, n_resamples, seed, strata=strata)
    return {"statistic": name, "score_a": statistic(values_a), "score_b": statistic(values_b),
            "delta": delta, "ci_low": low, "ci_high": high, "n_items": len(a)}


def _model(items: pd.DataFrame, model: str, run: str) -> pd.DataFrame:
    """One model's rows, or a ValueError naming the models the run has."""
    rows = items[items["model"] == model]
    if rows.empty:
        raise ValueError(f"model {model!r} not in run {run!r}; it has {list(dict.fromkeys(items['model']))}")
    return rows


def _default_pairs(items_a: pd.DataFrame, items_b: pd.DataFrame, one_run: bool) -> list[tuple[str, str]]:
    """Every two models of one run (in evaluation order), or every label two runs share against itself."""
    models_a = list(dict.fromkeys(items_a["model"]))
    if one_run:
        return list(itertools.combinations(models_a, 2))
    return [(model, model) for model in models_a if model in set(items_b["model"])]


def paired_comparisons(
    run_a: Path,
    run_b: Path | None = None,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired-bootstrap comparisons (:func:`paired_bootstrap`) of models, per task, split and subset.

    One run: model_a of ``run_a`` against model_b of the same run, for every ``pairs`` entry (default:
    every two models, in evaluation order). Two runs (e.g. two grid variants on the same payloads):
    model_a of ``run_a`` against model_b of ``run_b`` (default: every model label both runs have,
    against itself). delta = statistic(model_b) - statistic(model_a): mean nDCG@10 for retrieval,
    cosine AP for pair classification (pair resamples keep the class counts). Columns
    :data:`COMPARISON_COLUMNS`; every comparison draws the same resamples (``seed``).
    """
    run_a = Path(run_a)
    run_b = run_a if run_b is None else Path(run_b)
    items_a, items_b = read_per_item(run_a), read_per_item(run_b)
    rows = []
    for model_a, model_b in _default_pairs(items_a, items_b, run_b == run_a) if pairs is None else pairs:
        groups_b = dict(list(_model(items_b, model_b, run_b.name).groupby(GROUP)))
        for key, group_a in _model(items_a, model_a, run_a.name).groupby(GROUP):
            where = f"{key[0]} {key[1]}/{key[2]}: {run_a.name}:{model_a} vs {run_b.name}:{model_b}"
            if key not in groups_b:
                raise ValueError(f"{where}: the task has no per-item scores for model b")
            rows.append({**dict(zip(GROUP, key, strict=True)), "run_a": run_a.name, "model_a": model_a,
                         "run_b": run_b.name, "model_b": model_b,
                         **_compare(group_a, groups_b[key], where, n_resamples, seed)})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
