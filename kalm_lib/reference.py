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

The same card carries ``paper_tables``: the paper's own benchmark averages (MTEB(cmn, v1) and
MTEB(eng, v1), Tables 2-4), per model Mean(Task), Mean(Type) and the per-type means. Our runs'
aggregates on those benchmarks are computed by mteb's ``Benchmark.get_score`` (the leaderboard's
own code: Mean(Task) = mean of the tasks' main scores; Mean(TaskType) = mean over task types of the
mean main score of that type's tasks) and set beside them by :func:`beside_paper_tables`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mteb
import pandas as pd
from mteb import ResultCache

from .data_cards import DataCardError, load_card
from .layout import RunLayout

SCORE_FIELDS = ("score", "split", "subset", "metric", "path", "commit")
REFERENCE_COLUMNS = ("model", "label", "task", *SCORE_FIELDS)
MATCH_KEYS = ["task", "split", "subset", "metric"]
MEAN_TASK, MEAN_TYPE = "Mean(Task)", "Mean(TaskType)"  # mteb's names for the leaderboard aggregates
AGGREGATE_COLUMNS = ("benchmark", "model", "label", "aggregate", "score")
ROUNDING = 0.01  # a printed mean of two-decimal percents may differ from the mean of printed parts by this


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


# --- benchmark averages (the paper's Tables 2-4) ------------------------------------------------


def load_paper_tables(path: Path) -> pd.DataFrame:
    """The card's ``paper_tables``: one row per (benchmark, model, aggregate) on mteb's 0-1 scale.

    ``aggregate`` is ``Mean(Task)``, ``Mean(TaskType)`` or a task type (the benchmark's
    ``type_order``). A malformed entry, or a row whose Mean(Type) is not the mean of its per-type
    scores within :data:`ROUNDING` and is not marked ``inconsistent``, names the card and the field.
    """
    tables = load_card(path).extra.get("paper_tables")
    if not isinstance(tables, dict) or not isinstance(tables.get("benchmarks"), dict):
        raise DataCardError(f"{path}: field 'paper_tables.benchmarks' must map benchmark names to tables")
    rows = []
    for benchmark, table in tables["benchmarks"].items():
        where = f"{path}: paper_tables.benchmarks.{benchmark}"
        types = table.get("type_order") if isinstance(table, dict) else None
        models = table.get("models") if isinstance(table, dict) else None
        if not isinstance(types, list) or not isinstance(models, dict) or not models:
            raise DataCardError(f"{where}: fields 'type_order' (list) and 'models' (mapping) are required")
        for label, entry in models.items():
            rows += _aggregate_rows(f"{where}.models.{label}", benchmark, label, types, entry)
    return pd.DataFrame(rows, columns=AGGREGATE_COLUMNS)


def _aggregate_rows(where: str, benchmark: str, label: str, types: list[str], entry: Any) -> list[dict[str, Any]]:
    """Validate one printed table row (percent) and turn it into rows on the 0-1 scale."""
    fields = ("model", "mean_task", "mean_type", "types")
    if not isinstance(entry, dict) or any(entry.get(key) in (None, "") for key in fields):
        raise DataCardError(f"{where}: must be a mapping with fields {list(fields)}")
    values = [entry["mean_task"], entry["mean_type"], *entry["types"]] if isinstance(entry["types"], list) else []
    if len(values) != 2 + len(types) or not all(_is_percent(value) for value in values):
        raise DataCardError(f"{where}: mean_task, mean_type and {len(types)} types must be percents in [0, 100]")
    mean_of_types = sum(entry["types"]) / len(types)
    if abs(mean_of_types - entry["mean_type"]) > ROUNDING and not entry.get("inconsistent"):
        raise DataCardError(f"{where}: mean_type {entry['mean_type']} is not the mean of its types "
                            f"({mean_of_types:.3f}); fix the transcription or mark the row 'inconsistent'")
    names = [MEAN_TASK, MEAN_TYPE, *types]
    return [{"benchmark": benchmark, "model": entry["model"], "label": label, "aggregate": name, "score": value / 100}
            for name, value in zip(names, values, strict=True)]


def _is_percent(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and 0.0 <= value <= 100.0


def benchmark_means(output_folder: Path, benchmarks: list[mteb.Benchmark]) -> pd.DataFrame:
    """Leaderboard aggregates of every model saved in an mteb results folder, per benchmark.

    Computed by ``Benchmark.get_score`` (mteb's leaderboard code, not re-implemented here):
    Mean(Task) = (1/|T|) sum_t s_t over the benchmark's tasks T (main scores, restricted to the
    benchmark's subsets and splits); Mean(TaskType) = mean over types y of (1/|T_y|) sum_{t in T_y} s_t;
    and the per-type means. A model missing a task of the benchmark gets NaN, never a partial mean.
    """
    rows = []
    for benchmark in benchmarks:
        results = ResultCache(output_folder).load_results(tasks=benchmark, include_remote=False, require_model_meta=False)
        types = list(dict.fromkeys(task.metadata.type for task in benchmark.tasks))
        for model, scores in benchmark.get_score(results).items():
            rows += [{"benchmark": benchmark.name, "model": model, "label": model, "aggregate": name,
                      "score": float("nan") if scores.get(name) is None else float(scores[name])}
                     for name in (MEAN_TASK, MEAN_TYPE, *types)]
    return pd.DataFrame(rows, columns=AGGREGATE_COLUMNS)


def beside_paper_tables(ours: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Mean(Task) and Mean(TaskType) of our stages and of the paper's models, one column per
    (benchmark, aggregate), on the benchmarks both hold; empty when none is shared."""
    shared = paper[paper["benchmark"].isin(set(ours["benchmark"]))]
    if shared.empty:
        return pd.DataFrame()
    both = pd.concat([ours, shared], ignore_index=True)
    both = both[both["aggregate"].isin([MEAN_TASK, MEAN_TYPE])]
    return both.pivot_table(index="label", columns=["benchmark", "aggregate"], values="score", sort=False, dropna=False)


def stage_benchmark_means(mteb_folder: Path, benchmarks: list[str], scores: pd.DataFrame) -> pd.DataFrame:
    """:func:`benchmark_means` of a run's mteb folder, each model labelled by its stage (``scores``:
    the run's tidy table with ``model`` and ``stage``)."""
    means = benchmark_means(mteb_folder, [mteb.get_benchmark(name) for name in benchmarks])
    stages = scores[["model", "stage"]].drop_duplicates()
    return means.assign(label=means["model"].map(dict(zip(stages["model"], stages["stage"], strict=True))))


def run_beside_paper_tables(run_dir: Path, card: Path) -> pd.DataFrame:
    """A run's benchmark aggregates (``RunLayout.benchmark_means``) beside the card's paper tables."""
    return beside_paper_tables(pd.read_csv(RunLayout(run_dir).benchmark_means), load_paper_tables(card))
