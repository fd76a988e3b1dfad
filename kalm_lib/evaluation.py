"""Run kalm-study encoders through mteb and turn mteb results into tidy tables.

Any object with ``encode(texts: list[str], batch_size: int) -> np.ndarray`` (L2-normalised float32
rows) can be evaluated: :class:`KalmMtebModel` adapts it to mteb's encoder protocol and adds the
KaLM instruction format, and :func:`evaluate_model` runs ``mteb.evaluate`` with results saved in
mteb's own result-folder layout (``<output_folder>/results/<org>__<name>/<revision>/<Task>.json``).
Every call evaluates fresh copies of the tasks, so every model sees the same random draws.

On request it also returns per-item scores, the input of a paired bootstrap
(:mod:`kalm_lib.bootstrap`): per query of a retrieval task its nDCG@10, per pair of a pair
classification task its cosine similarity and label, both from mteb's own saved predictions.

Compressed-embedding variants (beyond the paper) are encoder wrappers with the same ``encode``, so
they run through the same mteb path: :class:`TruncatedEncoder` (Matryoshka prefix) and
:class:`QuantizedEncoder` (int8 or binary).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

import mteb
import numpy as np
import pandas as pd
from datasets import Dataset
from mteb import AbsTask, ResultCache, TaskMetadata, TaskResult
from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores
from mteb.abstasks import AbsTaskPairClassification, AbsTaskRetrieval
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder
from mteb.types import PromptType

from .instructions import format_instructed
from .mteb_tasks import find_task_metadata, fresh_task, task_instruction

if TYPE_CHECKING:
    from mteb.types import BatchedInput
    from torch.utils.data import DataLoader

MODEL_ORG = "kalm-study"
MTEB_DEFAULT_BATCH_SIZE = 32
TIDY_COLUMNS = ["model", "task", "task_type", "split", "subset", "metric", "score", "is_main"]
# one row per query (ndcg_at_10) or pair (cosine, label); item: query id or pair index
PER_ITEM_COLUMNS = ["model", "task", "split", "subset", "item", "ndcg_at_10", "cosine", "label"]
PER_ITEM_VALUE_TYPES = {"ndcg_at_10": "float64", "cosine": "float64", "label": "Int64"}

Quantization = Literal["int8", "binary"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)


class TextEncoder(Protocol):
    """What the evaluation needs from an encoder."""

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        """L2-normalised float32 embeddings [len(texts), dim]."""
        ...


# --- the mteb model wrapper ---------------------------------------------


def kalm_model_meta(model_name: str, revision: str = "local", instructed: bool = True) -> ModelMeta:
    """mteb ModelMeta for a kalm-study model; a bare run name is put under ``kalm-study/``.
    ``use_instructions`` records whether the model is given instructions."""
    name = model_name if "/" in model_name else f"{MODEL_ORG}/{model_name}"
    return ModelMeta(
        loader=None,
        name=name,
        revision=revision,
        release_date=None,
        languages=["eng-Latn"],
        n_parameters=None,
        memory_usage_mb=None,
        max_tokens=None,
        embed_dim=None,
        license=None,
        open_weights=True,
        public_training_code=None,
        public_training_data=None,
        framework=["PyTorch"],
        similarity_fn_name="cosine",
        use_instructions=instructed,
        training_datasets=None,
    )


class KalmMtebModel(AbsEncoder):
    """mteb encoder around a :class:`TextEncoder`, applying KaLM instructions.

    Retrieval queries get the instruction (:func:`kalm_lib.instructions.format_instructed`) and
    documents stay bare.
    Symmetric tasks (pair classification, clustering, STS, ...) encode with no prompt type, so the
    instruction goes on every text. The instruction is ``instructions[task name]`` if given, else
    the task's own (see :func:`kalm_lib.mteb_tasks.task_instruction`). With ``instructed=False``
    every text stays bare (a model trained without instructions, e.g. the base model).
    """

    def __init__(
        self,
        encoder: TextEncoder,
        model_name: str,
        *,
        revision: str = "local",
        instructions: Mapping[str, str] | None = None,
        instructed: bool = True,
    ) -> None:
        self.model = encoder
        self.mteb_model_meta = kalm_model_meta(model_name, revision, instructed)
        self.instructions = dict(instructions or {})
        self.instructed = instructed

    def instruction_for(self, task_metadata: TaskMetadata) -> str:
        """The instruction used for ``task_metadata``'s instructed inputs."""
        return self.instructions.get(task_metadata.name) or task_instruction(task_metadata)

    def format_texts(
        self, texts: Sequence[str], task_metadata: TaskMetadata, prompt_type: PromptType | None
    ) -> list[str]:
        """Texts as the encoder sees them: documents (and everything when not instructed) bare,
        everything else instructed."""
        if not self.instructed or prompt_type == PromptType.document:
            return list(texts)
        instruction = self.instruction_for(task_metadata)
        return [format_instructed(instruction, text) for text in texts]

    def encode(
        self,
        inputs: DataLoader[BatchedInput],
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embeddings [n, dim] (float32) of every text the dataloader yields, in order."""
        texts = self.format_texts([text for batch in inputs for text in batch["text"]], task_metadata, prompt_type)
        batch_size = int(kwargs.get("batch_size", MTEB_DEFAULT_BATCH_SIZE))
        embeddings = np.asarray(self.model.encode(texts, batch_size=batch_size), dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
            raise ValueError(f"encoder returned shape {embeddings.shape} for {len(texts)} texts")
        return embeddings


# --- running mteb and tidying its results ------------------------------------------------------


@dataclass(frozen=True)
class ModelEvaluation:
    """What :func:`evaluate_model` returns: tidy scores and (when asked for) per-item scores."""

    scores: pd.DataFrame  # columns TIDY_COLUMNS
    per_item: pd.DataFrame  # columns PER_ITEM_COLUMNS; empty unless per_item=True


def evaluate_model(
    encoder: TextEncoder,
    tasks: Sequence[AbsTask],
    output_folder: Path,
    model_name: str,
    batch_size: int = 64,
    overwrite: bool = True,
    *,
    revision: str = "local",
    instructions: Mapping[str, str] | None = None,
    instructed: bool = True,
    per_item: bool = False,
) -> ModelEvaluation:
    """Evaluate ``encoder`` on ``tasks`` with ``mteb.evaluate``; results are saved under ``output_folder``.

    Each call evaluates fresh copies of ``tasks`` (:func:`kalm_lib.mteb_tasks.fresh_task`), so every
    model sees the same random draws whatever was evaluated before: comparisons are paired.
    ``instructed=False`` encodes every text bare (see :class:`KalmMtebModel`).
    ``overwrite=False`` keeps (and returns) results already in the folder and runs only what is missing.
    ``per_item=True`` also returns :func:`per_item_scores` of every retrieval and pair-classification
    task, not the parts of an aggregate task (it needs ``overwrite=True``: a task mteb skips leaves
    no predictions).
    """
    if not tasks:
        raise ValueError("no tasks to evaluate")
    if per_item and not overwrite:
        raise ValueError("per-item scores need overwrite=True: mteb skips tasks whose results are saved")
    model = KalmMtebModel(encoder, model_name, revision=revision, instructions=instructions, instructed=instructed)
    fresh, name = [fresh_task(task) for task in tasks], model.mteb_model_meta.name
    if not per_item:
        results = _run_mteb(model, fresh, Path(output_folder), batch_size, overwrite, None)
        return ModelEvaluation(tidy_results(results, name, tasks), concat_per_item([]))
    results, items = _run_mteb_with_items(model, fresh, Path(output_folder), batch_size)
    return ModelEvaluation(tidy_results(results, name, tasks), items.assign(model=name))


def _run_mteb(
    model: KalmMtebModel,
    tasks: list[AbsTask],
    output_folder: Path,
    batch_size: int,
    overwrite: bool,
    prediction_folder: Path | None,
) -> list[TaskResult]:
    """``mteb.evaluate`` with kalm-study's settings; mteb saves predictions in ``prediction_folder``."""
    result = mteb.evaluate(
        model,
        tasks,
        cache=ResultCache(output_folder),
        overwrite_strategy="always" if overwrite else "only-missing",
        encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
        co2_tracker=False,
        show_progress_bar=False,
        prediction_folder=prediction_folder,
    )
    return result.task_results


def _run_mteb_with_items(
    model: KalmMtebModel, tasks: list[AbsTask], output_folder: Path, batch_size: int
) -> tuple[list[TaskResult], pd.DataFrame]:
    """:func:`_run_mteb` (overwriting) and the :func:`per_item_scores` of every task that has items.

    Their data is loaded first, so mteb leaves it in place (qrels, labels) after evaluating; mteb
    saves its predictions in a temporary folder, read before the folder goes.
    """
    for task in tasks:
        if _has_items(task):
            task.load_data()
    with tempfile.TemporaryDirectory(prefix="kalm-predictions-") as folder:
        results = _run_mteb(model, tasks, output_folder, batch_size, True, Path(folder))
        items = concat_per_item([per_item_scores(task, Path(folder)) for task in tasks if _has_items(task)])
    return results, items


# --- per-item scores from mteb's saved predictions ---------------------------------------------


def concat_per_item(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """``frames`` stacked, with exactly :data:`PER_ITEM_COLUMNS` (missing values empty, value columns typed)."""
    stacked = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return stacked.reindex(columns=PER_ITEM_COLUMNS).astype(PER_ITEM_VALUE_TYPES)


def _has_items(task: AbsTask) -> bool:
    """Whether :func:`per_item_scores` covers ``task`` (retrieval, incl. reranking; pair classification)."""
    return isinstance(task, AbsTaskRetrieval | AbsTaskPairClassification)


def _split_data(task: AbsTask, subset: str, split: str) -> Any:
    """The loaded data of one subset and split, chosen as ``AbsTask.evaluate`` chooses it."""
    dataset = task.dataset
    if dataset is None:
        raise ValueError(f"{task.metadata.name}: data not loaded")
    return dataset[split] if subset not in dataset and subset == "default" else dataset[subset][split]


def retrieval_items(task: AbsTaskRetrieval, ranking: Mapping[str, Mapping[str, float]], subset: str, split: str) -> pd.DataFrame:
    """Per-query nDCG@10 of mteb's saved ranking, scored by mteb's own scorer.

    ``calculate_retrieval_scores`` (pytrec_eval's ``ndcg_cut_10``, ties broken by doc id) on the
    ranking mteb saved, after mteb's own edits (identical query/doc ids dropped when the task says so,
    the first result skipped when it says so). The mean over queries is mteb's ``ndcg_at_10`` before
    mteb rounds it to 5 decimals.
    """
    qrels = _split_data(task, subset, split)["relevant_docs"]
    ranking = {
        qid: {doc: score for doc, score in docs.items() if not (task.ignore_identical_ids and doc == qid)}
        for qid, docs in ranking.items()
    }
    per_query = calculate_retrieval_scores(ranking, qrels, [10], task.skip_first_result).all_scores
    return pd.DataFrame({"item": list(per_query), "ndcg_at_10": [s["ndcg_cut_10"] for s in per_query.values()]})


def pair_items(task: AbsTaskPairClassification, distances: Mapping[str, list[float]], subset: str, split: str) -> pd.DataFrame:
    """Per pair (index in the task's data): mteb's cosine similarity and the 0/1 label."""
    data = _split_data(task, subset, split)
    if task.metadata.modalities == ["text"] and len(data) == 1:  # mteb's v1 layout: one row of lists
        data = Dataset.from_dict(data[0])
    labels, cosine = list(data[task.label_column_name]), distances["cosine_scores"]
    if len(labels) != len(cosine):
        raise ValueError(f"{task.metadata.name} {split}/{subset}: {len(cosine)} saved cosines for {len(labels)} labels")
    return pd.DataFrame({"item": [str(i) for i in range(len(labels))], "cosine": cosine, "label": labels})


def per_item_scores(task: AbsTask, prediction_folder: Path) -> pd.DataFrame:
    """Per-item rows (:data:`PER_ITEM_COLUMNS` but ``model``) of ``task`` from the predictions mteb
    saved in ``prediction_folder``; the task's data must still be loaded. A task that saved no
    predictions (a subclass with its own evaluation) gives no rows and a warning."""
    path = prediction_folder / task.prediction_file_name
    if not path.is_file():
        warnings.warn(f"{task.metadata.name}: mteb saved no predictions, so it has no per-item scores", stacklevel=2)
        return concat_per_item([])
    saved = json.loads(path.read_text(encoding="utf-8"))
    items = retrieval_items if isinstance(task, AbsTaskRetrieval) else pair_items
    frames = [
        items(task, predictions, subset, split).assign(task=task.metadata.name, split=split, subset=subset)
        for subset, splits in saved.items()
        if subset != "mteb_model_meta"
        for split, predictions in splits.items()
    ]
    return concat_per_item(frames)


# --- tidy score tables -------------------------------------------------------------------------


def _is_score(value: object) -> bool:
    """A scalar numeric score (not a nested per-level list/dict, not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _result_rows(result: TaskResult, model: str, metadata: TaskMetadata | None) -> list[dict[str, Any]]:
    """Tidy rows of one task result; without metadata the ``main_score`` entry is the main row."""
    main_metric = metadata.main_score if metadata else "main_score"
    task_type = metadata.type if metadata else "unknown"
    rows = []
    for split, entries in result.scores.items():
        for entry in entries:
            for metric, value in entry.items():
                if not _is_score(value) or (metadata and metric == "main_score"):
                    continue
                rows.append(
                    {
                        "model": model,
                        "task": result.task_name,
                        "task_type": task_type,
                        "split": split,
                        "subset": entry["hf_subset"],
                        "metric": metric,
                        "score": float(value),
                        "is_main": metric == main_metric,
                    }
                )
    return rows


def tidy_results(task_results: Iterable[TaskResult], model_name: str, tasks: Iterable[AbsTask] = ()) -> pd.DataFrame:
    """One row per (task, split, subset, metric): columns :data:`TIDY_COLUMNS`.

    Task type and main metric come from ``tasks`` when given, else from the local/mteb task registry.
    """
    known = {task.metadata.name: task.metadata for task in tasks}
    rows = [
        row
        for result in task_results
        for row in _result_rows(result, model_name, known.get(result.task_name) or find_task_metadata(result.task_name))
    ]
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


def load_results_folder(output_folder: Path, tasks: Iterable[AbsTask] = ()) -> pd.DataFrame:
    """Read every model's saved mteb results in ``output_folder`` back into the tidy format."""
    output_folder = Path(output_folder)
    if not (output_folder / "results").is_dir():
        raise FileNotFoundError(f"no mteb results folder at {output_folder / 'results'}")
    tasks = list(tasks)
    loaded = ResultCache(output_folder).load_results(include_remote=False)
    frames = [tidy_results(model.task_results, model.model_name, tasks) for model in loaded.model_results]
    if not frames:
        return pd.DataFrame(columns=TIDY_COLUMNS)
    return pd.concat(frames, ignore_index=True)


# --- compressed embeddings (beyond the paper) --------------------------------------------------


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), as float32."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.where(norms > 0, norms, 1.0)


def truncate_embeddings(embeddings: np.ndarray, dim: int) -> np.ndarray:
    """Matryoshka truncation: the first ``dim`` dimensions, re-normalised."""
    if not 1 <= dim <= embeddings.shape[1]:
        raise ValueError(f"cannot truncate {embeddings.shape[1]}-dim embeddings to {dim}")
    return l2_normalize(embeddings[:, :dim])


def quantize_int8(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-dimension int8 codes in [-127, 127] and their float32 scales (max |x| / 127)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    peak = np.abs(embeddings).max(axis=0)
    scale = (np.where(peak > 0, peak, 1.0) / 127.0).astype(np.float32)
    codes = np.clip(np.rint(embeddings / scale), -127, 127).astype(np.int8)
    return codes, scale


def binarize(embeddings: np.ndarray) -> np.ndarray:
    """Sign bits as int8 +1/-1 (zero counts as +1)."""
    return np.where(np.asarray(embeddings) >= 0, 1, -1).astype(np.int8)


def compress_embeddings(embeddings: np.ndarray, scheme: Quantization) -> np.ndarray:
    """Unit float32 vectors whose cosine equals the similarity computed from the compressed codes.

    int8: codes * scale (the dot product of int8 codes weighted by the per-dimension scales).
    binary: +/-1 signs / sqrt(dim) (cosine = 1 - 2 * hamming / dim).
    """
    if scheme == "int8":
        codes, scale = quantize_int8(embeddings)
        return l2_normalize(codes.astype(np.float32) * scale)
    if scheme == "binary":
        return l2_normalize(binarize(embeddings).astype(np.float32))
    raise ValueError(f"unknown quantization {scheme!r}; expected one of {QUANTIZATIONS}")


class EmbeddingCache:
    """``encoder`` whose embeddings are kept per ``encode`` call (keyed by the SHA-256 of the call's
    texts), so the compressed variants of one model (:class:`TruncatedEncoder`,
    :class:`QuantizedEncoder`) reuse the full-precision embeddings of the same call instead of
    encoding the task again: the same texts in the same batches, so the same numbers. Holds every
    call until :meth:`clear`; evaluate one task at a time and clear after it to bound memory by
    that task's embeddings."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self.calls: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        """The embeddings of ``texts`` (encoded on the first call with these texts, then reused)."""
        digest = hashlib.sha256()
        for text in texts:
            digest.update(text.encode())
            digest.update(b"\x00")
        key = f"{len(texts)}:{digest.hexdigest()}"
        if key not in self.calls:
            self.calls[key] = np.asarray(self.encoder.encode(texts, batch_size=batch_size), dtype=np.float32)
        return self.calls[key].copy()

    def clear(self) -> None:
        """Forget every kept embedding."""
        self.calls.clear()


class TruncatedEncoder:
    """``encoder`` with embeddings cut to their first ``dim`` dimensions and re-normalised."""

    def __init__(self, encoder: TextEncoder, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.encoder = encoder
        self.dim = dim

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Truncated, unit-norm float32 embeddings [len(texts), dim]."""
        return truncate_embeddings(self.encoder.encode(texts, batch_size=batch_size), self.dim)


class QuantizedEncoder:
    """``encoder`` with embeddings quantised to int8 or binary (see :func:`compress_embeddings`).

    int8 scales are calibrated per ``encode`` call, i.e. on the batch mteb encodes at once (all
    queries, or a corpus chunk). Calls are quantised independently; since the returned vectors are
    de-quantised, queries and documents stay comparable.
    """

    def __init__(self, encoder: TextEncoder, scheme: Quantization) -> None:
        if scheme not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {scheme!r}; expected one of {QUANTIZATIONS}")
        self.encoder = encoder
        self.scheme: Quantization = scheme

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Quantised (then de-quantised), unit-norm float32 embeddings [len(texts), dim]."""
        return compress_embeddings(self.encoder.encode(texts, batch_size=batch_size), self.scheme)
