"""One ``run_<stage>(profile, run_dir)`` per notebook; each reads and writes only inside the run
folder, at the paths :class:`kalm_lib.layout.RunLayout` names, and returns what its notebook shows.

    notebook  function                 writes (RunLayout attributes)
    00        run_curation             data: shard, eval_payloads, card, curation_summary
    01        run_bidirectional_check  bidirectional_check
    02        run_pretraining          stage1, history("stage1")
    03        run_finetuning           stage2(seed), history(stage2_label(seed))
    04        run_soup                 soup(method), soup_trace, mteb_validation
    05        run_evaluation           mteb, mteb_scores

Notebook 06 reads them back through :mod:`kalm_lib.report`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .bidirectional import first_token_sensitivity
from .config import ConfigError, ModelConfig, Profile, load_profile
from .curation import curate, load_train_sets, task_texts, write_curated
from .encoder import Encoder, encoder_from_checkpoint, load_backbone, load_encoder
from .evaluation import QuantizedEncoder, TruncatedEncoder, evaluate_model
from .layout import REPO_ROOT, STAGE1, RunLayout, soup_label, stage2_label
from .mining import mine_hard_negatives
from .mteb_tasks import build_local_tasks, standard_tasks
from .outputs import is_main_process, write_output
from .soup import average_states, greedy_soup, load_state
from .training import StageResult, train_stage

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
    """Curate every derived card, mine stage-2 hard negatives with the base model, write shards."""
    evaluated = profile.evaluation.benchmark or profile.evaluation.standard_tasks
    external = task_texts(standard_tasks(evaluated)) if evaluated else frozenset()
    result = curate(profile.data, profile.seed, REPO_ROOT / profile.data.cards_dir, extra_eval_texts=external)
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
    return write_curated(result, RunLayout(run_dir))


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
    """Stage 1: InfoNCE with in-batch negatives on the weakly supervised pairs."""
    layout = RunLayout(run_dir)
    torch.manual_seed(profile.seed)  # a randomly initialised backbone starts from the profile's seed
    encoder = load_encoder(profile.model)
    if not profile.pretrain.enabled:
        if is_main_process():
            encoder.save(layout.stage1.final)
        return StageResult(final_dir=layout.stage1.final)
    sets = load_train_sets(layout, "pretrain")
    result = train_stage(encoder, sets, profile.pretrain, layout.stage1.root, profile.seed, profile.model.bf16)
    write_output(result.history, layout.history(STAGE1))
    return result


def run_finetuning(profile: Profile, run_dir: Path) -> list[StageResult]:
    """Stage 2, once per seed: hard negatives, focal reweighting, hard-negative mixing."""
    layout = RunLayout(run_dir)
    sets = load_train_sets(layout, "finetune")
    results = []
    for seed in profile.finetune.seeds:
        encoder = encoder_from_checkpoint(layout.stage1.final, profile.model)
        result = train_stage(encoder, sets, profile.finetune, layout.stage2(seed).root, seed, profile.model.bf16)
        write_output(result.history, layout.history(stage2_label(seed)))
        results.append(result)
    return results


# --- 04 soup -----------------------------------------------------------------------------------

def validation_score(encoder: Encoder, profile: Profile, run_dir: Path, name: str) -> float:
    """Main score of the soup-selection task on the validation split (never the test split)."""
    layout = RunLayout(run_dir)
    tasks = build_local_tasks(layout.eval_payloads("validation"), [profile.soup.selection_task])
    frame = evaluate_model(encoder, tasks, layout.mteb_validation, name, profile.evaluation.batch_size)
    return float(frame.loc[frame["is_main"], "score"].iloc[0])


def run_soup(profile: Profile, run_dir: Path) -> pd.DataFrame:
    """Uniform and/or greedy soup of the stage-2 checkpoints; returns the selection trace."""
    layout = RunLayout(run_dir)
    checkpoints = layout.stage2_finals()
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
            rows += [{"soup": "greedy-step", "chosen": [step["candidate"]], "validation": step["score"], "kept": step["kept"]}
                     for step in greedy.trace]
            rows.append({"soup": "greedy", "chosen": chosen, "validation": greedy.score})
        else:
            raise ValueError(f"soup.methods: unknown method {method!r} (uniform, greedy)")
        template.backbone.load_state_dict(state)
        if is_main_process():
            template.save(layout.soup(method))
    trace = pd.DataFrame(rows)
    write_output(trace, layout.soup_trace)
    return trace


# --- 05 evaluation -----------------------------------------------------------------------------

def evaluated_models(profile: Profile, run_dir: Path) -> dict[str, Path | None]:
    """Model label -> checkpoint folder (None = the base model from the profile)."""
    layout = RunLayout(run_dir)
    models: dict[str, Path | None] = {}
    if not profile.evaluation.skip_upstream_models:
        models.update({"base": None, STAGE1: layout.stage1.final})
    models.update({path.parent.name: path for path in layout.stage2_finals()})
    soups = {soup_label(m): layout.soup(m) for m in profile.soup.methods}
    models.update({label: path for label, path in soups.items() if path.is_dir()})
    return models


def run_evaluation(profile: Profile, run_dir: Path) -> pd.DataFrame:
    """Real mteb evaluation of every stage; the final model (last soup) also with compressed embeddings."""
    layout = RunLayout(run_dir)
    tasks = build_local_tasks(layout.eval_payloads("test"), profile.evaluation.local_tasks)
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
            frame = evaluate_model(model, tasks, layout.mteb, f"{profile.name}-{name}", profile.evaluation.batch_size)
            frames.append(frame.assign(stage=name))
    scores = pd.concat(frames, ignore_index=True)
    write_output(scores, layout.mteb_scores)
    return scores
