"""One function per notebook stage; each reads and writes only inside the run folder.

Layout of a run folder::

    data/        curated shards, eval + validation payloads, filled data cards, summary
    checkpoints/ stage1/final, stage2_seed{S}/final, soup_uniform, soup_greedy
    metrics/     one JSON/CSV per stage (loss curves, checks, scores)
    mteb/        mteb's own result folder
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .bidirectional import first_token_sensitivity
from .config import REPO_ROOT, ConfigError, ModelConfig, Profile, load_profile
from .curation import curate, load_train_sets, write_curated
from .distributed import world
from .encoder import Encoder, encoder_from_checkpoint, load_backbone, load_encoder
from .evaluation import QuantizedEncoder, TruncatedEncoder, evaluate_model
from .mining import mine_hard_negatives
from .mteb_tasks import build_local_tasks, standard_tasks
from .soup import average_states, greedy_soup, load_state
from .training import StageResult, train_stage

DEMO_DECODER = {
    "model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 128,
}


def is_main_process() -> bool:
    """True on the process that writes run-level files (the only one without torch.distributed)."""
    return world()[0] == 0


def write_json(payload: object, path: Path) -> None:
    """Write JSON (creating parent folders) from the main process only."""
    if not is_main_process():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write a table as CSV (creating parent folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)


def open_run(profile: str, run_dir: str | Path, overrides: dict | None = None) -> tuple[Profile, Path]:
    """Resolve a notebook's parameters: the validated profile and the run folder (created)."""
    cfg = load_profile(profile, overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    path = Path(run_dir)
    path = path if path.is_absolute() else REPO_ROOT / path
    (path / "metrics").mkdir(parents=True, exist_ok=True)
    return cfg, path


# --- 00 data curation ----------------------------------------------------------------------------

def run_curation(profile: Profile, run_dir: Path) -> pd.DataFrame:
    """Curate every derived card, mine stage-2 hard negatives with the base model, write shards."""
    data_dir = run_dir / "data"
    result = curate(profile.data, profile.seed, REPO_ROOT / profile.data.cards_dir)
    synonyms = _related_words(result.sources.get("oewn_synonyms"), "synonym")
    torch.manual_seed(profile.seed)
    encoder = load_encoder(profile.model)
    rng = np.random.default_rng(profile.seed)
    for name, frame in result.train.items():
        card = result.cards[name]
        if card.stage == "finetune" and card.task_type != "classification":
            result.train[name] = mine_hard_negatives(
                frame, card, encoder, profile.data.hard_negatives, profile.data.hard_negative_rank_min,
                profile.data.hard_negative_rank_max, rng, exclude=synonyms,
            )
    return write_curated(result, data_dir)


def _related_words(frame: pd.DataFrame | None, column: str) -> dict[str, set[str]]:
    """word -> words related to it in both directions (mining never uses them as negatives)."""
    related: dict[str, set[str]] = {}
    if frame is None:
        return related
    for a, b in zip(frame["word"], frame[column]):
        related.setdefault(a, set()).add(b)
        related.setdefault(b, set()).add(a)
    return related


# --- 01 bidirectional conversion -------------------------------------------------------------

def bidirectional_report(profile: Profile) -> pd.DataFrame:
    """First-token sensitivity with causal and with bidirectional attention, for the profile's
    model and for a Qwen2 decoder built from a config.

    The sensitivity is the change of the first token's hidden state when the last token changes:
    0 under causal attention, > 0 once attention is bidirectional. An encoder has no causal form
    (NaN in that column).
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
    return pd.DataFrame(rows, columns=["model", "architecture", "sensitivity_causal", "sensitivity_bidirectional"])


# --- 02 / 03 training --------------------------------------------------------------------------

def stage1_dir(run_dir: Path) -> Path:
    """Where stage 1's final encoder lives."""
    return run_dir / "checkpoints" / "stage1" / "final"


def stage2_dirs(run_dir: Path) -> list[Path]:
    """Final folders of every stage-2 seed, sorted."""
    return sorted((run_dir / "checkpoints").glob("stage2_seed*/final"))


def run_pretraining(profile: Profile, run_dir: Path) -> StageResult:
    """Stage 1: InfoNCE with in-batch negatives on the weakly supervised pairs."""
    torch.manual_seed(profile.seed)  # a randomly initialised backbone starts from the profile's seed
    encoder = load_encoder(profile.model)
    if not profile.pretrain.enabled:
        if is_main_process():
            encoder.save(stage1_dir(run_dir))
        return StageResult(final_dir=stage1_dir(run_dir))
    sets = load_train_sets(run_dir / "data", "pretrain")
    result = train_stage(encoder, sets, profile.pretrain, stage1_dir(run_dir).parent, profile.seed, profile.model.bf16)
    write_json(result.history, run_dir / "metrics" / "stage1_history.json")
    return result


def run_finetuning(profile: Profile, run_dir: Path) -> list[StageResult]:
    """Stage 2, once per seed: hard negatives, focal reweighting, hard-negative mixing."""
    sets = load_train_sets(run_dir / "data", "finetune")
    results = []
    for seed in profile.finetune.seeds:
        encoder = encoder_from_checkpoint(stage1_dir(run_dir), profile.model)
        out = run_dir / "checkpoints" / f"stage2_seed{seed}"
        result = train_stage(encoder, sets, profile.finetune, out, seed, profile.model.bf16)
        write_json(result.history, run_dir / "metrics" / f"stage2_seed{seed}_history.json")
        results.append(result)
    return results


# --- 04 soup -----------------------------------------------------------------------------------

def validation_score(encoder: Encoder, profile: Profile, run_dir: Path, name: str) -> float:
    """Main score of the soup-selection task on the validation split (never the test split)."""
    tasks = build_local_tasks(run_dir / "data" / "validation", [profile.soup.selection_task])
    frame = evaluate_model(encoder, tasks, run_dir / "mteb_validation", name, profile.evaluation.batch_size)
    return float(frame.loc[frame["is_main"], "score"].iloc[0])


def run_soup(profile: Profile, run_dir: Path) -> pd.DataFrame:
    """Uniform and/or greedy soup of the stage-2 checkpoints; returns the selection trace."""
    checkpoints = stage2_dirs(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir}: no stage-2 checkpoints; run 03_finetuning first")
    states = [load_state(path) for path in checkpoints]
    template = encoder_from_checkpoint(checkpoints[0], profile.model)
    rows = []

    def score(state: dict) -> float:
        template.backbone.load_state_dict(state)
        return validation_score(template, profile, run_dir, "soup-candidate")

    for method in profile.soup.methods:
        if method == "uniform":
            state, chosen = average_states(states), list(range(len(states)))
            rows.append({"soup": "uniform", "chosen": chosen, "validation": score(state)})
        elif method == "greedy":
            greedy = greedy_soup(states, score)
            state, chosen = greedy.state, greedy.chosen
            rows += [{"soup": f"single:{checkpoints[i].parent.name}", "chosen": [i], "validation": v} for i, v in enumerate(greedy.singles)]
            rows += [{"soup": "greedy-step", "chosen": [step["candidate"]], "validation": step["score"], "kept": step["kept"]} for step in greedy.trace]
            rows.append({"soup": "greedy", "chosen": chosen, "validation": greedy.score})
        else:
            raise ValueError(f"soup.methods: unknown method {method!r} (uniform, greedy)")
        template.backbone.load_state_dict(state)
        template.save(run_dir / "checkpoints" / f"soup_{method}")
    trace = pd.DataFrame(rows)
    trace.to_csv(run_dir / "metrics" / "soup_trace.csv", index=False)
    return trace


# --- 05 evaluation -----------------------------------------------------------------------------

def evaluated_models(profile: Profile, run_dir: Path) -> dict[str, Path | None]:
    """Model label -> checkpoint folder (None = the base model from the profile)."""
    models: dict[str, Path | None] = {}
    if not profile.evaluation.skip_upstream_models:
        models.update({"base": None, "stage1": stage1_dir(run_dir)})
    models.update({path.parent.name: path for path in stage2_dirs(run_dir)})
    soups = {f"soup_{m}": run_dir / "checkpoints" / f"soup_{m}" for m in profile.soup.methods}
    models.update({label: path for label, path in soups.items() if path.is_dir()})
    return models


def run_evaluation(profile: Profile, run_dir: Path) -> pd.DataFrame:
    """Real mteb evaluation of every stage; the final model (last soup) also with compressed embeddings."""
    tasks = build_local_tasks(run_dir / "data" / "eval", profile.evaluation.local_tasks)
    if profile.evaluation.standard_tasks or profile.evaluation.benchmark:
        tasks += standard_tasks(profile.evaluation.benchmark or profile.evaluation.standard_tasks)
    frames = []
    models = evaluated_models(profile, run_dir)
    for label, path in models.items():
        if path is None:
            torch.manual_seed(profile.seed)  # the same base weights stage 1 started from
        encoder = load_encoder(profile.model) if path is None else encoder_from_checkpoint(path, profile.model)
        variants = {label: encoder}
        if label == list(models)[-1]:
            variants.update({f"{label}@dim{d}": TruncatedEncoder(encoder, d) for d in profile.evaluation.matryoshka_dims})
            variants.update({f"{label}@{q}": QuantizedEncoder(encoder, q) for q in profile.evaluation.quantizations})
        for name, model in variants.items():
            frame = evaluate_model(model, tasks, run_dir / "mteb", f"{profile.name}-{name}", profile.evaluation.batch_size)
            frames.append(frame.assign(stage=name))
    scores = pd.concat(frames, ignore_index=True)
    scores.to_csv(run_dir / "metrics" / "mteb_scores.csv", index=False)
    return scores
