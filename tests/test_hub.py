"""Hub-ready saves: a run's prompts reproduce the study's formatting, the model card parses and
carries the scores as model-index metadata."""

from pathlib import Path

import mteb
import numpy as np
import pandas as pd
import pytest
import torch
from huggingface_hub import ModelCard
from mteb.abstasks import AbsTaskRetrieval
from mteb.models.abs_encoder import get_prompt_name
from mteb.types import PromptType
from sentence_transformers import SentenceTransformer

from kalm_lib.config import load_profile
from kalm_lib.data_cards import load_cards, write_card
from kalm_lib.encoder import load_encoder
from kalm_lib.evaluation import KalmMtebModel
from kalm_lib.hub import card_prompts, run_prompts, stages_of, task_prompts, write_model_card
from kalm_lib.instructions import format_instructed
from kalm_lib.layout import DATA_CARDS_DIR, MODEL_CARD, RunLayout
from kalm_lib.outputs import write_output

TEXTS = ["a bank lends money", "the river bank"]
OFFLINE_CARDS = load_cards(DATA_CARDS_DIR / "offline")
SCORES = pd.DataFrame([
    {"task": "KalmDefinitionRetrieval", "task_type": "Retrieval", "split": "test", "subset": "default",
     "metric": "ndcg_at_10", "score": 0.25, "is_main": True, "stage": "soup_uniform"},
    {"task": "KalmDefinitionRetrieval", "task_type": "Retrieval", "split": "test", "subset": "default",
     "metric": "ndcg_at_1", "score": 0.1, "is_main": False, "stage": "soup_uniform"},
    {"task": "KalmSynsetClustering", "task_type": "Clustering", "split": "test", "subset": "default",
     "metric": "v_measure", "score": 0.5, "is_main": True, "stage": "soup_uniform"},
    {"task": "KalmSynsetClustering", "task_type": "Clustering", "split": "test", "subset": "default",
     "metric": "v_measure", "score": 0.4, "is_main": True, "stage": "stage2_seed0"},
])


@pytest.mark.parametrize("filled", [False, True], ids=["source-cards", "filled-cards"])
def test_card_prompts_name_every_derived_card_in_mteb_style(filled, tmp_path):
    if filled:  # as curation writes them into a run (source extras nested under `extra`)
        for card in OFFLINE_CARDS.values():
            write_card(card.filled(size=8), tmp_path / f"{card.name}.yaml")
    prompts = card_prompts(load_cards(tmp_path, check_inputs=False).values() if filled else OFFLINE_CARDS.values())
    assert {"pt_gcide_definitions-query", "pt_oewn_synonyms", "ft_relation_classification-query",
            "KalmDefinitionRetrieval-query", "KalmSynonymAntonymPairClassification", "KalmSynsetClustering"} <= set(prompts)
    assert not any(name in prompts for name in ("KalmDefinitionRetrieval", "pt_gcide_definitions"))  # documents stay bare
    for card in OFFLINE_CARDS.values():
        if card.kind == "derived":
            name = card.extra.get("mteb_task", card.name) + ("" if card.symmetric else "-query")
            assert [prompts[name] + text for text in TEXTS] == [format_instructed(card.instruction, t) for t in TEXTS]


def test_mteb_applying_the_saved_prompts_formats_as_the_study_does():
    """mteb's own prompt lookup on the saved prompts gives the texts KalmMtebModel encodes, for the
    prompt types mteb passes (query and document for retrieval, none for the other task types)."""
    tasks = mteb.get_tasks(tasks=["NFCorpus", "STSBenchmark", "SprintDuplicateQuestions"])
    prompts = task_prompts(tasks)
    study = KalmMtebModel(encoder=None, model_name="check")
    for task in tasks:
        retrieval = isinstance(task, AbsTaskRetrieval)
        for prompt_type in (PromptType.query, PromptType.document) if retrieval else (None,):
            name = get_prompt_name(prompts, task.metadata, prompt_type)
            assert [prompts.get(name, "") + t for t in TEXTS] == study.format_texts(TEXTS, task.metadata, prompt_type)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder holding the offline cards (as curation writes them) and a tiny soup model."""
    layout = RunLayout(tmp_path / "run")
    for card in OFFLINE_CARDS.values():
        write_card(card.filled(size=8), layout.card(card.name))
    profile = load_profile("tiny")
    torch.manual_seed(0)
    load_encoder(profile.model, run_prompts(profile, layout.root)).save(layout.soup("uniform"))
    return layout.root


def test_model_card_parses_and_carries_the_main_scores(run_dir):
    layout, profile = RunLayout(run_dir), load_profile("tiny")
    write_output(SCORES, layout.mteb_scores)
    path = write_model_card(profile, run_dir, "soup_uniform", layout.soup("uniform"))
    assert path == layout.soup("uniform") / MODEL_CARD
    card = ModelCard.load(path)
    assert card.data.library_name == "sentence-transformers"
    scores = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert scores == {("KalmDefinitionRetrieval", "ndcg_at_10"): 0.25, ("KalmSynsetClustering", "v_measure"): 0.5}
    for fact in ("temperature 0.05, focal gamma 1", "hard-negative mixing", "Matryoshka | dims [32, 16]",
                 "uniform parameter average", "pt_gcide_definitions", "KalmDefinitionRetrieval-query", "bidirectional (decoder"):
        assert fact in card.text
    st = SentenceTransformer(str(layout.soup("uniform")), device="cpu")
    assert np.isfinite(st.encode(TEXTS, prompt_name="KalmDefinitionRetrieval-query")).all()


def test_model_card_without_scores_has_no_model_index(run_dir):
    folder = RunLayout(run_dir).soup("uniform")
    card = ModelCard.load(write_model_card(load_profile("tiny"), run_dir, "soup_uniform", folder))
    assert card.data.eval_results is None and "Not evaluated in this run." in card.text


def test_stages_of_each_saved_model():
    assert stages_of("stage1") == ["stage 1"]
    assert stages_of("stage2_seed3") == ["stage 1", "stage 2"]
    assert stages_of("soup_greedy") == ["stage 1", "stage 2", "soup"]
    with pytest.raises(ValueError, match="base"):
        stages_of("base")


@pytest.mark.slow
def test_a_run_saves_hub_ready_models(tiny_run):
    """Every saved stage of the tiny run carries the run's prompts; the final model has its card."""
    layout, profile = RunLayout(tiny_run), load_profile("tiny")
    prompts = run_prompts(profile, tiny_run)
    for folder in [layout.stage1.final, *layout.stage2_finals(), layout.soup("greedy")]:
        saved = SentenceTransformer(str(folder), device="cpu").prompts
        assert {name: saved.get(name) for name in prompts} == prompts
    card = ModelCard.load(layout.soup("greedy") / MODEL_CARD)
    assert {r.dataset_name for r in card.data.eval_results} == set(profile.evaluation.local_tasks)
