"""Published reference scores: the shipped card matches mteb's own task metadata; comparison joins
only like with like; malformed cards name the field."""

from pathlib import Path

import mteb
import pandas as pd
import pytest
from mteb import TaskResult

from kalm_lib.config import load_profile
from kalm_lib.data_cards import DataCardError, load_card
from kalm_lib.layout import REPO_ROOT
from kalm_lib.reference import (
    MEAN_TASK,
    MEAN_TYPE,
    benchmark_means,
    beside_paper_tables,
    beside_reference,
    load_paper_tables,
    load_reference_scores,
    reference_summary,
)

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
    card = REPO_ROOT / profile.evaluation.reference_card
    reference = load_reference_scores(card)
    tasks = {task.metadata.name: task for task in mteb.get_benchmark(load_card(card).extra["benchmark"]).tasks}
    assert "KaLM-Embedding-V2 (0.5B)" in set(reference["label"])
    for row in reference.itertuples():
        task = tasks[row.task]
        assert row.metric == task.metadata.main_score or (row.metric, task.metadata.type) == ("map", "Reranking"), row
        assert row.split in task.metadata.eval_splits and row.subset in task.hf_subsets, row


# --- the paper's benchmark averages --------------------------------------------------------------


def test_paper_tables_hold_the_papers_numbers_for_the_benchmarks_the_gpu_profile_evaluates():
    """Table 2's numbers as the issue quotes them; every benchmark of the card is one the GPU profile
    evaluates, and its type columns are exactly the task types of mteb's benchmark definition."""
    profile = load_profile("gpu-qwen2-0.5b")
    paper = load_paper_tables(REPO_ROOT / profile.evaluation.reference_card)
    table = paper.set_index(["benchmark", "label", "aggregate"])["score"]
    published = {  # Table 2: (cmn Mean(Task), Mean(Type)), (eng Mean(Task), Mean(Type))
        "KaLM-embedding-mini-instruct-V2": ((68.15, 69.28), (67.47, 64.14)),
        "bge-multilingual-gemma2": ((67.64, 68.52), (69.88, 66.11)),
        "gte-Qwen2-1.5B-instruct": ((67.12, 67.83), (67.19, 64.44)),
        "e5-mistral-7b-instruct": ((59.92, 60.51), (66.46, 64.22)),
        "jina-embeddings-v3 (Multi-LoRA)": ((61.82, 61.61), (65.51, 62.76)),
        "bge-m3 (Dense)": ((60.34, 61.23), (59.84, 58.98)),
        "multilingual-e5-large": ((58.08, 58.24), (60.89, 59.48)),
    }
    for label, (cmn, eng) in published.items():
        for benchmark, (task, kind) in (("MTEB(cmn, v1)", cmn), ("MTEB(eng, v1)", eng)):
            assert table[(benchmark, label, MEAN_TASK)] == pytest.approx(task / 100)
            assert table[(benchmark, label, MEAN_TYPE)] == pytest.approx(kind / 100)
    assert set(paper["benchmark"]) == set(profile.evaluation.benchmarks)
    for name in profile.evaluation.benchmarks:
        types = {task.metadata.type for task in mteb.get_benchmark(name).tasks}
        assert set(paper[paper["benchmark"] == name]["aggregate"]) - {MEAN_TASK, MEAN_TYPE} == types


PAPER = """name: demo_paper
kind: reference
description: demo
source: a test
license: CC-BY-4.0
fields: [model]
paper_tables:
  benchmarks:
    demo:
      type_order: [Retrieval, STS]
      models:
        Paper model: {model: org/paper, mean_task: 50.0, mean_type: 60.0, types: [30.0, 90.0]}
"""


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("mean_type: 60.0", "mean_type: 61.0", r"mean_type 61.0 is not the mean of its types \(60.000\)"),
        ("mean_type: 60.0, types: [30.0, 90.0]}", "mean_type: 61.0, types: [30.0, 90.0], inconsistent: as printed}", None),
        ("types: [30.0, 90.0]", "types: [30.0]", "2 types must be percents"),
        ("mean_task: 50.0", "mean_task: 0.5e3", "must be percents"),
        ("type_order: [Retrieval, STS]", "order: x", "'type_order'"),
        ("model: org/paper, ", "", r"fields \['model'"),
    ],
)
def test_malformed_paper_table_names_the_row(tmp_path, old, new, message):
    path = write(tmp_path, PAPER.replace(old, new))
    if message is None:
        assert len(load_paper_tables(path)) == 4
        return
    with pytest.raises(DataCardError, match=message) as info:
        load_paper_tables(path)
    assert str(path) in str(info.value) and "paper_tables.benchmarks.demo" in str(info.value)


def write_result(folder: Path, task: str, score: float) -> None:
    TaskResult(dataset_revision="r", task_name=task, mteb_version=mteb.__version__, evaluation_time=1.0,
               scores={"test": [{"hf_subset": "default", "languages": ["eng-Latn"], "main_score": score}]},
               ).to_disk(folder / f"{task}.json")


def test_benchmark_means_are_mtebs_leaderboard_aggregates(tmp_path):
    """Two retrieval tasks and one STS task: Mean(Task) = (0.2 + 0.4 + 0.9) / 3 = 0.5, Mean(TaskType)
    = ((0.2 + 0.4) / 2 + 0.9) / 2 = 0.6; a model without every task gets NaN, not a partial mean;
    beside the paper, both aggregates of our model and the paper's models share one column each."""
    demo = mteb.Benchmark(name="demo", tasks=mteb.get_tasks(tasks=["SciFact", "NFCorpus", "STS12"]))
    full = tmp_path / "results" / "kalm-study__full" / "local"
    partial = tmp_path / "results" / "kalm-study__partial" / "local"
    for folder in (full, partial):
        folder.mkdir(parents=True)
    for task, score in (("SciFact", 0.2), ("NFCorpus", 0.4), ("STS12", 0.9)):
        write_result(full, task, score)
    write_result(partial, "SciFact", 0.3)

    means = benchmark_means(tmp_path, [demo])
    ours = means.set_index(["model", "aggregate"])["score"]
    assert ours[("kalm-study/full", MEAN_TASK)] == pytest.approx(0.5)
    assert ours[("kalm-study/full", MEAN_TYPE)] == pytest.approx(0.6)
    assert ours[("kalm-study/full", "Retrieval")] == pytest.approx(0.3)
    assert ours.loc["kalm-study/partial"].isna().all()

    table = beside_paper_tables(means, load_paper_tables(write(tmp_path, PAPER)))
    assert table.loc["kalm-study/full", ("demo", MEAN_TYPE)] == pytest.approx(0.6)
    assert table.loc["Paper model", ("demo", MEAN_TASK)] == pytest.approx(0.5)
    assert beside_paper_tables(means.assign(benchmark="other"), load_paper_tables(write(tmp_path, PAPER))).empty
