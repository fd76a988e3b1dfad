"""The ``gpu-rehearsal`` profile: the GPU profile with only its sizes shrunk, and its fixtures.

``gpu-rehearsal`` runs the paper's GPU setting (``gpu-qwen2-0.5b``) on a CPU, through the same
notebooks and code paths, on local stand-ins: the hub source cards read ``tests/fixtures/hub``, the
backbone is the Qwen2 checkpoint in ``tests/fixtures/qwen2-rehearsal`` and the standard mteb task
reads its hub-layout copy in ``tests/fixtures/mteb``. The whole series runs here (``slow``).
"""

import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from mteb.abstasks import AbsTaskRetrieval

from kalm_lib.config import load_profile
from kalm_lib.data_cards import load_cards
from kalm_lib.encoder import load_encoder
from kalm_lib.layout import BASE, BASE_NO_INSTRUCTION, REPO_ROOT, STAGE1, RunLayout, soup_label, stage2_label
from kalm_lib.mining import needs_mining
from kalm_lib.mteb_tasks import build_local_tasks, local_copy_folder, standard_tasks
from kalm_lib.pipeline import run_soup
from kalm_lib.runner import run_series

GPU, REHEARSAL = "gpu-qwen2-0.5b", "gpu-rehearsal"
FIXTURES = REPO_ROOT / "tests" / "fixtures"
MODEL = FIXTURES / "qwen2-rehearsal"

# Every key in which the rehearsal may differ from the GPU profile, and why. Nothing else may.
SIZE_KEYS = {
    "name",  # the profile's own name
    # fixture location: the hub sources' Parquet stand-ins (exact hub schemas, 6 rows each)
    "data.hub_files_dir",
    # mining window scaled to the fixture pool: a stage-2 set ranks at most 12 candidates, not 50-100
    "data.hard_negative_rank_min",
    "data.hard_negative_rank_max",
    # the stand-in backbone is random, so it ranks positives at random: the ranking-consistency
    # filter (meaningful with a pretrained Qwen2) would drop rows at random until a set held fewer
    # than one batch; with it off the mining code still runs end to end
    "data.mining_consistency_filter",
    # model config: Qwen2-0.5B's architecture and config with the sizes shrunk, a local checkpoint
    "model.name_or_path",
    # toy step counts and batches (GradCache still splits each batch into 2 mini-batches)
    "pretrain.steps",
    "pretrain.batch_size",
    "pretrain.mini_batch_size",
    "pretrain.checkpoint_every",  # once per stage (its last step): the resumable state is written and pruned as on a long run
    "finetune.steps",
    "finetune.batch_size",
    "finetune.mini_batch_size",
    "finetune.checkpoint_every",
    "finetune.seeds",  # seeds count: a soup of 2 stage-2 runs, not 4
    # evaluation task list: one task of MTEB(eng, v1) (SciFact) instead of both whole benchmarks,
    # read by mteb from a hub-layout copy of its dataset
    "evaluation.benchmarks",
    "evaluation.standard_tasks",
    "evaluation.task_data_dir",
}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of a nested dict (lists are values)."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return flat


def test_rehearsal_differs_from_the_gpu_profile_only_in_size_keys():
    gpu, rehearsal = (flatten(load_profile(name).to_dict()) for name in (GPU, REHEARSAL))
    assert gpu.keys() == rehearsal.keys()
    differing = {key for key in gpu if gpu[key] != rehearsal[key]}
    assert differing - SIZE_KEYS == set(), "only the documented size keys may differ"
    assert SIZE_KEYS - differing == set(), "an allowlisted key no longer differs: drop it from SIZE_KEYS"


def test_rehearsal_keeps_the_gpu_code_path_switches():
    model = load_profile(REHEARSAL).model
    assert (model.bidirectional, model.attn_implementation, model.bf16, model.gradient_checkpointing) == (True, "sdpa", True, True)
    assert not model.random_init  # loaded with from_pretrained, as the hub model is
    profile = load_profile(REHEARSAL)
    assert profile.pretrain.mini_batch_size < profile.pretrain.batch_size  # GradCache really chunks
    assert profile.finetune.mini_batch_size < profile.finetune.batch_size


def make_model_module():
    spec = importlib.util.spec_from_file_location("make_model", MODEL / "make_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_fixture_is_what_its_script_writes(tmp_path):
    make_model_module().write_model(tmp_path)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (tmp_path / name).read_bytes() == (MODEL / name).read_bytes(), name


def test_model_fixture_is_a_shrunk_qwen2_0_5b_checkpoint():
    config = json.loads((MODEL / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["dtype"] == "bfloat16" and config["tie_word_embeddings"]
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (896, 14, 2)
    encoder = load_encoder(load_profile(REHEARSAL).model)
    assert type(encoder.backbone).__name__ == "Qwen2Model" and type(encoder.tokenizer).__name__ == "Qwen2Tokenizer"
    ids = encoder.token_ids(["Vitamin D pills prevent hip fractures."])[0]
    assert encoder.tokenizer.eos_token == encoder.tokenizer.pad_token == "<|endoftext|>" and ids[-1] != encoder.tokenizer.eos_token_id
    assert encoder.encode(["a", "b c"]).shape == (2, 896)


def test_standard_task_reads_the_local_copy_of_its_hub_dataset():
    (task,) = standard_tasks(["SciFact"], data_dir=FIXTURES / "mteb")
    assert isinstance(task, AbsTaskRetrieval) and type(task).__name__ == "SciFact"
    assert task.metadata.dataset["path"] == str(FIXTURES / "mteb" / "mteb__scifact")
    task.load_data()
    split = task.dataset["default"]["test"]
    assert len(split["corpus"]) == 8 and set(split["relevant_docs"]) == {"1", "3", "5", "7"}
    assert sorted(split["queries"]["id"]) == ["1", "3", "5", "7"]  # mteb keeps the queries with test qrels


def test_missing_local_copy_names_the_task_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"NFCorpus: no local copy of hub dataset 'mteb/nfcorpus': {tmp_path}/mteb__nfcorpus"):
        standard_tasks(["NFCorpus"], data_dir=tmp_path)
    assert local_copy_folder(tmp_path, "mteb/scifact") == tmp_path / "mteb__scifact"


def test_no_local_tasks_need_no_evaluation_folder(tmp_path):
    """Bug: run_evaluation built the profile's local tasks from the curated evaluation folder even
    when it names none (the GPU profile: ``local_tasks: []``), and the hub cards write no such folder."""
    assert build_local_tasks(tmp_path / "no-eval-folder", []) == []
    with pytest.raises(FileNotFoundError, match="evaluation folder not found"):
        build_local_tasks(tmp_path / "no-eval-folder", ["KalmDefinitionRetrieval"])


@pytest.fixture
def run_without_validation(tmp_path) -> Path:
    """A run folder like the hub cards leave one: two stage-2 checkpoints, no evaluation payloads."""
    profile = load_profile("tiny")
    layout = RunLayout(tmp_path)
    for seed in (0, 1):
        torch.manual_seed(seed)
        load_encoder(profile.model).save(layout.stage2(seed).final)
    layout.metrics.mkdir(parents=True)
    return tmp_path


def test_uniform_soup_needs_no_validation_task(run_without_validation):
    """Bug: run_soup scored every soup on the validation payloads, which the paper's hub cards
    never write, so the GPU profile's uniform soup stopped with FileNotFoundError."""
    trace = run_soup(load_profile("tiny", {"soup.methods": ["uniform"]}), run_without_validation)
    assert trace["soup"].tolist() == ["uniform"] and math.isnan(trace["validation"].iloc[0])
    assert (RunLayout(run_without_validation).soup("uniform") / "model.safetensors").is_file()


def test_greedy_soup_without_validation_task_is_refused_before_any_work(run_without_validation):
    with pytest.raises(FileNotFoundError, match="define no evaluation sets; use soup.methods: \\[uniform\\]"):
        run_soup(load_profile("tiny", {"soup.methods": ["uniform", "greedy"]}), run_without_validation)
    assert not RunLayout(run_without_validation).soup("uniform").exists()


@pytest.fixture(scope="module")
def rehearsal_run(tmp_path_factory) -> tuple[Path, float]:
    """The whole series on the rehearsal profile, with its wall time in seconds."""
    began = time.perf_counter()
    run = run_series(REHEARSAL, tmp_path_factory.mktemp("rehearsal"), name="rehearsal")
    return run, time.perf_counter() - began


@pytest.mark.slow
def test_rehearsal_series_runs_the_gpu_path(rehearsal_run):
    run, seconds = rehearsal_run
    print(f"gpu-rehearsal series: {seconds:.0f} s")
    layout = RunLayout(run)
    summary = pd.read_csv(layout.curation_summary)
    assert sorted(summary["set"]) == sorted(p.stem for p in (REPO_ROOT / "data_cards" / "paper" / "derived").glob("*.yaml"))
    quality = pd.read_csv(layout.mining_quality)
    cards = load_cards(REPO_ROOT / "data_cards" / "paper")
    mined = sorted(name for name, card in cards.items() if card.kind == "derived" and needs_mining(card))
    assert "ft_hub_msmarco_triplets" in mined and sorted(quality["set"]) == mined
    profile = load_profile(REHEARSAL)
    histories = [STAGE1, *(stage2_label(seed) for seed in profile.finetune.seeds)]
    for label in histories:
        history = json.loads(layout.history(label).read_text())
        assert len(history) == (profile.pretrain if label == STAGE1 else profile.finetune).steps
        assert all(math.isfinite(step["loss"]) for step in history)
    assert (layout.soup("uniform") / "model.safetensors").is_file()
    scores = pd.read_csv(layout.mteb_scores)
    main = scores[scores["is_main"]]
    assert set(main["task"]) == {"SciFact"}
    final = soup_label("uniform")
    expected = {BASE, BASE_NO_INSTRUCTION, STAGE1, *histories[1:], final,
                *(f"{model}@dim{d}" for model in [final, *histories[1:]] for d in profile.evaluation.matryoshka_dims),
                *(f"{final}@{q}" for q in profile.evaluation.quantizations)}
    assert set(main["stage"]) == expected
    assert layout.report_html.is_file() and json.loads(layout.manifest.read_text())["profile"] == REHEARSAL
