"""Published reference scores: the shipped card matches mteb's own task metadata; comparison joins
only like with like; malformed cards name the field."""

from pathlib import Path

import mteb
import pandas as pd
import pytest

from kalm_lib.config import load_profile
from kalm_lib.data_cards import DataCardError
from kalm_lib.layout import REPO_ROOT
from kalm_lib.reference import beside_reference, load_reference_scores, reference_summary

CARD = """\
name: demo_reference
kind: reference
description: demo
source: a test
license: CC-BY-4.0
fields: [model, task, split, subset, metric, score]
models:
  org/model-a:
    label: A
    scores:
      STS12: {score: 0.8, split: test, subset: default, metric: cosine_spearman, path: r/a/STS12.json, commit: abc}
      Banking77Classification: {score: 0.9, split: test, subset: default, metric: accuracy, path: r/a/B.json, commit: abc}
  org/model-b:
    label: B
    scores:
      STS12: {score: 0.7, split: test, subset: default, metric: cosine_spearman, path: r/b/STS12.json, commit: abc}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "reference.yaml"
    path.write_text(text)
    return path


def tidy(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["stage", "task", "split", "subset", "metric", "score", "is_main"])


def test_card_loads_one_row_per_model_and_task(tmp_path):
    table = load_reference_scores(write(tmp_path, CARD))
    assert len(table) == 3
    assert table.set_index(["label", "task"]).loc[("A", "STS12"), "score"] == 0.8
    summary = reference_summary(table)
    assert summary.loc["A", "tasks"] == 2 and summary.loc["A", "mean_main_score"] == pytest.approx(0.85)
    assert (summary["shared_tasks"] == 1).all()
    assert summary["mean_on_shared_tasks"].to_dict() == pytest.approx({"A": 0.8, "B": 0.7})


def test_comparison_matches_task_split_subset_and_metric(tmp_path):
    reference = load_reference_scores(write(tmp_path, CARD))
    scores = tidy(
        [
            ("stage1", "STS12", "test", "default", "cosine_spearman", 0.5, True),
            ("stage1", "STS12", "test", "default", "pearson", 0.9, False),  # not the main metric
            ("stage1", "Banking77Classification", "validation", "default", "accuracy", 0.6, True),  # other split
            ("stage1", "KalmSynsetClustering", "test", "default", "v_measure", 0.4, True),  # not published
            ("soup_uniform", "STS12", "test", "default", "cosine_spearman", 0.6, True),
        ]
    )
    table = beside_reference(scores, reference)
    assert list(table.columns) == ["STS12", "average"]
    assert table.loc["stage1", "STS12"] == 0.5 and table.loc["soup_uniform", "STS12"] == 0.6
    assert table.loc["A", "STS12"] == 0.8 and table.loc["B", "average"] == 0.7


def test_published_model_missing_a_shared_task_has_no_average(tmp_path):
    reference = load_reference_scores(write(tmp_path, CARD))
    scores = tidy(
        [
            ("stage1", "STS12", "test", "default", "cosine_spearman", 0.5, True),
            ("stage1", "Banking77Classification", "test", "default", "accuracy", 0.6, True),
        ]
    )
    table = beside_reference(scores, reference)
    assert table.loc["A", "average"] == pytest.approx(0.85)
    assert pd.isna(table.loc["B", "average"])


def test_no_shared_task_gives_an_empty_table(tmp_path):
    reference = load_reference_scores(write(tmp_path, CARD))
    scores = tidy([("stage1", "KalmSynsetClustering", "test", "default", "v_measure", 0.4, True)])
    assert beside_reference(scores, reference).empty


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("kind: reference", "kind: source\nloader: gcide", "must be 'reference'"),
        ("models:", "other:", "field 'models'"),
        ("    label: B\n    scores:\n      STS12: {score: 0.7", "    label: B\n    scores: {}\n    x:\n      STS12: {score: 0.7",
         r"models.org/model-b.scores"),
        ("{score: 0.9,", "{score: 90.0,", r"scores.Banking77Classification: field 'score' must be a number in \[0, 1\]"),
        ("metric: accuracy, ", "", r"missing field\(s\) \['metric'\]"),
    ],
)
def test_malformed_reference_card_names_the_field(tmp_path, old, new, message):
    path = write(tmp_path, CARD.replace(old, new))
    with pytest.raises(DataCardError, match=message) as info:
        load_reference_scores(path)
    assert str(path) in str(info.value)


def test_shipped_card_agrees_with_mteb_task_metadata():
    """Every published score names a task of the profile's benchmark, an evaluated split and subset,
    and that task's main metric (or, for reranking files written by mteb 1.x, 'map', which the
    comparison then leaves out): so a GPU run of the same benchmark lines up with it."""
    profile = load_profile("gpu-qwen2-0.5b")
    reference = load_reference_scores(REPO_ROOT / profile.evaluation.reference_card)
    tasks = {task.metadata.name: task for task in mteb.get_benchmark(profile.evaluation.benchmark).tasks}
    assert "KaLM-Embedding-V2 (0.5B)" in set(reference["label"])
    for row in reference.itertuples():
        task = tasks[row.task]
        assert row.metric == task.metadata.main_score or (row.metric, task.metadata.type) == ("map", "Reranking"), row
        assert row.split in task.metadata.eval_splits and row.subset in task.hf_subsets, row
