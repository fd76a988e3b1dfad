"""MTEB tasks: the held-out local tasks read from curated JSON files, and standard mteb tasks.

The local tasks are real mteb 2.x task classes. Each instance is bound to an evaluation folder
written by the curation step and reads its JSON file there (never the hub). On binding/loading,
the instance's metadata gets the file's instruction as ``prompt`` and a hash of its content as the
dataset revision, so result files record exactly which curated data they were computed on.

A task carries its own random state (clustering's subsample and bootstrap draws), so every model is
evaluated on a :func:`fresh_task` copy: all models see the same draws.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import mteb
import numpy as np
from datasets import Dataset, DatasetDict
from mteb import AbsTask, TaskMetadata
from mteb.abstasks import AbsTaskClustering, AbsTaskPairClassification, AbsTaskRetrieval
from mteb.abstasks.abstask import get_abstask_prompt
from mteb.abstasks.aggregated_task import AbsTaskAggregate
from mteb.timing import TimingStack

from .config import ConfigError, EvalConfig
from .layout import REPO_ROOT

GCIDE_REFERENCE = "https://gcide.gnu.org.ua/"
OEWN_REFERENCE = "https://en-word.net/"
DEFAULT_BENCHMARK = "MTEB(eng, v2)"


# --- reading and checking the curated JSON files -----------------------------------------------


def read_eval_file(path: Path) -> dict[str, Any]:
    """The JSON object stored in ``path``; FileNotFoundError / ValueError name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"evaluation file not found: {path}")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: top level must be a JSON object, got {type(payload).__name__}")
    return payload


def _field(payload: Mapping[str, Any], path: Path, key: str) -> Any:
    """``payload[key]``, or a ValueError naming the file and the missing field."""
    if key not in payload:
        raise ValueError(f"{path.name}: missing field '{key}'")
    return payload[key]


def _text(payload: Mapping[str, Any], path: Path, key: str) -> str:
    """A non-empty string field."""
    value = _field(payload, path, key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path.name}: field '{key}' must be a non-empty string")
    return value


def _text_map(payload: Mapping[str, Any], path: Path, key: str) -> dict[str, str]:
    """A non-empty {id: non-empty text} object."""
    value = _field(payload, path, key)
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{path.name}: field '{key}' must be a non-empty object of id -> text")
    bad = [k for k, v in value.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ValueError(f"{path.name}: field '{key}' has empty or non-string texts for ids {bad[:5]}")
    return value


def _list(payload: Mapping[str, Any], path: Path, key: str, kinds: tuple[type, ...], length: int | None) -> list[Any]:
    """A non-empty list whose items are all of one of ``kinds`` (bools rejected), of ``length`` if given."""
    value = _field(payload, path, key)
    if not isinstance(value, list) or not value:
        raise ValueError(f"{path.name}: field '{key}' must be a non-empty list")
    names = "/".join(kind.__name__ for kind in kinds)
    for index, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, kinds):
            raise ValueError(f"{path.name}: field '{key}'[{index}] must be {names}, got {item!r}")
    if len({type(item) for item in value}) > 1:
        raise ValueError(f"{path.name}: field '{key}' mixes {names} items")
    if length is not None and len(value) != length:
        raise ValueError(f"{path.name}: field '{key}' has {len(value)} items, expected {length}")
    return value


def _qrels(
    payload: Mapping[str, Any], path: Path, queries: Mapping[str, str], corpus: Mapping[str, str]
) -> dict[str, dict[str, int]]:
    """{query id: {doc id: relevance >= 0}} referring only to known queries and documents."""
    value = _field(payload, path, "qrels")
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{path.name}: field 'qrels' must be a non-empty object of query id -> {{doc id: relevance}}")
    for qid, docs in value.items():
        if qid not in queries:
            raise ValueError(f"{path.name}: field 'qrels' names unknown query id {qid!r}")
        if not isinstance(docs, dict) or not docs:
            raise ValueError(f"{path.name}: field 'qrels'[{qid!r}] must be a non-empty object of doc id -> relevance")
        for doc_id, score in docs.items():
            if doc_id not in corpus:
                raise ValueError(f"{path.name}: field 'qrels'[{qid!r}] names unknown doc id {doc_id!r}")
            if isinstance(score, bool) or not isinstance(score, int) or score < 0:
                raise ValueError(f"{path.name}: field 'qrels'[{qid!r}][{doc_id!r}] must be an int >= 0, got {score!r}")
    return value


def _binary_labels(payload: Mapping[str, Any], path: Path, length: int) -> list[int]:
    """0/1 labels with both classes present."""
    labels = _list(payload, path, "labels", (int,), length)
    if not set(labels) <= {0, 1}:
        raise ValueError(f"{path.name}: field 'labels' must hold only 0 and 1, got {sorted(set(labels))}")
    if set(labels) != {0, 1}:
        raise ValueError(f"{path.name}: field 'labels' must contain both 0 and 1")
    return labels


def payload_revision(payload: Mapping[str, Any]) -> str:
    """Short hash of a payload's canonical JSON, recorded as the task's dataset revision."""
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# --- local task classes ------------------------------------------------------------------------


def _local_metadata(filename: str, **fields: Any) -> TaskMetadata:
    """TaskMetadata for a local task: the fields every local task shares plus ``fields``."""
    shared = {
        "dataset": {"path": filename, "revision": "local"},
        "modalities": ["text"],
        "eval_splits": ["test"],
        "eval_langs": ["eng-Latn"],
        "domains": ["Written", "Non-fiction"],
        "annotations_creators": "derived",
        "dialect": [],
        "sample_creation": "found",
        "bibtex_citation": "",
    }
    return TaskMetadata(**shared, **fields)


class LocalEvalTask(AbsTask):
    """Base for tasks bound to a folder of curated JSON files (``filename`` inside ``eval_dir``)."""

    filename: ClassVar[str]

    def __init__(self, eval_dir: Path | str, seed: int = 42) -> None:
        self.eval_dir = Path(eval_dir)
        self._bind(self._read())
        super().__init__(seed=seed)

    @property
    def path(self) -> Path:
        """The JSON file this task reads."""
        return self.eval_dir / self.filename

    def load_data(self, num_proc: int | None = None, *, timer: TimingStack | None = None, **kwargs: Any) -> None:
        """Read the JSON file (fully offline) into the dataset layout the mteb base class expects."""
        if self.data_loaded:
            return
        payload = self._read()
        self._bind(payload)
        self.dataset = self._to_dataset(payload)
        self.data_loaded = True

    def unload_data(self) -> None:
        """Drop the data but keep the folder-bound metadata (mteb's unload resets instance metadata)."""
        metadata = self.metadata
        super().unload_data()
        self.metadata = metadata

    def _read(self) -> dict[str, Any]:
        """The checked payload of this task's file."""
        payload = read_eval_file(self.path)
        name = payload.get("name", self.metadata.name)
        if name != self.metadata.name:
            raise ValueError(f"{self.path.name}: field 'name' is {name!r}, expected {self.metadata.name!r}")
        _text(payload, self.path, "instruction")
        self._check(payload)
        return payload

    def _bind(self, payload: Mapping[str, Any]) -> None:
        """Instance metadata carrying the file's instruction (as prompt) and content hash (as revision)."""
        self.instruction: str = payload["instruction"]
        self.metadata = type(self).metadata.model_copy(
            update={
                "prompt": self.instruction,
                "dataset": {"path": str(self.path), "revision": payload_revision(payload)},
            }
        )

    @abstractmethod
    def _check(self, payload: Mapping[str, Any]) -> None:
        """Raise ValueError naming the first malformed task-specific field."""

    @abstractmethod
    def _to_dataset(self, payload: Mapping[str, Any]) -> Any:
        """The task's data in the layout its mteb base class evaluates."""


class KalmDefinitionRetrieval(LocalEvalTask, AbsTaskRetrieval):
    """Dictionary definition -> the held-out headword it defines."""

    filename = "definition_retrieval.json"
    metadata = _local_metadata(
        "definition_retrieval.json",
        name="KalmDefinitionRetrieval",
        description=(
            "Retrieve the headword defined by a GCIDE dictionary definition, from a corpus of words "
            "held out of kalm-study training data."
        ),
        reference=GCIDE_REFERENCE,
        type="Retrieval",
        category="t2t",
        main_score="ndcg_at_10",
        date=("1913-01-01", "2024-12-31"),
        task_subtypes=[],
        license="gpl-3.0",
    )

    def _check(self, payload: Mapping[str, Any]) -> None:
        queries = _text_map(payload, self.path, "queries")
        corpus = _text_map(payload, self.path, "corpus")
        _qrels(payload, self.path, queries, corpus)

    def _to_dataset(self, payload: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        queries: dict[str, str] = payload["queries"]
        corpus: dict[str, str] = payload["corpus"]
        split = {
            "queries": Dataset.from_dict({"id": list(queries), "text": list(queries.values())}),
            "corpus": Dataset.from_dict({"id": list(corpus), "text": list(corpus.values())}),
            "relevant_docs": {qid: dict(docs) for qid, docs in payload["qrels"].items()},
            "top_ranked": None,
        }
        return {"default": {"test": split}}


class KalmSynonymAntonymPairClassification(LocalEvalTask, AbsTaskPairClassification):
    """Word pairs labelled 1 (synonyms) or 0 (antonyms)."""

    filename = "synonym_antonym_pairs.json"
    metadata = _local_metadata(
        "synonym_antonym_pairs.json",
        name="KalmSynonymAntonymPairClassification",
        description=(
            "Tell synonym pairs (label 1) from antonym pairs (label 0) among Open English WordNet words "
            "held out of kalm-study training data."
        ),
        reference=OEWN_REFERENCE,
        type="PairClassification",
        category="t2t",
        main_score="max_ap",
        date=("2019-01-01", "2024-12-31"),
        task_subtypes=[],
        license="cc-by-4.0",
    )

    def _check(self, payload: Mapping[str, Any]) -> None:
        first = _list(payload, self.path, "sentence1", (str,), None)
        _list(payload, self.path, "sentence2", (str,), len(first))
        _binary_labels(payload, self.path, len(first))

    def _to_dataset(self, payload: Mapping[str, Any]) -> DatasetDict:
        columns = {key: list(payload[key]) for key in ("sentence1", "sentence2", "labels")}
        return DatasetDict({"test": Dataset.from_dict(columns)})


class KalmSynsetClustering(LocalEvalTask, AbsTaskClustering):
    """Held-out words clustered by WordNet synonym set.

    Every sentence is embedded (no subsampling); each of mteb's bootstrap draws (with replacement,
    ``max_documents_per_cluster`` items) is larger than the set, so every cluster takes part.
    """

    filename = "synset_clustering.json"
    max_fraction_of_documents_to_embed = None
    metadata = _local_metadata(
        "synset_clustering.json",
        name="KalmSynsetClustering",
        description=(
            "Cluster Open English WordNet words held out of kalm-study training data by synonym set "
            "(each cluster is a word and several of its synonyms)."
        ),
        reference=OEWN_REFERENCE,
        type="Clustering",
        category="t2c",
        main_score="v_measure",
        date=("2019-01-01", "2024-12-31"),
        task_subtypes=["Thematic clustering"],
        license="cc-by-4.0",
    )

    def _check(self, payload: Mapping[str, Any]) -> None:
        sentences = _list(payload, self.path, "sentences", (str,), None)
        labels = _list(payload, self.path, "labels", (int, str), len(sentences))
        if len(set(labels)) < 2:
            raise ValueError(f"{self.path.name}: field 'labels' must name at least 2 clusters")

    def _to_dataset(self, payload: Mapping[str, Any]) -> DatasetDict:
        columns = {"sentences": list(payload["sentences"]), "labels": list(payload["labels"])}
        return DatasetDict({"test": Dataset.from_dict(columns)})


LOCAL_TASKS: Mapping[str, type[LocalEvalTask]] = MappingProxyType(
    {
        cls.metadata.name: cls
        for cls in (KalmDefinitionRetrieval, KalmSynonymAntonymPairClassification, KalmSynsetClustering)
    }
)


# --- building task lists -----------------------------------------------------------------------


def build_local_tasks(eval_dir: Path, names: Sequence[str] | None = None) -> list[AbsTask]:
    """Local tasks bound to ``eval_dir`` (all of them when ``names`` is None), files checked now.
    No names, no tasks: a run whose cards define no evaluation sets (the paper's hub cards) has no
    ``eval_dir``, and asking for none of its tasks is not an error."""
    if names is not None and not names:
        return []
    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        raise FileNotFoundError(f"evaluation folder not found: {eval_dir}")
    wanted = list(LOCAL_TASKS) if names is None else list(names)
    unknown = [name for name in wanted if name not in LOCAL_TASKS]
    if unknown:
        raise ValueError(f"unknown local task(s) {unknown}; known: {sorted(LOCAL_TASKS)}")
    return [LOCAL_TASKS[name](eval_dir) for name in wanted]


def standard_tasks(names: Sequence[str] = (), benchmarks: Sequence[str] = (), data_dir: Path | None = None) -> list[AbsTask]:
    """Standard mteb tasks (need hub access to load): the named tasks, then every task of the named
    benchmarks, each task once. A task that two benchmarks restrict differently (other subsets or
    splits) is evaluated once on the union, and each benchmark's aggregate reads its own part.

    With ``data_dir`` every task reads its dataset from a local copy there (:func:`with_local_data`)."""
    tasks: dict[str, AbsTask] = {task.metadata.name: task for task in mteb.get_tasks(tasks=list(names))} if names else {}
    for benchmark in benchmarks:
        for task in mteb.get_benchmark(benchmark).tasks:
            name = task.metadata.name
            tasks[name] = task if name not in tasks else _union(tasks[name], task)
    return [with_local_data(task, data_dir) for task in tasks.values()] if data_dir is not None else list(tasks.values())


def local_copy_folder(data_dir: Path, hub_path: str) -> Path:
    """Folder of the local copy of hub dataset ``hub_path`` in ``data_dir``: ``org/name`` -> ``org__name``."""
    return Path(data_dir) / hub_path.replace("/", "__")


def with_local_data(task: AbsTask, data_dir: Path) -> AbsTask:
    """``task`` with its dataset ``path`` pointed at the local copy of its hub dataset
    (:func:`local_copy_folder`), a folder laid out like the hub repository (same files, and a
    ``README.md`` declaring the same ``configs``). Nothing else changes: mteb's own loader reads
    it through ``datasets`` (config and split discovery, ``load_dataset``) exactly as it reads the
    hub; only the revision is not checked (a local folder has none). An aggregate task is refused
    (its sub-tasks live in class-level metadata).

    Raises:
        FileNotFoundError: naming the task and the folder, if the copy is missing.
        ValueError: for an aggregate task.
    """
    if isinstance(task, AbsTaskAggregate):
        raise ValueError(f"{task.metadata.name}: aggregate tasks cannot read local copies; name its sub-tasks instead")
    folder = local_copy_folder(data_dir, task.metadata.dataset["path"])
    if not folder.is_dir():
        raise FileNotFoundError(f"{task.metadata.name}: no local copy of hub dataset {task.metadata.dataset['path']!r}: {folder}")
    task.metadata = task.metadata.model_copy(update={"dataset": {**task.metadata.dataset, "path": str(folder)}})
    return task


def evaluated_standard_tasks(cfg: EvalConfig) -> list[AbsTask]:
    """The standard mteb tasks a profile evaluates (:func:`standard_tasks` of its names and
    benchmarks), read from the local copies in ``cfg.task_data_dir`` when it is set."""
    return standard_tasks(cfg.standard_tasks, cfg.benchmarks, REPO_ROOT / cfg.task_data_dir if cfg.task_data_dir else None)


def check_standard_names(names: Sequence[str], benchmarks: Sequence[str]) -> None:
    """Raise :class:`~kalm_lib.config.ConfigError` naming the field for an mteb task or benchmark
    name the registry does not know (metadata only: nothing is downloaded), before any work."""
    for field, items, lookup in (("evaluation.standard_tasks", names, lambda n: mteb.get_tasks(tasks=[n])),
                                 ("evaluation.benchmarks", benchmarks, mteb.get_benchmark)):
        for item in items:
            try:
                lookup(item)
            except KeyError as exc:
                raise ConfigError(f"{field}: {item!r} is not an mteb name: {exc.args[0]}") from None


def _union(first: AbsTask, second: AbsTask) -> AbsTask:
    """One task object covering the subsets and splits of two restrictions of the same mteb task."""
    subsets = list(dict.fromkeys([*first.hf_subsets, *second.hf_subsets]))
    splits = list(dict.fromkeys([*first.eval_splits, *second.eval_splits]))
    if subsets == list(first.hf_subsets) and splits == list(first.eval_splits):
        return first
    return mteb.get_task(first.metadata.name, eval_splits=splits, hf_subsets=subsets)


# --- one fresh copy of every task per model (paired evaluation) --------------------------------


def reseed(task: AbsTask) -> None:
    """Give ``task`` (and an aggregate's sub-tasks) the random state it had when constructed.

    mteb 2.x keeps a task's randomness on the instance: ``AbsTask.__init__`` sets
    ``rng_state = random.Random(seed)`` and ``np_rng = np.random.default_rng(seed)`` (the generators
    ``mteb._set_seed._set_seed`` returns). Clustering draws from ``rng_state`` (the subsample it embeds
    and every bootstrap set), so each evaluation advances it. This sets both generators anew,
    without ``_set_seed``'s seeding of the global ``random`` / numpy / torch states.
    """
    task.rng_state, task.np_rng = random.Random(task.seed), np.random.default_rng(task.seed)
    if isinstance(task, AbsTaskAggregate):
        for subtask in task.metadata.tasks:
            reseed(subtask)


def fresh_task(task: AbsTask) -> AbsTask:
    """An independent copy of ``task`` whose random draws are those of a newly constructed task.

    Evaluating every model on fresh copies pairs the comparison: identical weights draw identical
    samples and score identically, whatever was evaluated before with ``task``. The copy is deep, so
    nothing one evaluation changes on it (random state, loaded data) reaches the original. An
    aggregate's sub-tasks (the ones mteb evaluates, ``metadata.tasks``) live in class-level metadata
    that every instance shares; the copy gets metadata of its own listing its copied sub-tasks.
    """
    copied = copy.deepcopy(task)
    if isinstance(copied, AbsTaskAggregate):
        copied.metadata = copied.metadata.model_copy(update={"tasks": copied.tasks})
    reseed(copied)
    return copied


# --- task information used by the model wrapper and the result tables -------------------------


def task_instruction(metadata: TaskMetadata) -> str:
    """Instruction for a task: its metadata prompt (the query prompt if split), else the mteb
    task-type default prompt, else its description."""
    prompt = metadata.prompt
    if isinstance(prompt, dict):
        prompt = prompt.get("query")
    return prompt or get_abstask_prompt(metadata.name) or metadata.description


def find_task_metadata(name: str) -> TaskMetadata | None:
    """Class-level metadata of a local or mteb task by name; None if neither knows it."""
    if name in LOCAL_TASKS:
        return LOCAL_TASKS[name].metadata
    try:
        return mteb.get_task(name).metadata
    except KeyError:
        return None
