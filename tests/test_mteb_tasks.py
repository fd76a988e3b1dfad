"""Local mteb tasks and the mteb evaluation path, run offline on tiny hand-made task files: paired
draws, instructed and bare inputs, per-item scores, and notebook 05 / the soup's validation score."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import math
import random
import shutil
import socket
import zlib
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import mteb
import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset, DatasetDict
from huggingface_hub import ModelCard
from mteb import AbsTask, TaskResult
from mteb.mocks.mock_tasks.clustering import LegacyMockClusteringFastTask
from mteb.mocks.mock_tasks.pair_classification import MockPairClassificationTask
from mteb.mocks.mock_tasks.reranking import MockAggregatedTask
from mteb.mocks.mock_tasks.retrieval import MockRetrievalTask

from kalm_lib.bootstrap import cosine_average_precision, paired_comparisons, read_per_item
from kalm_lib.config import ConfigError, Profile, load_profile
from kalm_lib.encoder import Encoder, encoder_from_checkpoint, load_encoder
from kalm_lib.evaluation import (
    PER_ITEM_COLUMNS,
    TIDY_COLUMNS,
    KalmMtebModel,
    QuantizedEncoder,
    TruncatedEncoder,
    evaluate_model,
    load_results_folder,
    quantize_int8,
    tidy_results,
)
from kalm_lib.instructions import format_instructed
from kalm_lib.layout import MODEL_CARD, RunLayout
from kalm_lib.mteb_tasks import (
    LOCAL_TASKS,
    _union,
    build_local_tasks,
    check_standard_names,
    fresh_task,
    payload_revision,
    standard_tasks,
    task_instruction,
)
from kalm_lib.pipeline import run_evaluation, validation_score
from kalm_lib.runner import run_series

RETRIEVAL = "KalmDefinitionRetrieval"
PAIRS = "KalmSynonymAntonymPairClassification"
CLUSTERING = "KalmSynsetClustering"
FILES = {
    RETRIEVAL: "definition_retrieval.json",
    PAIRS: "synonym_antonym_pairs.json",
    CLUSTERING: "synset_clustering.json",
}
RETRIEVAL_INSTRUCTION = "Given a dictionary definition, retrieve the word it defines"
PAIR_INSTRUCTION = "Retrieve semantically similar words"
CLUSTER_INSTRUCTION = "Identify the synonym set of the word"

WORDS = ["cat", "dog", "oak", "rose", "salt", "iron", "rain", "wolf", "lake", "wheat"]
DEFINITIONS = [
    "a small domesticated feline",
    "a domesticated canine kept as a pet",
    "a large tree bearing acorns",
    "a thorny shrub with fragrant flowers",
    "a white crystalline seasoning",
    "a strong grey metal",
]
PAIR_LEFT = ["big", "happy", "fast", "cold", "begin", "rich", "loud", "bright"]
PAIR_RIGHT = ["large", "sad", "quick", "hot", "start", "poor", "noisy", "dim"]
PAIR_LABELS = [1, 0, 1, 0, 1, 0, 1, 0]
CLUSTERS = {
    "vehicle": ["car", "automobile", "motorcar", "auto"],
    "boat": ["ship", "boat", "vessel", "craft"],
    "dwelling": ["house", "home", "dwelling", "abode"],
}


def retrieval_payload() -> dict[str, Any]:
    return {
        "name": RETRIEVAL,
        "instruction": RETRIEVAL_INSTRUCTION,
        "queries": {f"q{i}": text for i, text in enumerate(DEFINITIONS)},
        "corpus": {f"d{i}": word for i, word in enumerate(WORDS)},
        "qrels": {f"q{i}": {f"d{i}": 1} for i in range(len(DEFINITIONS))},
    }


def pair_payload() -> dict[str, Any]:
    return {
        "name": PAIRS,
        "instruction": PAIR_INSTRUCTION,
        "sentence1": list(PAIR_LEFT),
        "sentence2": list(PAIR_RIGHT),
        "labels": list(PAIR_LABELS),
    }


def clustering_payload() -> dict[str, Any]:
    return {
        "name": CLUSTERING,
        "instruction": CLUSTER_INSTRUCTION,
        "sentences": [word for words in CLUSTERS.values() for word in words],
        "labels": [label for label, words in CLUSTERS.items() for _ in words],
    }


PAYLOADS: dict[str, Callable[[], dict[str, Any]]] = {
    RETRIEVAL: retrieval_payload,
    PAIRS: pair_payload,
    CLUSTERING: clustering_payload,
}


def write_payload(folder: Path, task: str, payload: Mapping[str, Any]) -> Path:
    path = folder / FILES[task]
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: evaluation must be fully offline."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def eval_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "eval"
    folder.mkdir()
    for task, make in PAYLOADS.items():
        write_payload(folder, task, make())
    return folder


# --- fake encoders -------------------------------------------------------------------------------


def bare_text(text: str) -> str:
    """The text without the KaLM instruction prefix."""
    return text.rsplit("\n Query: ", 1)[-1]


class HashedTrigramEncoder:
    """Deterministic bag of hashed character trigrams, L2-normalised."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            padded = f"  {text} "
            for start in range(len(padded) - 2):
                out[row, zlib.crc32(padded[start : start + 3].encode()) % self.dim] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


class LookupEncoder:
    """Embeds each (instruction-stripped) text by looking it up; unknown texts fail loudly."""

    def __init__(self, table: Mapping[str, np.ndarray]) -> None:
        self.table = table

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        rows = np.stack([self.table[bare_text(text)] for text in texts]).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


class RecordingEncoder(HashedTrigramEncoder):
    """Hashed encoder that remembers every text it was asked to embed."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        self.seen.update(texts)
        return super().encode(texts, batch_size)


DIM = 48


def unit(index: int) -> np.ndarray:
    vector = np.zeros(DIM, dtype=np.float32)
    vector[index] = 1.0
    return vector


def perfect_table(query_vector: Callable[[int], np.ndarray]) -> dict[str, np.ndarray]:
    """Doc i = e_i, query i = query_vector(i); synonym pairs share a vector, antonyms are orthogonal;
    each cluster has its own vector."""
    table = {word: unit(i) for i, word in enumerate(WORDS)}
    table |= {text: query_vector(i) for i, text in enumerate(DEFINITIONS)}
    for j, (left, right, label) in enumerate(zip(PAIR_LEFT, PAIR_RIGHT, PAIR_LABELS, strict=True)):
        table[left] = unit(10 + 2 * j)
        table[right] = unit(10 + 2 * j) if label == 1 else unit(11 + 2 * j)
    for c, words in enumerate(CLUSTERS.values()):
        table |= {word: unit(30 + c) for word in words}
    return table


def main_scores(frame: Any) -> dict[str, float]:
    mains = frame[frame["is_main"]]
    return dict(zip(mains["task"], mains["score"], strict=True))


def score(frame: Any, task: str, metric: str) -> float:
    rows = frame[(frame["task"] == task) & (frame["metric"] == metric)]
    assert len(rows) == 1, f"expected one {task}/{metric} row, got {len(rows)}"
    return float(rows["score"].iloc[0])


# --- building tasks ------------------------------------------------------------------------------


def test_build_local_tasks_binds_instruction_and_file_hash(eval_dir: Path) -> None:
    tasks = build_local_tasks(eval_dir)
    assert [t.metadata.name for t in tasks] == [RETRIEVAL, PAIRS, CLUSTERING]
    assert [t.metadata.type for t in tasks] == ["Retrieval", "PairClassification", "Clustering"]
    assert [t.metadata.main_score for t in tasks] == ["ndcg_at_10", "max_ap", "v_measure"]
    retrieval = tasks[0]
    assert retrieval.instruction == RETRIEVAL_INSTRUCTION
    assert retrieval.metadata.prompt == RETRIEVAL_INSTRUCTION
    assert task_instruction(retrieval.metadata) == RETRIEVAL_INSTRUCTION
    assert retrieval.metadata.revision == payload_revision(retrieval_payload())
    assert len(retrieval.metadata.revision) == 16
    assert payload_revision({**retrieval_payload(), "corpus": {"d0": "cat"}}) != retrieval.metadata.revision
    # the class-level metadata stays unbound
    assert LOCAL_TASKS[RETRIEVAL].metadata.prompt is None

    only = build_local_tasks(eval_dir, [CLUSTERING])
    assert [t.metadata.name for t in only] == [CLUSTERING]


def test_missing_folder_file_and_unknown_task_are_named(eval_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="evaluation folder not found"):
        build_local_tasks(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"unknown local task\(s\) \['KalmNope'\]"):
        build_local_tasks(eval_dir, ["KalmNope"])
    (eval_dir / FILES[CLUSTERING]).unlink()
    with pytest.raises(FileNotFoundError, match="synset_clustering.json"):
        build_local_tasks(eval_dir)
    assert [t.metadata.name for t in build_local_tasks(eval_dir, [RETRIEVAL, PAIRS])] == [RETRIEVAL, PAIRS]


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda payload: payload.pop(key)


def _set(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    return lambda payload: payload.__setitem__(key, value)


@pytest.mark.parametrize(
    ("task", "mutate", "message"),
    [
        (RETRIEVAL, _drop("qrels"), "definition_retrieval.json: missing field 'qrels'"),
        (RETRIEVAL, _set("qrels", {"q0": {"d99": 1}}), "unknown doc id 'd99'"),
        (RETRIEVAL, _set("qrels", {"q9": {"d0": 1}}), "unknown query id 'q9'"),
        (RETRIEVAL, _set("corpus", {"d0": ""}), "field 'corpus' has empty or non-string texts"),
        (RETRIEVAL, _set("instruction", " "), "field 'instruction' must be a non-empty string"),
        (RETRIEVAL, _set("name", "Wrong"), "field 'name' is 'Wrong', expected 'KalmDefinitionRetrieval'"),
        (PAIRS, _set("labels", [1, 0, 1, 0, 1, 0, 1, 2]), "field 'labels' must hold only 0 and 1"),
        (PAIRS, _set("labels", [1] * 8), "field 'labels' must contain both 0 and 1"),
        (PAIRS, _set("sentence2", PAIR_RIGHT[:7]), "field 'sentence2' has 7 items, expected 8"),
        (CLUSTERING, _set("sentences", ["car", "auto", "ship", 5] + ["x"] * 8), r"field 'sentences'\[3\] must be str"),
        (CLUSTERING, _set("labels", ["a"] * 12), "field 'labels' must name at least 2 clusters"),
        (CLUSTERING, _set("labels", [0] * 6 + ["b"] * 6), "field 'labels' mixes int/str items"),
    ],
)
def test_malformed_fields_are_named(
    eval_dir: Path, task: str, mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    payload = PAYLOADS[task]()
    mutate(payload)
    write_payload(eval_dir, task, payload)
    with pytest.raises(ValueError, match=message):
        build_local_tasks(eval_dir, [task])


def test_invalid_json_is_reported(eval_dir: Path) -> None:
    (eval_dir / FILES[PAIRS]).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="synonym_antonym_pairs.json: not valid JSON"):
        build_local_tasks(eval_dir, [PAIRS])


def test_standard_tasks_resolve_from_the_mteb_registry() -> None:
    tasks = standard_tasks(["SciFact", "SprintDuplicateQuestions"])
    assert [t.metadata.name for t in tasks] == ["SciFact", "SprintDuplicateQuestions"]
    # SciFact splits its prompt by side; the query side is the instruction
    assert task_instruction(tasks[0].metadata) == tasks[0].metadata.prompt["query"]
    assert len(standard_tasks(benchmarks=["MTEB(eng, v2)"])) == 41
    both = standard_tasks(["SciFact"], ["MTEB(eng, v1)", "MTEB(cmn, v1)"])
    names = [t.metadata.name for t in both]
    assert len(names) == len(set(names)) == 56 + 31  # SciFact is in MTEB(eng, v1): listed once
    assert names[0] == "SciFact"


def test_a_task_two_benchmarks_restrict_differently_is_evaluated_once_on_the_union() -> None:
    english = mteb.get_task("MassiveIntentClassification", hf_subsets=["en"])
    chinese = mteb.get_task("MassiveIntentClassification", hf_subsets=["zh-CN"])
    merged = _union(english, chinese)
    assert sorted(merged.hf_subsets) == ["en", "zh-CN"]
    assert _union(english, english) is english


# --- evaluation through mteb ---------------------------------------------------------------------


def test_evaluate_model_saves_mteb_results_and_returns_tidy_frame(eval_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mteb"
    frame = evaluate_model(HashedTrigramEncoder(), build_local_tasks(eval_dir), out, "hashed", batch_size=4).scores

    run_folder = out / "results" / "kalm-study__hashed" / "local"
    meta = json.loads((run_folder / "model_meta.json").read_text())
    assert meta["name"] == "kalm-study/hashed"
    assert meta["revision"] == "local"
    for task, filename in FILES.items():
        saved = TaskResult.from_disk(run_folder / f"{task}.json")
        assert saved.task_name == task
        assert saved.dataset_revision == payload_revision(json.loads((eval_dir / filename).read_text()))
        assert list(saved.scores) == ["test"]

    assert list(frame.columns) == TIDY_COLUMNS
    assert set(frame["model"]) == {"kalm-study/hashed"}
    assert set(frame["split"]) == {"test"} and set(frame["subset"]) == {"default"}
    mains = frame[frame["is_main"]]
    assert sorted(zip(mains["task"], mains["task_type"], mains["metric"], strict=True)) == [
        (RETRIEVAL, "Retrieval", "ndcg_at_10"),
        (PAIRS, "PairClassification", "max_ap"),
        (CLUSTERING, "Clustering", "v_measure"),
    ]
    assert mains["score"].between(0.0, 1.0).all()
    assert "main_score" not in set(frame["metric"])

    reloaded = load_results_folder(out)
    assert list(reloaded.columns) == TIDY_COLUMNS
    assert main_scores(reloaded) == pytest.approx(main_scores(frame), abs=1e-6)


def test_hand_checkable_scores_and_task_reuse(eval_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mteb"
    tasks = build_local_tasks(eval_dir)

    # query i points mostly at doc i+1 and partly at its own doc i: the positive is always ranked 2nd
    second = LookupEncoder(perfect_table(lambda i: 0.6 * unit(i) + 0.8 * unit(i + 1)))
    frame = evaluate_model(second, tasks[:1], out, "second-best").scores
    assert score(frame, RETRIEVAL, "ndcg_at_10") == pytest.approx(1 / math.log2(3), abs=1e-5)
    assert score(frame, RETRIEVAL, "mrr_at_10") == pytest.approx(0.5, abs=1e-6)
    assert score(frame, RETRIEVAL, "recall_at_1") == 0.0
    assert score(frame, RETRIEVAL, "recall_at_3") == 1.0

    # the same task objects evaluated again (mteb unloads data in between) with a perfect encoder
    perfect = LookupEncoder(perfect_table(unit))
    frame = evaluate_model(perfect, tasks, out, "perfect").scores
    assert main_scores(frame) == {RETRIEVAL: 1.0, PAIRS: 1.0, CLUSTERING: 1.0}
    assert tasks[0].metadata.prompt == RETRIEVAL_INSTRUCTION

    reloaded = load_results_folder(out)
    by_model = reloaded[reloaded["is_main"]].groupby("model")["task"].apply(set).to_dict()
    assert by_model == {"kalm-study/second-best": {RETRIEVAL}, "kalm-study/perfect": set(FILES)}


def test_overwrite_false_reuses_saved_results(eval_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mteb"
    tasks = build_local_tasks(eval_dir, [PAIRS])
    first = evaluate_model(HashedTrigramEncoder(), tasks, out, "resume").scores
    recorder = RecordingEncoder()
    again = evaluate_model(recorder, tasks, out, "resume", overwrite=False).scores
    assert recorder.seen == set()
    assert main_scores(again) == pytest.approx(main_scores(first), abs=1e-6)


def test_instruction_on_queries_only_for_retrieval_and_on_both_sides_for_pairs(eval_dir: Path, tmp_path: Path) -> None:
    recorder = RecordingEncoder()
    evaluate_model(recorder, build_local_tasks(eval_dir, [RETRIEVAL]), tmp_path / "a", "rec")
    queries = {f"Instruct: {RETRIEVAL_INSTRUCTION} \n Query: {text}" for text in DEFINITIONS}
    assert recorder.seen == queries | set(WORDS)

    recorder = RecordingEncoder()
    evaluate_model(recorder, build_local_tasks(eval_dir, [PAIRS]), tmp_path / "b", "rec")
    assert recorder.seen == {f"Instruct: {PAIR_INSTRUCTION} \n Query: {w}" for w in PAIR_LEFT + PAIR_RIGHT}

    recorder = RecordingEncoder()
    override = {CLUSTERING: "Group words"}
    evaluate_model(recorder, build_local_tasks(eval_dir, [CLUSTERING]), tmp_path / "c", "rec", instructions=override)
    assert recorder.seen == {format_instructed("Group words", w) for w in clustering_payload()["sentences"]}


def test_tidy_results_for_a_task_no_registry_knows() -> None:
    result = TaskResult(
        dataset_revision="r1",
        task_name="MysteryTask",
        mteb_version="2.26.24",
        scores={"test": [{"hf_subset": "default", "languages": ["eng-Latn"], "main_score": 0.25, "acc": 0.75}]},
        evaluation_time=1.0,
    )
    frame = tidy_results([result], "org/model")
    rows = sorted(zip(frame["metric"], frame["score"], frame["is_main"], frame["task_type"], strict=True))
    assert rows == [("acc", 0.75, False, "unknown"), ("main_score", 0.25, True, "unknown")]


def test_wrapper_implements_the_mteb_encoder_protocol() -> None:
    model = KalmMtebModel(HashedTrigramEncoder(), "org/name", revision="abc123")
    assert isinstance(model, mteb.EncoderProtocol)
    assert model.mteb_model_meta.name == "org/name"
    assert model.mteb_model_meta.revision == "abc123"
    assert format_instructed("", "plain") == "plain"


# --- compressed embeddings -----------------------------------------------------------------------


@pytest.fixture
def texts() -> list[str]:
    return [f"word number {i}" for i in range(20)]


def test_truncated_encoder_keeps_the_normalised_prefix(texts: list[str]) -> None:
    base = HashedTrigramEncoder(dim=64)
    full = base.encode(texts, batch_size=8)
    short = TruncatedEncoder(base, 16).encode(texts, batch_size=8)
    assert short.shape == (20, 16) and short.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-6)
    prefix = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(short, prefix, atol=1e-6)
    with pytest.raises(ValueError, match="cannot truncate 64-dim embeddings to 65"):
        TruncatedEncoder(base, 65).encode(texts, batch_size=8)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        TruncatedEncoder(base, 0)


def test_int8_quantisation(texts: list[str]) -> None:
    base = HashedTrigramEncoder(dim=64)
    full = base.encode(texts, batch_size=8)
    codes, scale = quantize_int8(full)
    assert codes.dtype == np.int8 and codes.shape == (20, 64)
    assert scale.dtype == np.float32 and scale.shape == (64,)
    assert np.abs(codes).max() == 127
    quantised = QuantizedEncoder(base, "int8").encode(texts, batch_size=8)
    assert quantised.shape == (20, 64) and quantised.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(quantised, axis=1), 1.0, atol=1e-6)
    # each value moves by at most half a quantisation step before re-normalisation
    assert np.all(np.abs(codes * scale - full) <= scale / 2 + 1e-7)
    assert np.min(np.sum(quantised * full, axis=1)) > 0.999


def test_binary_quantisation(texts: list[str]) -> None:
    base = HashedTrigramEncoder(dim=64)
    full = base.encode(texts, batch_size=8)
    binary = QuantizedEncoder(base, "binary").encode(texts, batch_size=8)
    assert binary.shape == (20, 64) and binary.dtype == np.float32
    np.testing.assert_allclose(np.abs(binary), 1 / 8, atol=1e-7)  # +-1 / sqrt(64)
    assert np.array_equal(binary > 0, full >= 0)
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        QuantizedEncoder(base, "int4")  # type: ignore[arg-type]


# --- paired evaluation: every model sees the same random draws ---------------------------------


def differing_scores(frame: Any, reference: Any) -> dict[tuple[str, str], tuple[float, float]]:
    """(task, metric) -> (score, reference score) wherever two tidy frames disagree (NaN equals NaN)."""
    merged = frame.merge(reference, on=["task", "metric"], how="outer", suffixes=("", "_ref"))
    same = (merged["score"] == merged["score_ref"]) | (merged["score"].isna() & merged["score_ref"].isna())
    return {(r.task, r.metric): (r.score, r.score_ref) for r in merged[~same].itertuples()}


class SubsampledMockClustering(LegacyMockClusteringFastTask):
    """mteb's in-memory fast-clustering mock on words whose clusters hashed trigrams get partly
    wrong, so its random draws (a subsample to embed, then bootstrap sets) change the scores."""

    max_document_to_embed = 10
    max_documents_per_cluster = 8
    n_clusters = 5

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        payload = clustering_payload()
        columns = {"sentences": payload["sentences"], "labels": payload["labels"]}
        self.dataset = DatasetDict({"test": Dataset.from_dict(columns)})
        self.data_loaded = True


def standard_mock_tasks() -> list[AbsTask]:
    """Task classes built like mteb's own (mteb's mocks: in memory, no hub): clustering that
    subsamples and bootstraps with the task's random state, retrieval with two splits, pairs, and an
    aggregate of retrieval and reranking."""
    return [SubsampledMockClustering(), MockRetrievalTask(), MockPairClassificationTask(), MockAggregatedTask()]


@pytest.mark.parametrize("kind", ["local", "standard"])
def test_identical_weights_score_identically_whatever_ran_before(kind: str, eval_dir: Path, tmp_path: Path) -> None:
    """The same task objects serve every model (as in run_evaluation): random draws (clustering's
    bootstrap) must not depend on which models were evaluated before, nor on how often."""
    tasks = build_local_tasks(eval_dir) if kind == "local" else standard_mock_tasks()
    first = evaluate_model(HashedTrigramEncoder(), tasks, tmp_path / "a", "same").scores
    again = evaluate_model(HashedTrigramEncoder(), tasks, tmp_path / "b", "same").scores
    evaluate_model(HashedTrigramEncoder(dim=32), tasks, tmp_path / "c", "other")
    after_other = evaluate_model(HashedTrigramEncoder(), tasks, tmp_path / "d", "same").scores
    assert set(first["task"]) == {task.metadata.name for task in tasks}
    assert differing_scores(again, first) == {}
    assert differing_scores(after_other, first) == {}


def test_uninstructed_model_sees_only_bare_texts(eval_dir: Path, tmp_path: Path) -> None:
    recorder = RecordingEncoder()
    evaluate_model(recorder, build_local_tasks(eval_dir), tmp_path / "bare", "bare", instructed=False)
    bare = set(DEFINITIONS) | set(WORDS) | set(PAIR_LEFT + PAIR_RIGHT) | set(clustering_payload()["sentences"])
    assert recorder.seen == bare
    assert not any("Instruct:" in text for text in recorder.seen)
    assert KalmMtebModel(recorder, "bare", instructed=False).mteb_model_meta.use_instructions is False


def assert_newly_seeded(task: AbsTask) -> None:
    """``task`` draws what ``AbsTask.__init__`` gives a new task (mteb's ``_set_seed`` generators)."""
    assert task.rng_state.getstate() == random.Random(task.seed).getstate()
    assert task.np_rng.bit_generator.state == np.random.default_rng(task.seed).bit_generator.state


@pytest.mark.parametrize("name", ["TwentyNewsgroupsClustering.v2", "CQADupstackRetrieval"])
def test_fresh_task_draws_like_a_newly_constructed_registry_task(name: str) -> None:
    """A registry task (an aggregate too) whose generators were advanced: its fresh copy draws what a
    newly constructed task draws, and the original keeps its own state (nothing is shared)."""
    assert_newly_seeded(mteb.get_task(name))
    used = mteb.get_task(name)
    used_parts = [used, *getattr(used.metadata, "tasks", [])]
    for task in used_parts:
        task.rng_state.random()
        task.np_rng.random()
    advanced = [task.rng_state.getstate() for task in used_parts]
    copied = fresh_task(used)
    copied_parts = [copied, *getattr(copied.metadata, "tasks", [])]
    assert len(copied_parts) == len(used_parts)
    for task in copied_parts:
        assert_newly_seeded(task)
    assert [task.rng_state.getstate() for task in used_parts] == advanced
    assert not {id(task) for task in copied_parts} & {id(task) for task in used_parts}


# --- per-item scores (paired bootstrap input) -------------------------------------------------------


def main_rows(frame: Any, task: str, metric: str) -> dict[str, float]:
    """split -> score of ``metric`` for ``task`` (subset default)."""
    rows = frame[(frame["task"] == task) & (frame["metric"] == metric)]
    return dict(zip(rows["split"], rows["score"], strict=True))


def test_per_item_ndcg_averages_to_mteb_ndcg_at_10(eval_dir: Path, tmp_path: Path) -> None:
    """Per-query nDCG@10 (mteb's own scorer on mteb's saved ranking) averages to mteb's ndcg_at_10,
    which mteb rounds to 5 decimals; on the local task and on an mteb task with two splits."""
    tasks = [*build_local_tasks(eval_dir), MockRetrievalTask()]
    result = evaluate_model(HashedTrigramEncoder(), tasks, tmp_path / "m", "hashed", per_item=True)
    items = result.per_item
    assert list(items.columns) == PER_ITEM_COLUMNS
    assert set(items["task"]) == {RETRIEVAL, PAIRS, "MockRetrievalTask"}  # clustering has no items
    assert set(items["model"]) == {"kalm-study/hashed"}
    retrieval = items[items["ndcg_at_10"].notna()]
    assert sorted(retrieval.loc[retrieval["task"] == RETRIEVAL, "item"]) == [f"q{i}" for i in range(len(DEFINITIONS))]
    checked = 0
    for (task, split), group in retrieval.groupby(["task", "split"]):
        mteb_ndcg = main_rows(result.scores, task, "ndcg_at_10")[split]
        assert group["ndcg_at_10"].mean() == pytest.approx(mteb_ndcg, abs=5e-6)
        assert round(group["ndcg_at_10"].mean(), 5) == mteb_ndcg
        checked += 1
    assert checked == 3  # local test split, mock val and test splits


def test_per_item_ndcg_follows_mteb_tie_breaking(eval_dir: Path, tmp_path: Path) -> None:
    """Query i is exactly as close to doc i (relevant) as to doc i+1: pytrec_eval (mteb's scorer)
    breaks the tie by doc id, descending, so d{i+1} comes first and each query scores 1 / log2(3)."""
    tied = LookupEncoder(perfect_table(lambda i: unit(i) + unit(i + 1)))
    result = evaluate_model(tied, build_local_tasks(eval_dir, [RETRIEVAL]), tmp_path / "t", "tied", per_item=True)
    per_query = result.per_item["ndcg_at_10"].to_numpy()
    np.testing.assert_allclose(per_query, 1 / math.log2(3), rtol=1e-12)
    assert score(result.scores, RETRIEVAL, "ndcg_at_10") == pytest.approx(per_query.mean(), abs=5e-6)


def test_per_item_pairs_give_mteb_cosine_average_precision(eval_dir: Path, tmp_path: Path) -> None:
    """Per pair: the cosine mteb computed and the label. Their AP is mteb's cosine_ap; on unit vectors
    dot, model similarity (cosine) and euclidean rank alike, so their APs agree; mteb's max_ap also
    takes manhattan, which ranks differently, so max_ap = max(cosine_ap, manhattan_ap)."""
    encoder = HashedTrigramEncoder()
    tasks = [*build_local_tasks(eval_dir, [PAIRS]), MockPairClassificationTask()]
    result = evaluate_model(encoder, tasks, tmp_path / "p", "hashed", per_item=True)
    local = result.per_item[result.per_item["task"] == PAIRS]
    assert local["item"].tolist() == [str(i) for i in range(len(PAIR_LEFT))]
    assert local["label"].tolist() == PAIR_LABELS
    left = encoder.encode([format_instructed(PAIR_INSTRUCTION, w) for w in PAIR_LEFT], batch_size=8)
    right = encoder.encode([format_instructed(PAIR_INSTRUCTION, w) for w in PAIR_RIGHT], batch_size=8)
    np.testing.assert_allclose(local["cosine"].to_numpy(), np.sum(left * right, axis=1), atol=1e-6)
    for task, group in result.per_item.groupby("task"):
        ap = cosine_average_precision(group[["cosine", "label"]].to_numpy(dtype=float))
        metrics = {metric: score(result.scores, task, metric) for metric in
                   ("cosine_ap", "dot_ap", "similarity_ap", "euclidean_ap", "manhattan_ap", "max_ap")}
        assert ap == pytest.approx(metrics["cosine_ap"], abs=1e-12)
        assert metrics["dot_ap"] == metrics["similarity_ap"] == metrics["euclidean_ap"] == pytest.approx(ap, abs=1e-12)
        assert metrics["max_ap"] == max(metrics["cosine_ap"], metrics["manhattan_ap"])


def test_per_item_needs_a_fresh_evaluation(eval_dir: Path, tmp_path: Path) -> None:
    tasks = build_local_tasks(eval_dir, [PAIRS])
    assert evaluate_model(HashedTrigramEncoder(), tasks, tmp_path / "x", "plain").per_item.empty
    with pytest.raises(ValueError, match="per-item scores need overwrite=True"):
        evaluate_model(HashedTrigramEncoder(), tasks, tmp_path / "x", "plain", overwrite=False, per_item=True)


# --- notebook 05 and the soup's validation score: paired, base also without instructions ----------


@pytest.fixture
def hand_built_run(eval_dir: Path, tmp_path: Path) -> tuple[Profile, Path]:
    """A tiny-profile run folder made by hand: the test payloads as test and validation split, a
    stage-1 checkpoint and three bit-identical later checkpoints (two seeds and a soup)."""
    profile = load_profile("tiny", {"evaluation.matryoshka_dims": [], "evaluation.quantizations": [],
                                    "soup.methods": ["uniform"], "soup.selection_task": CLUSTERING})
    layout = RunLayout(tmp_path / "run")
    for split in ("test", "validation"):
        shutil.copytree(eval_dir, layout.eval_payloads(split))
    torch.manual_seed(0)
    load_encoder(profile.model).save(layout.stage1.final)
    torch.manual_seed(1)
    tuned = load_encoder(profile.model)
    for folder in (layout.stage2(0).final, layout.stage2(1).final, layout.soup("uniform")):
        tuned.save(folder)
    return profile, layout.root


TWINS = ["stage2_seed0", "stage2_seed1", "soup_uniform"]


def test_run_evaluation_scores_identical_weights_identically(hand_built_run: tuple[Profile, Path]) -> None:
    profile, run = hand_built_run
    scores = run_evaluation(profile, run)
    by_stage = dict(list(scores.groupby("stage", sort=False)))
    assert set(by_stage[TWINS[0]]["task"]) == set(FILES)
    for twin in TWINS[1:]:
        assert differing_scores(by_stage[twin], by_stage[TWINS[0]]) == {}, twin
    assert list(by_stage) == ["base", "base_no_instruction", "stage1", *TWINS]
    assert differing_scores(by_stage["base_no_instruction"], by_stage["base"])  # the prefix changes the texts

    items = read_per_item(run)
    assert list(dict.fromkeys(items["model"])) == list(by_stage)
    twins = [items[items["model"] == twin].drop(columns="model").reset_index(drop=True) for twin in TWINS]
    for twin in twins[1:]:
        pd.testing.assert_frame_equal(twin, twins[0])
    table = paired_comparisons(run, pairs=[(TWINS[0], TWINS[2]), ("base", "base_no_instruction")], n_resamples=50)
    assert set(table["task"]) == {RETRIEVAL, PAIRS}
    soup_vs_seed = table[table["model_b"] == TWINS[2]]
    assert (soup_vs_seed[["delta", "ci_low", "ci_high"]] == 0.0).all().all()
    assert (table["n_items"] == table["task"].map({RETRIEVAL: len(DEFINITIONS), PAIRS: len(PAIR_LEFT)})).all()
    card = ModelCard.load(RunLayout(run).soup("uniform") / MODEL_CARD)  # the final model's card
    main = by_stage[TWINS[2]][by_stage[TWINS[2]]["is_main"]]
    assert {r.dataset_name: r.metric_value for r in card.data.eval_results} == dict(zip(main["task"], main["score"]))


def test_compressed_forms_of_the_final_model_reuse_its_embeddings(hand_built_run: tuple[Profile, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Matryoshka and quantised scores of the final model, and Matryoshka scores of each single
    stage-2 checkpoint, equal evaluating those encoders on their own, and cost no encoding beyond
    the full-precision pass (each task is encoded once per model)."""
    profile, run = hand_built_run
    encoded: list[int] = []
    real_encode = Encoder.encode
    monkeypatch.setattr(Encoder, "encode", lambda self, texts, *a, **k: encoded.append(len(texts)) or real_encode(self, texts, *a, **k))
    run_evaluation(profile, run)
    plain = sum(encoded)
    encoded.clear()
    compressed = replace(profile, evaluation=replace(profile.evaluation, matryoshka_dims=[16], quantizations=["int8", "binary"]))
    scores = run_evaluation(compressed, run)
    assert sum(encoded) == plain  # no task encoded again for @dim16, @int8, @binary
    final = encoder_from_checkpoint(RunLayout(run).soup("uniform"), profile.model)
    single = encoder_from_checkpoint(RunLayout(run).stage2(1).final, profile.model)
    tasks = build_local_tasks(RunLayout(run).eval_payloads("test"), profile.evaluation.local_tasks)
    assert {s for s in scores["stage"] if "@" in s} == {"soup_uniform@dim16", "soup_uniform@int8", "soup_uniform@binary",
                                                         "stage2_seed0@dim16", "stage2_seed1@dim16"}
    for label, alone in {"soup_uniform@dim16": TruncatedEncoder(final, 16), "soup_uniform@int8": QuantizedEncoder(final, "int8"),
                         "soup_uniform@binary": QuantizedEncoder(final, "binary"),
                         "stage2_seed1@dim16": TruncatedEncoder(single, 16)}.items():
        direct = evaluate_model(alone, tasks, run / "direct", f"direct-{label}", profile.evaluation.batch_size)
        assert differing_scores(scores[scores["stage"] == label], direct.scores) == {}, label


def test_validation_score_is_paired(hand_built_run: tuple[Profile, Path]) -> None:
    """The soup's selection score (here the clustering task) does not depend on what was scored before."""
    profile, run = hand_built_run
    layout = RunLayout(run)
    tuned = encoder_from_checkpoint(layout.stage2(0).final, profile.model)
    other = encoder_from_checkpoint(layout.stage1.final, profile.model)
    first = validation_score(tuned, profile, run, "candidate")
    validation_score(other, profile, run, "candidate")
    assert validation_score(tuned, profile, run, "candidate") == first


def test_unknown_standard_names_stop_before_any_work(tmp_path: Path) -> None:
    check_standard_names(["SciFact"], ["MTEB(eng, v1)", "MTEB(cmn, v1)"])
    with pytest.raises(ConfigError, match=r"evaluation.standard_tasks: 'NoSuchTask' is not an mteb name"):
        check_standard_names(["NoSuchTask"], [])
    with pytest.raises(ConfigError, match=r"evaluation.benchmarks: 'MTEB\(nope\)' is not an mteb name"):
        run_series("tiny", tmp_path, "r", {"evaluation.benchmarks": ["MTEB(nope)"]})
    assert not any(tmp_path.iterdir())
