"""Hub-ready saves: the instruction prompts a run's models carry, and the model card of a saved model.

Prompts. Every saved stage carries, in ``config_sentence_transformers.json``, one prompt per task
of the run (:func:`run_prompts`): the instruction prefix of :mod:`kalm_lib.instructions` under
mteb's prompt names, ``<task>`` when every text of the task is instructed (symmetric tasks) and
``<task>-query`` when only its queries are (documents stay bare, so there is no document prompt
and no default prompt). ``SentenceTransformer(path).encode(texts, prompt_name=NAME)`` then gives
the embeddings the study's own encoder gives on the instruction-formatted texts.

Model card. :func:`write_model_card` writes ``README.md`` into a saved model's folder: the recipe
of the stages that produced it (loss, temperature, focal gamma, hard-negative mixing, Matryoshka,
soup), the data cards of the run, the prompts, and its MTEB main scores as ``model-index``
metadata (huggingface_hub's :class:`~huggingface_hub.ModelCardData` and
:class:`~huggingface_hub.EvalResult`) when the run's score table holds them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from mteb import AbsTask
from mteb.abstasks import AbsTaskRetrieval
from transformers import AutoConfig, PretrainedConfig

from .config import PACKAGED_MINILM, Profile, TrainConfig
from .data_cards import DataCard, load_cards
from .encoder import saved_prompts
from .instructions import format_instructed, instruction_prompt, prompt_name
from .layout import INCOMPLETE_PREFIX, MODEL_CARD, SOUP_PREFIX, STAGE1, RunLayout, is_soup_label, stage2_seed
from .mteb_tasks import LOCAL_TASKS, evaluated_standard_tasks, find_task_metadata, task_instruction
from .outputs import write_output

PACKAGED_MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the model the packaged alias installs
CARD_COLUMNS = ["name", "stage", "task_type", "size", "license", "instruction"]
SOUP_METHODS = {  # kalm_lib.soup, as the card describes them
    "uniform": "uniform parameter average of every stage-2 seed (float64)",
    "greedy": "greedy soup: stage-2 seeds averaged best-first, each kept only if the validation score does not drop",
}

# --- prompts -----------------------------------------------------------------------------------


def card_task(card: DataCard) -> str:
    """The task name a card's prompt goes by: an evaluation card's ``mteb_task`` (a filled card, as
    curation writes it, keeps the source card's extra fields under ``extra``), else the card's name."""
    nested = card.extra.get("extra") or {}
    return card.extra.get("mteb_task") or nested.get("mteb_task") or card.name


def card_prompts(cards: Iterable[DataCard]) -> dict[str, str]:
    """Prompt name -> instruction prefix for every derived card with an instruction: a training set
    under its card name, an evaluation set under its mteb task name."""
    return {
        prompt_name(card_task(card), card.symmetric): instruction_prompt(card.instruction)
        for card in cards
        if card.kind == "derived" and card.instruction
    }


def task_prompts(tasks: Iterable[AbsTask]) -> dict[str, str]:
    """Prompt name -> instruction prefix for mteb tasks, as :class:`kalm_lib.evaluation.KalmMtebModel`
    formats them: retrieval-style tasks instruct their queries only, every other task every text."""
    return {
        prompt_name(task.metadata.name, not isinstance(task, AbsTaskRetrieval)): instruction_prompt(
            task_instruction(task.metadata)
        )
        for task in tasks
    }


def run_prompts(profile: Profile, run_dir: Path) -> dict[str, str]:
    """The prompts of a run: its curated data cards and, when evaluated, its standard mteb tasks."""
    prompts = card_prompts(load_cards(RunLayout(run_dir).cards, check_inputs=False).values())
    prompts.update(task_prompts(evaluated_standard_tasks(profile.evaluation)))
    return prompts


# --- model card --------------------------------------------------------------------------------


def stages_of(label: str) -> list[str]:
    """The recipe stages that produced the model labelled ``label`` (stage 1, stage 2, soup)."""
    if label == STAGE1:
        return ["stage 1"]
    if stage2_seed(label) is not None:
        return ["stage 1", "stage 2"]
    if is_soup_label(label):
        return ["stage 1", "stage 2", "soup"]
    raise ValueError(f"no saved model is labelled {label!r} (stage1, stage2_seed<S>, soup_<method>)")


def base_model_id(profile: Profile) -> str | None:
    """Hub id of the backbone the run started from (None for a random or local model)."""
    name = profile.model.name_or_path
    if profile.model.random_init or Path(name).expanduser().exists():
        return None
    return PACKAGED_MINILM_HUB_ID if name == PACKAGED_MINILM else name


def eval_results(scores: pd.DataFrame, label: str) -> list[EvalResult]:
    """model-index entries: the main score of every (task, split, subset) the model ``label`` has
    in a run's score table (:attr:`RunLayout.mteb_scores`, mteb's 0-1 scale)."""
    main = scores[(scores["stage"] == label) & scores["is_main"].astype(bool)]
    results = []
    for row in main.itertuples():
        metadata = find_task_metadata(row.task)
        local = row.task in LOCAL_TASKS or metadata is None
        results.append(EvalResult(
            task_type=row.task_type, task_name=row.task, dataset_name=row.task,
            dataset_type=row.task if local else metadata.dataset["path"],
            dataset_revision=None if local else metadata.dataset.get("revision"),
            dataset_config=row.subset, dataset_split=row.split,
            metric_type=row.metric, metric_value=float(row.score),
        ))
    return results


def _stage_rows(name: str, cfg: TrainConfig) -> list[str]:
    """Markdown table rows of one contrastive stage."""
    rows = [f"| {name} | steps | {cfg.steps} (global batch {cfg.batch_size}, lr {cfg.learning_rate:g}, "
            f"warm-up {cfg.warmup_ratio:g}, AdamW weight decay {cfg.weight_decay:g}) |",
            f"| {name} | loss | InfoNCE, temperature {cfg.temperature:g}, focal gamma {cfg.focal_gamma:g} |"]
    if cfg.hard_negative_mixing:
        rows.append(f"| {name} | hard-negative mixing | top-{cfg.mixing_top_k}: {cfg.mixing_pairs} negative-negative and "
                    f"{cfg.mixing_query} query-negative mixes per query (beta <= {cfg.mixing_query_beta_max:g}) |")
    if cfg.matryoshka_dims:
        rows.append(f"| {name} | Matryoshka | dims {cfg.matryoshka_dims}, weights {cfg.matryoshka_weights} |")
    return rows


def attention_of(config: PretrainedConfig, bidirectional: bool) -> str:
    """How the saved backbone attends: a decoder saved with ``is_causal=False``, an encoder (the
    profile asked for bidirectional attention and the config has no causal switch), or causal."""
    if getattr(config, "is_causal", None) is False:
        return "bidirectional (decoder, causal mask removed)"
    return "bidirectional (encoder)" if bidirectional else "causal"


def recipe_table(profile: Profile, label: str, folder: Path) -> str:
    """The recipe of the stages behind ``label``, as a markdown table."""
    config = AutoConfig.from_pretrained(folder)
    backbone = f"random {config.model_type}" if profile.model.random_init else profile.model.name_or_path
    rows = ["| stage | setting | value |", "| --- | --- | --- |",
            f"| model | backbone | {backbone} ({config.model_type}, {config.hidden_size} dims) |",
            f"| model | embedding | {attention_of(config, profile.model.bidirectional)} attention, {profile.model.pooling} pooling, "
            f"max {profile.model.max_length} tokens, L2-normalised |"]
    stages = stages_of(label)
    rows += _stage_rows("stage 1", profile.pretrain) if profile.pretrain.enabled else ["| stage 1 | off | the base model |"]
    if "stage 2" in stages:
        data = profile.data
        rows += _stage_rows("stage 2", profile.finetune)
        rows.append(f"| stage 2 | hard negatives | {data.hard_negatives} per query, mined by the stage-1 model from ranks "
                    f"[{data.hard_negative_rank_min}, {data.hard_negative_rank_max}) |")
        rows.append(f"| stage 2 | seeds | {profile.finetune.seeds} |")
    if "soup" in stages:
        rows.append(f"| soup | method | {SOUP_METHODS[label.removeprefix(SOUP_PREFIX)]} "
                    f"(selection task {profile.soup.selection_task}, validation split) |")
    return "\n".join(rows)


def markdown_table(frame: pd.DataFrame) -> str:
    """``frame`` as a markdown table (every cell as text)."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def cards_table(cards: Iterable[DataCard]) -> str:
    """The run's derived data cards (training and evaluation sets) as a markdown table."""
    rows = [{"name": card.name, "stage": card.stage, "task_type": card.task_type, "size": card.extra.get("size", ""),
             "license": card.license, "instruction": card.instruction} for card in cards if card.kind == "derived"]
    return markdown_table(pd.DataFrame(rows, columns=CARD_COLUMNS))


def card_body(title: str, recipe: str, cards: str, prompts: dict[str, str], scores: list[EvalResult]) -> str:
    """The markdown of the card below its metadata."""
    example = next(iter(prompts), None)
    usage = f', prompt_name="{example}"' if example else ""
    prompt_rows = markdown_table(pd.DataFrame({"prompt name": list(prompts), "prompt": [repr(p) for p in prompts.values()]}))
    score_rows = markdown_table(pd.DataFrame(
        [{"task": r.task_name, "split": r.dataset_split, "subset": r.dataset_config, "metric": r.metric_type,
          "score": round(r.metric_value, 4)} for r in scores], columns=["task", "split", "subset", "metric", "score"]))
    return f"""# {title}

A text-embedding model trained with the KaLM-Embedding-V2 recipe by
[kalm-study](https://arxiv.org/abs/2506.20923) (bidirectional attention, mean pooling, contrastive
stages, model soup).

## Usage

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("path/to/this/folder")
queries = model.encode(["..."]{usage})  # queries (every text of a symmetric task): with their task's prompt
documents = model.encode(["..."])  # documents: bare, as in training
```

Queries are formatted as in training (`{format_instructed("<task instruction>", "<text>")!r}`); the prompt
names follow mteb's convention (`<task>-query`: queries only; `<task>`: every text).

{prompt_rows}

## Recipe

{recipe}

## Data cards

{cards}

## MTEB scores

{score_rows if scores else "Not evaluated in this run."}
"""


def model_card(profile: Profile, run_dir: Path, label: str, folder: Path) -> ModelCard:
    """The card of the saved model ``label`` of a run (its folder ``folder``), with its main MTEB
    scores as model-index metadata when the run's score table has them (and its data cards when
    the run holds them: a hand-built run folder may not)."""
    layout = RunLayout(run_dir)
    cards = load_cards(layout.cards, check_inputs=False).values() if layout.cards.is_dir() else []
    table = pd.read_csv(layout.mteb_scores) if layout.mteb_scores.is_file() else pd.DataFrame(columns=["stage", "is_main"])
    scores = eval_results(table, label)
    name = f"kalm-study-{profile.name}-{run_dir.name.removeprefix(INCOMPLETE_PREFIX)}-{label}"
    data = ModelCardData(
        model_name=name, library_name="sentence-transformers", pipeline_tag="sentence-similarity",
        base_model=base_model_id(profile), language=["en"], eval_results=scores or None,
        tags=["sentence-transformers", "feature-extraction", "sentence-similarity", "kalm-embedding", "mteb"],
    )
    body = card_body(name, recipe_table(profile, label, folder), cards_table(cards), saved_prompts(folder), scores)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_card(profile: Profile, run_dir: Path, label: str, folder: Path) -> Path | None:
    """Write :func:`model_card` as ``README.md`` into ``folder`` (main process; None elsewhere)."""
    return write_output(str(model_card(profile, run_dir, label, folder)), folder / MODEL_CARD)
