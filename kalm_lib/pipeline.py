"""One ``run_<stage>(profile, run_dir)`` per notebook; each reads and writes only inside the run
folder, at the paths :class:`kalm_lib.layout.RunLayout` names, and returns what its notebook shows.

    notebook  function                 writes (RunLayout attributes)
    00        run_curation             data: shard, eval_payloads, card, curation_summary
    01        run_bidirectional_check  bidirectional_check
    02        run_pretraining          stage1, history("stage1")
    02        run_mining               mined_shard(set), card(set), mining_quality, mining_samples
    03        run_finetuning           stage2(seed), history(stage2_label(seed))
    04        run_soup                 soup(method), soup_trace, mteb_validation
    05        run_evaluation           mteb, mteb_scores, per_item_scores, the final model's card

Notebook 06 reads them back through :mod:`kalm_lib.report`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from mteb import AbsTask

from .bidirectional import first_token_sensitivity
from .builders import word_key
from .config import ConfigError, EvalConfig, ModelConfig, Profile, TrainConfig, load_profile
from .curation import curate, load_train_sets, sample_seed, task_texts, write_curated
from .data_cards import DataCardError, load_cards
from .encoder import Encoder, encoder_from_checkpoint, load_backbone, load_encoder
from .evaluation import EmbeddingCache, QuantizedEncoder, TextEncoder, TruncatedEncoder, concat_per_item, evaluate_model
from .hub import run_prompts, write_model_card
from .layout import (
    BASE,
    BASE_NO_INSTRUCTION,
    REPO_ROOT,
    SINGLE_PREFIX,
    STAGE1,
    RunLayout,
    StageLayout,
    soup_label,
    stage2_label,
    stage2_seed,
)
from .mining import MiningConfig, mine_hard_negatives, needs_mining, pool_table, write_mined
from .mteb_tasks import build_local_tasks, evaluated_standard_tasks
from .outputs import write_folder, write_output
from .reference import stage_benchmark_means
from .scale import curate_streamed_sets, streamed_sets
from .soup import average_states, greedy_soup, load_state
from .training import StageResult, TrainSets, latest_state, prune_states, train_stage

DEMO_DECODER = {
    "model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 128,
}


def open_run(profile: str, run_dir: str | Path, overrides: dict | None = None) -> tuple[Profile, Path]:
    """Resolve a notebook's parameters: the validated profile and the run folder (created)."""
    cfg = load_profile(profile, overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    path = Path(run_dir)
    path = path if path.is_absolute() else REPO_ROOT / path
    RunLayout(path).metrics.mkdir(parents=True, exist_ok=True)
    return cfg, path


# --- 00 data curation ----------------------------------------------------------------------------

def run_curation(profile: Profile, run_dir: Path) -> pd.DataFrame:
    """Curate every derived card; write shards, evaluation payloads, filled cards, the summary and
    the candidate pool that notebook 02 mines stage-2 hard negatives from. Profiles that evaluate
    standard MTEB tasks also decontaminate against those tasks' texts. The summary flags sets
    smaller than one batch of the (enabled) stage that trains on them. With ``data.stream_hub_sets``
    the stage-1 hub sets are streamed to folders of shards instead (:mod:`kalm_lib.scale`)."""
    layout = RunLayout(run_dir)
    external = task_texts(evaluated_standard_tasks(profile.evaluation))
    batch_sizes = {stage: cfg.batch_size for stage, cfg in (("pretrain", profile.pretrain), ("finetune", profile.finetune)) if cfg.enabled}
    cards_dir = REPO_ROOT / profile.data.cards_dir
    cards = load_cards(cards_dir)
    streamed = streamed_sets(cards) if profile.data.stream_hub_sets else frozenset()
    hub_files = REPO_ROOT / profile.data.hub_files_dir if profile.data.hub_files_dir else None
    result = curate(profile.data, profile.seed, cards_dir, extra_eval_texts=external, batch_sizes=batch_sizes,
                    exclude=streamed, hub_files_dir=hub_files)
    curate_streamed_sets(result, profile.data, profile.seed, cards, streamed, layout, hub_files, batch_sizes)
    summary = write_curated(result, layout)
    held_out = frozenset(word_key(w) for task in result.evals.values() for w in task.words)
    write_output(pool_table(result.sources, held_out), layout.mining_pool)
    return summary


# --- 02 stage 1, then mining with the stage-1 model ------------------------------------------------

def run_mining(profile: Profile, run_dir: Path) -> pd.DataFrame:
    """Mine stage-2 hard negatives with the stage-1 model (the previous model, as the paper does).

    Every stage-2 set with in-batch semantics (not classification) is re-ranked against the pool of
    all non-held-out words plus its own positives; the mined shard and its card replace the
    curated ones for training (mining always starts from the curated shard, so running it again
    gives the same result). A set that mining leaves smaller than one stage-2 batch stops the run,
    naming the set. Returns (and writes) the mining-quality table.
    """
    layout = RunLayout(run_dir)
    encoder = encoder_from_checkpoint(layout.stage1.final, profile.model)
    seed = sample_seed(profile.data, profile.seed)
    pool = pd.read_parquet(layout.mining_pool)
    related = {text: set(words) for text, words in zip(pool["text"], pool["related"]) if len(words)}
    if profile.data.mining_pool_max:
        pool = pool.sample(n=min(profile.data.mining_pool_max, len(pool)), random_state=seed).sort_values("text")
    cfg = MiningConfig(
        count=profile.data.hard_negatives, rank_min=profile.data.hard_negative_rank_min,
        rank_max=profile.data.hard_negative_rank_max, score_decimals=profile.data.mining_score_decimals,
        consistency_filter=profile.data.mining_consistency_filter, seed=seed,
    )
    rows, samples = [], []
    for name, card in load_cards(layout.cards, check_inputs=False).items():
        if not needs_mining(card):
            continue
        frame = pd.read_parquet(layout.shard(card.stage, name))
        mined = mine_hard_negatives(frame, card, encoder, pool["text"].tolist(), cfg, related, profile.evaluation.batch_size)
        if len(mined.frame) < profile.finetune.batch_size:
            raise DataCardError(
                f"{card.path}: mining kept {len(mined.frame)} of {len(frame)} rows of {name!r} "
                f"({mined.dropped_inconsistent} dropped by the ranking-consistency filter), fewer than one stage-2 batch "
                f"({profile.finetune.batch_size}); widen data.hard_negative_rank_min/max or set data.mining_consistency_filter=false"
            )
        write_mined(mined.frame, card, layout)
        rows.append({"set": name, "rows_in": len(frame), "rows_out": len(mined.frame),
                     "dropped_inconsistent": mined.dropped_inconsistent, "padded_rows": mined.padded_rows, **mined.quality})
        samples.append(mined.samples.assign(set=name))
    quality = pd.DataFrame(rows)
    write_output(quality, layout.mining_quality)
    write_output(pd.concat(samples, ignore_index=True) if samples else pd.DataFrame(), layout.mining_samples)
    return quality


# --- 01 bidirectional conversion -------------------------------------------------------------

def run_bidirectional_check(profile: Profile, run_dir: Path) -> pd.DataFrame:
    """First-token sensitivity with causal and with bidirectional attention, for the profile's
    model and for a Qwen2 decoder built from a config.

    The sensitivity is the change of the first token's hidden state when the last token changes:
    0 under causal attention, > 0 once attention is bidirectional. An encoder has no causal form
    (NaN in that column). Written to ``RunLayout.bidirectional_check``.
    """
    configs = {
        "profile model": profile.model,
        "Qwen2 decoder (random init)": ModelConfig(random_init=DEMO_DECODER, attn_implementation=profile.model.attn_implementation),
    }
    rows = []
    for label, cfg in configs.items():
        row = {"model": label}
        for column, bidirectional in (("sensitivity_causal", False), ("sensitivity_bidirectional", True)):
            torch.manual_seed(profile.seed)
            try:
                backbone, tokenizer = load_backbone(replace(cfg, bidirectional=bidirectional))
            except ConfigError:  # an encoder cannot be made causal
                row[column] = float("nan")
                continue
            batch = tokenizer(["the bank of the river was steep", "a bank lends money"], padding=True, return_tensors="pt")
            row[column] = first_token_sensitivity(backbone, batch["input_ids"], batch["attention_mask"])
            row["architecture"] = type(backbone).__name__
        rows.append(row)
    check = pd.DataFrame(rows, columns=["model", "architecture", "sensitivity_causal", "sensitivity_bidirectional"])
    write_output(check, RunLayout(run_dir).bidirectional_check)
    return check


# --- 02 / 03 training --------------------------------------------------------------------------

def run_pretraining(profile: Profile, run_dir: Path) -> StageResult:
    """Stage 1: InfoNCE with in-batch negatives on the weakly supervised pairs. The encoder carries
    the run's instruction prompts (:func:`kalm_lib.hub.run_prompts`); every later stage reopens a
    saved folder and keeps them."""
    layout = RunLayout(run_dir)
    torch.manual_seed(profile.seed)  # a randomly initialised backbone starts from the profile's seed
    encoder = load_encoder(profile.model, run_prompts(profile, run_dir))
    if not profile.pretrain.enabled:
        write_folder(layout.stage1.final, encoder.save)
        return StageResult(final_dir=layout.stage1.final)
    sets = load_train_sets(layout, "pretrain")
    return train_resumable(encoder, sets, profile.pretrain, layout.stage1, layout.history(STAGE1), profile.seed, profile.model.bf16)


def train_resumable(encoder: Encoder, sets: TrainSets, cfg: TrainConfig, stage: StageLayout, history: Path,
                    seed: int, bf16: bool) -> StageResult:
    """Train one stage so that an interrupted run (``kalm_lib run --resume``) loses little: a stage
    whose final model and history are written is not trained again; otherwise training continues
    from the stage's newest complete state (none: from step 0). The states are deleted once the
    history is written."""
    if stage.final.is_dir() and history.is_file():
        print(f"{stage.root.name}: already trained in this run ({stage.final}); kept")
        return StageResult(history=json.loads(history.read_text()), final_dir=stage.final)
    resume = latest_state(stage)
    if resume is not None:
        print(f"{stage.root.name}: resuming from {resume.name}")
    result = train_stage(encoder, sets, cfg, stage.root, seed, bf16, resume_from=resume)
    write_output(result.history, history)
    prune_states(stage, keep=0)
    return result


def run_finetuning(profile: Profile, run_dir: Path) -> list[StageResult]:
    """Stage 2, once per seed: hard negatives, focal reweighting, hard-negative mixing."""
    layout = RunLayout(run_dir)
    sets = load_train_sets(layout, "finetune")
    unmined = sorted(name for name, (_, card) in sets.items() if needs_mining(card) and "mined_with" not in card.extra)
    if unmined:
        raise FileNotFoundError(f"{layout.data}: stage-2 sets {unmined} have no mined negatives; run mining first "
                                "(notebook 02, pipeline.run_mining, or `kalm_lib train --stage mine`)")
    results = []
    for seed in profile.finetune.seeds:
        encoder = encoder_from_checkpoint(layout.stage1.final, profile.model)
        results.append(train_resumable(encoder, sets, profile.finetune, layout.stage2(seed), layout.history(stage2_label(seed)),
                                       seed, profile.model.bf16))
    return results


# --- 04 soup -----------------------------------------------------------------------------------

def validation_score(encoder: Encoder, profile: Profile, run_dir: Path, name: str) -> float:
    """Main score of the soup-selection task on the validation split (never the test split); every
    candidate is scored on a fresh copy of the task (the same random draws), so the soup is paired."""
    layout = RunLayout(run_dir)
    tasks = build_local_tasks(layout.eval_payloads("validation"), [profile.soup.selection_task])
    scores = evaluate_model(encoder, tasks, layout.mteb_validation, name, profile.evaluation.batch_size).scores
    return float(scores.loc[scores["is_main"], "score"].iloc[0])


def run_soup(profile: Profile, run_dir: Path) -> pd.DataFrame:
    """Uniform and/or greedy soup of the stage-2 checkpoints; returns the selection trace.

    Every soup is scored on the validation split of ``soup.selection_task`` when the run has
    validation payloads; a run whose cards define no evaluation sets (the paper's hub cards) has
    none, so its uniform soup gets no validation score (NaN) and a greedy soup, which needs one to
    rank checkpoints, is refused before any work.
    """
    layout = RunLayout(run_dir)
    checkpoints = layout.stage2_finals()
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir}: no stage-2 checkpoints; run 03_finetuning first")
    validated = layout.eval_payloads("validation").is_dir()
    if "greedy" in profile.soup.methods and not validated:
        raise FileNotFoundError(
            f"{layout.eval_payloads('validation')}: a greedy soup ranks checkpoints on the validation split of "
            f"{profile.soup.selection_task!r}, but this run's cards define no evaluation sets; use soup.methods: [uniform]"
        )
    states = [load_state(path) for path in checkpoints]
    template = encoder_from_checkpoint(checkpoints[0], profile.model)
    rows = []

    def score(state: dict) -> float:
        template.backbone.load_state_dict(state)
        return validation_score(template, profile, run_dir, "soup-candidate")

    for method in profile.soup.methods:
        if method == "uniform":
            state, chosen = average_states(states), list(range(len(states)))
            rows.append({"soup": "uniform", "chosen": chosen, "validation": score(state) if validated else float("nan")})
        elif method == "greedy":
            greedy = greedy_soup(states, score)
            state, chosen = greedy.state, greedy.chosen
            rows += [{"soup": f"{SINGLE_PREFIX}{checkpoints[i].parent.name}", "chosen": [i], "validation": v}
                     for i, v in enumerate(greedy.singles)]
            rows += [{"soup": "greedy-step", "chosen": [step["candidate"]], "validation": step["score"], "kept": step["kept"]}
                     for step in greedy.trace]
            rows.append({"soup": "greedy", "chosen": chosen, "validation": greedy.score})
        else:
            raise ValueError(f"soup.methods: unknown method {method!r} (uniform, greedy)")
        template.backbone.load_state_dict(state)
        write_folder(layout.soup(method), template.save)
    trace = pd.DataFrame(rows)
    write_output(trace, layout.soup_trace)
    return trace


# --- 05 evaluation -----------------------------------------------------------------------------

def evaluated_models(profile: Profile, run_dir: Path) -> dict[str, Path | None]:
    """Model label -> checkpoint folder (None = the base model from the profile)."""
    layout = RunLayout(run_dir)
    models: dict[str, Path | None] = {}
    if not profile.evaluation.skip_upstream_models:
        models.update({BASE: None, STAGE1: layout.stage1.final})
    models.update({path.parent.name: path for path in layout.stage2_finals()})
    soups = {soup_label(m): layout.soup(m) for m in profile.soup.methods}
    models.update({label: path for label, path in soups.items() if path.is_dir()})
    return models


def compressed_runs(label: str, encoder: TextEncoder, tasks: list[AbsTask], dims: Sequence[int],
                    quantizations: Sequence[str]) -> Iterator[tuple[str, TextEncoder, bool, list[AbsTask]]]:
    """(name, encoder, instructed, tasks) evaluations of one model: at full precision, then
    Matryoshka-truncated to each of ``dims`` (``label@dimN``) and quantised (``label@int8``,
    ``label@binary``), one task at a time. All of one task's evaluations share one
    :class:`EmbeddingCache`, so the task is encoded once, not once per compressed form; the cache
    is emptied before the next task."""
    cache = EmbeddingCache(encoder)
    variants: dict[str, TextEncoder] = {label: cache}
    variants |= {f"{label}@dim{d}": TruncatedEncoder(cache, d) for d in dims}
    variants |= {f"{label}@{q}": QuantizedEncoder(cache, q) for q in quantizations}
    for task in tasks:
        for name, model in variants.items():
            yield name, model, True, [task]
        cache.clear()


def evaluation_runs(label: str, final: str, encoder: TextEncoder, tasks: list[AbsTask],
                    cfg: EvalConfig) -> Iterator[tuple[str, TextEncoder, bool, list[AbsTask]]]:
    """The evaluations of model ``label`` (:func:`compressed_runs`): the final model at full
    precision, truncated and quantised; each single stage-2 checkpoint also truncated (so the
    Matryoshka loss's effect at small dims has one score per seed, paired across grid variants);
    any other model at full precision only."""
    if label == final:
        return compressed_runs(label, encoder, tasks, cfg.matryoshka_dims, cfg.quantizations)
    if stage2_seed(label) is not None:
        return compressed_runs(label, encoder, tasks, cfg.matryoshka_dims, [])
    return iter([(label, encoder, True, tasks)])


def run_evaluation(profile: Profile, run_dir: Path) -> pd.DataFrame:
    """Real mteb evaluation of every stage; the final model (last soup) also with compressed
    embeddings and each single stage-2 checkpoint also truncated to the Matryoshka dims; the final
    model's folder gets a model card with its scores (:func:`kalm_lib.hub.write_model_card`).

    Every model is evaluated on fresh copies of the tasks, so all see the same random draws (paired).
    The base model is scored twice: with the KaLM instructions (``base``, as every trained stage) and
    without (``base_no_instruction``, the inputs it was trained on). Per-query and per-pair values of
    every model go to ``RunLayout.per_item_scores`` (``model`` = the stage label) for
    :mod:`kalm_lib.bootstrap`. The final model's compressed forms reuse its full-precision
    embeddings task by task (:func:`evaluation_runs`): on the paper's benchmarks that is one
    encoding of each task instead of seven. Each single stage-2 checkpoint is also scored at the
    Matryoshka dims, from the same one encoding.
    """
    layout = RunLayout(run_dir)
    tasks = build_local_tasks(layout.eval_payloads("test"), profile.evaluation.local_tasks)
    tasks += evaluated_standard_tasks(profile.evaluation)
    frames, items = [], []
    models = evaluated_models(profile, run_dir)
    final = list(models)[-1]
    for label, path in models.items():
        if path is None:
            torch.manual_seed(profile.seed)  # the same base weights stage 1 started from
        encoder = load_encoder(profile.model) if path is None else encoder_from_checkpoint(path, profile.model)
        runs = evaluation_runs(label, final, encoder, tasks, profile.evaluation)
        if path is None:
            runs = itertools.chain(runs, [(BASE_NO_INSTRUCTION, encoder, False, tasks)])
        for name, model, instructed, on in runs:
            result = evaluate_model(model, on, layout.mteb, f"{profile.name}-{name}", profile.evaluation.batch_size,
                                    instructed=instructed, per_item=True)
            frames.append(result.scores.assign(stage=name))
            items.append(result.per_item.assign(model=name))
    scores = pd.concat(frames, ignore_index=True)
    write_output(scores, layout.mteb_scores)
    write_output(concat_per_item(items), layout.per_item_scores)
    if profile.evaluation.benchmarks:
        write_output(stage_benchmark_means(layout.mteb, profile.evaluation.benchmarks, scores), layout.benchmark_means)
    if models[final] is not None:
        write_model_card(profile, run_dir, final, models[final])
    return scores
