"""Published MTEB scores (a ``reference`` data card) set beside this study's own runs.

A reference card lists, per model, the mteb main score of each task exactly as published, with the
split, subset, metric and the file (and commit) it was read from::

    models:
      HIT-TMG/KaLM-embedding-multilingual-mini-instruct-v2:
        label: KaLM-Embedding-V2 (0.5B)
        scores:
          STS12: {score: 0.78, split: test, subset: default, metric: cosine_spearman, path: ..., commit: ...}

Our runs are compared only where the task, split, subset and main metric all match, so a number is
never set beside one measured differently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from .data_cards import DataCardError, load_card
from .layout import RunLayout

SCORE_FIELDS = ("score", "split", "subset", "metric", "path", "commit")
REFERENCE_COLUMNS = ("model", "label", "task", *SCORE_FIELDS)
MATCH_KEYS = ["task", "split", "subset", "metric"]


def load_reference_scores(path: Path) -> pd.DataFrame:
    """One row per (model, task) of a reference card; a malformed card names the file and field."""
    card = load_card(path)
    if card.kind != "reference":
        raise DataCardError(f"{path}: field 'kind' must be 'reference' for published scores, got {card.kind!r}")
    models = card.extra.get("models")
    if not isinstance(models, dict) or not models:
        raise DataCardError(f"{path}: field 'models' must map model names to their published scores")
    rows = []
    for model, entry in models.items():
        scores = entry.get("scores") if isinstance(entry, dict) else None
        if not isinstance(scores, dict) or not scores:
            raise DataCardError(f"{path}: field 'models.{model}.scores' must map task names to score entries")
        label = entry.get("label") or model
        rows += [_score_row(f"{path}: models.{model}.scores.{task}", model, label, task, item) for task, item in scores.items()]
    return pd.DataFrame(rows, columns=REFERENCE_COLUMNS)


def _score_row(where: str, model: str, label: str, task: str, item: Any) -> dict[str, Any]:
    """Validate one published score entry and turn it into a row."""
    if not isinstance(item, dict):
        raise DataCardError(f"{where}: must be a mapping with fields {list(SCORE_FIELDS)}")
    missing = [key for key in SCORE_FIELDS if item.get(key) in (None, "")]
    if missing:
        raise DataCardError(f"{where}: missing field(s) {missing}")
    score = item["score"]
    if isinstance(score, bool) or not isinstance(score, int | float) or not 0.0 <= score <= 1.0:
        raise DataCardError(f"{where}: field 'score' must be a number in [0, 1] (mteb's scale), got {score!r}")
    return {"model": model, "label": label, "task": task, **{key: item[key] for key in SCORE_FIELDS}}


def reference_summary(reference: pd.DataFrame) -> pd.DataFrame:
    """Per published model: tasks held and their mean main score, and the mean over the tasks every
    model holds with the same metric (the only means comparable across models)."""
    keys = reference[["task", "metric"]].apply(tuple, axis=1)
    shared = set.intersection(*(set(group) for _, group in keys.groupby(reference["label"], sort=False)))
    summary = reference.groupby("label", sort=False)["score"].agg(tasks="count", mean_main_score="mean")
    summary["shared_tasks"] = len(shared)
    summary["mean_on_shared_tasks"] = reference[keys.isin(shared)].groupby("label", sort=False)["score"].mean()
    return summary


def beside_reference(scores: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Our models' and the published models' main scores on the tasks both evaluated.

    ``scores`` is a run's tidy mteb table (``RunLayout.mteb_scores``: stage, task, split, subset,
    metric, score, is_main). Rows are our stages then the published models; columns the shared
    tasks and their average (NaN for a published model that lacks one of them). Empty when no task
    matches on task, split, subset and main metric.
    """
    ours = scores[scores["is_main"]].merge(reference[MATCH_KEYS].drop_duplicates(), on=MATCH_KEYS)
    if ours.empty:
        return pd.DataFrame()
    tasks = list(dict.fromkeys(ours["task"]))
    published = reference.merge(ours[MATCH_KEYS].drop_duplicates(), on=MATCH_KEYS)
    table = pd.concat(
        [
            ours.pivot_table(index="stage", columns="task", values="score", sort=False),
            published.pivot_table(index="label", columns="task", values="score", sort=False),
        ]
    ).reindex(columns=tasks)
    table["average"] = table.mean(axis=1, skipna=False)
    return table


def run_beside_reference(run_dir: Path, card: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A reference card's per-model summary, and a run's scores beside it (empty when no task is shared)."""
    reference = load_reference_scores(card)
    return reference_summary(reference), beside_reference(pd.read_csv(RunLayout(run_dir).mteb_scores), reference)
