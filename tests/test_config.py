"""Profiles and overrides: valid ones load, bad ones fail naming the problem."""

from pathlib import Path

import pytest

from kalm_lib.ablations import load_grid
from kalm_lib.config import ConfigError, available_profiles, load_profile, profile_path
from kalm_lib.layout import REPO_ROOT
from kalm_lib.runner import run_series


def test_shipped_profiles_load():
    assert {"cpu", "tiny", "gpu-qwen2-0.5b"} <= set(available_profiles())
    for name in available_profiles():
        assert load_profile(name).name == name


@pytest.mark.parametrize("grid", sorted((REPO_ROOT / "kalm_lib" / "grids").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_grids_overrides_validate(grid):
    assert load_grid(grid).variants  # load_grid loads the profile with every run's overrides


def test_paper_profile_is_the_papers_setting():
    gpu = load_profile("gpu-qwen2-0.5b")
    assert gpu.model.name_or_path == "Qwen/Qwen2-0.5B"
    assert gpu.model.bidirectional and gpu.model.pooling == "mean" and gpu.model.bf16
    assert gpu.data.hard_negatives == 7
    assert (gpu.data.hard_negative_rank_min, gpu.data.hard_negative_rank_max) == (50, 100)


def test_overrides_are_applied_and_typed():
    cfg = load_profile("tiny", {"finetune.focal_gamma": 2, "model.pooling": "last"})
    assert cfg.finetune.focal_gamma == 2.0 and isinstance(cfg.finetune.focal_gamma, float)
    assert cfg.model.pooling == "last"


def test_unknown_profile_names_the_choices():
    with pytest.raises(ConfigError, match="unknown profile 'nope'.*cpu"):
        load_profile("nope")


def test_unknown_parameter_is_named():
    with pytest.raises(ConfigError, match=r"tiny.yaml: unknown parameter\(s\) \['finetune.gama'\]"):
        load_profile("tiny", {"finetune.gama": 1.0})


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="optimiser"):
        load_profile("tiny", {"optimiser.lr": 1.0})


def test_an_override_below_a_value_names_the_profile_and_key():
    with pytest.raises(ConfigError) as info:
        load_profile("tiny", {"finetune.steps.max": 1})
    assert str(info.value) == f"{profile_path('tiny')}: override 'finetune.steps.max': 'steps' is not a section"


def test_missing_profile_file(tmp_path):
    with pytest.raises(ConfigError, match="profile file not found"):
        load_profile(str(tmp_path / "missing.yaml"))


# (dotted key, bad value, the message after "<profile path>: "): one case per check in config.py
BAD_VALUES = [
    # types, list items included
    ("finetune.steps", "ten", "finetune.steps must be an integer, got 'ten'"),
    ("finetune.hard_negative_mixing", 1, "finetune.hard_negative_mixing must be true or false, got 1"),
    ("finetune.learning_rate", True, "finetune.learning_rate must be a number, got True"),
    ("finetune.seeds", [0, "1"], "finetune.seeds[1] must be an integer, got '1'"),
    ("finetune.matryoshka_weights", [1.0, "x"], "finetune.matryoshka_weights[1] must be a number, got 'x'"),
    ("evaluation.local_tasks", [3], "evaluation.local_tasks[0] must be a string, got 3"),
    ("evaluation.matryoshka_dims", 16, "evaluation.matryoshka_dims must be a list, got 16"),
    ("finetune", 3, "finetune must be a mapping of parameters, got 3"),
    # profile
    ("seed", -1, "seed must be >= 0, got -1"),
    ("threads", -1, "threads must be >= 0, got -1"),
    # data
    ("data.eval_word_fraction", 0.0, "data.eval_word_fraction must be in (0, 1), got 0.0"),
    ("data.eval_word_fraction", 1, "data.eval_word_fraction must be in (0, 1), got 1.0"),
    ("data.max_stage1_pairs_per_source", 0, "data.max_stage1_pairs_per_source must be >= 1, got 0"),
    ("data.max_stage2_per_source", 0, "data.max_stage2_per_source must be >= 1, got 0"),
    ("data.min_chars", 0, "data.min_chars must be >= 1, got 0"),
    ("data.max_chars", 1, "data.max_chars must be >= min_chars (2), got 1"),
    ("data.near_dup_threshold", 0.0, "data.near_dup_threshold must be in (0, 1], got 0.0"),
    ("data.eval_near_dup_threshold", 1.5, "data.eval_near_dup_threshold must be in (0, 1], got 1.5"),
    ("data.sample_seed", -3, "data.sample_seed must be >= 0, got -3"),
    ("data.eval_retrieval_queries", 0, "data.eval_retrieval_queries must be >= 1, got 0"),
    ("data.eval_pairs", 0, "data.eval_pairs must be >= 1, got 0"),
    ("data.eval_clusters", 0, "data.eval_clusters must be >= 1, got 0"),
    ("data.hard_negatives", -1, "data.hard_negatives must be >= 0, got -1"),
    ("data.hard_negative_rank_min", -1, "data.hard_negative_rank_min must be >= 0, got -1"),
    ("data.hard_negative_rank_max", 2, "data.hard_negative_rank_max must be > hard_negative_rank_min (2), got 2"),
    ("data.mining_score_decimals", -1, "data.mining_score_decimals must be >= 0, got -1"),
    ("data.mining_pool_max", -1, "data.mining_pool_max must be >= 0, got -1"),
    # model
    ("model.attn_implementation", "flash", "model.attn_implementation must be one of ('sdpa', 'eager', 'flash_attention_2'), got 'flash'"),
    ("model.pooling", "max", "model.pooling must be one of ('mean', 'last', 'cls'), got 'max'"),
    ("soup.methods", ["uniform", "bogus"], "soup.methods must be a list of ('uniform', 'greedy'), got ['uniform', 'bogus']"),
    ("evaluation.quantizations", ["int4"], "evaluation.quantizations must be a list of ('int8', 'binary'), got ['int4']"),
    ("model.max_length", 0, "model.max_length must be >= 1, got 0"),
    # pretrain / finetune
    ("finetune.steps", -1, "finetune.steps must be >= 0, got -1"),
    ("finetune.mini_batch_size", -4, "finetune.mini_batch_size must be >= 0, got -4"),
    ("finetune.checkpoint_every", -1, "finetune.checkpoint_every must be >= 0, got -1"),
    ("pretrain.batch_size", 0, "pretrain.batch_size must be >= 1, got 0"),
    ("finetune.chunk_tokens", 0, "finetune.chunk_tokens must be >= 1, got 0"),
    ("finetune.keep_checkpoints", 0, "finetune.keep_checkpoints must be >= 1, got 0"),
    ("pretrain.learning_rate", 0, "pretrain.learning_rate must be > 0, got 0.0"),
    ("finetune.temperature", 0.0, "finetune.temperature must be > 0, got 0.0"),
    ("pretrain.temperature", -0.05, "pretrain.temperature must be > 0, got -0.05"),
    ("finetune.grad_clip", 0, "finetune.grad_clip must be > 0, got 0.0"),
    ("finetune.weight_decay", -0.1, "finetune.weight_decay must be >= 0, got -0.1"),
    ("finetune.focal_gamma", -0.5, "finetune.focal_gamma must be >= 0, got -0.5"),
    ("finetune.warmup_ratio", 1.5, "finetune.warmup_ratio must be in [0, 1], got 1.5"),
    ("finetune.mixing_top_k", 0, "finetune.mixing_top_k must be >= 1, got 0"),
    ("finetune.mixing_pairs", -1, "finetune.mixing_pairs must be >= 0, got -1"),
    ("finetune.mixing_query", -1, "finetune.mixing_query must be >= 0, got -1"),
    ("finetune.mixing_query_beta_max", 0.6, "finetune.mixing_query_beta_max must be in [0, 0.5], got 0.6"),
    ("finetune.mixing_query_beta_max", -0.1, "finetune.mixing_query_beta_max must be in [0, 0.5], got -0.1"),
    ("finetune.seeds", [0, -1], "finetune.seeds must be a list of seeds >= 0, got [0, -1]"),
    # evaluation
    ("evaluation.batch_size", 0, "evaluation.batch_size must be >= 1, got 0"),
    ("evaluation.matryoshka_dims", [16, 0], "evaluation.matryoshka_dims must be positive, got [16, 0]"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_values_stop_the_profile_naming_path_and_field(key, value, message):
    with pytest.raises(ConfigError) as info:
        load_profile("tiny", {key: value})
    assert str(info.value) == f"{profile_path('tiny')}: {message}"


@pytest.mark.parametrize(
    ("dims", "weights", "message"),
    [
        ([32, 16], [1.0], "finetune.matryoshka_weights must be one weight per matryoshka_dims entry [32, 16], got [1.0]"),
        ([16, 32], [1.0, 0.3], "finetune.matryoshka_dims must be positive and strictly decreasing, got [16, 32]"),
        ([32, 0], [1.0, 0.3], "finetune.matryoshka_dims must be positive and strictly decreasing, got [32, 0]"),
        ([32], [0.0], "finetune.matryoshka_weights must be > 0, got [0.0]"),
    ],
)
def test_matryoshka_settings_are_checked_when_the_profile_loads(dims, weights, message):
    with pytest.raises(ConfigError) as info:
        load_profile("tiny", {"finetune.matryoshka_dims": dims, "finetune.matryoshka_weights": weights})
    assert str(info.value) == f"{profile_path('tiny')}: {message}"


@pytest.mark.parametrize(
    "overrides",
    [
        {"model.attn_implementation": "flash_attention_2"},
        {"model.attn_implementation": "eager"},
        {"finetune.steps": 0, "finetune.checkpoint_every": 0, "finetune.mini_batch_size": 0, "finetune.focal_gamma": 0},
        {"finetune.mixing_query_beta_max": 0.5, "finetune.mixing_pairs": 0, "finetune.mixing_query": 0},
        {"data.hard_negative_rank_min": 0, "data.hard_negative_rank_max": 1, "data.eval_word_fraction": 0.5},
        {"finetune.matryoshka_dims": [], "finetune.matryoshka_weights": []},
    ],
)
def test_boundary_values_load(overrides):
    load_profile("tiny", overrides)


def test_a_bad_value_stops_the_series_before_any_work(tmp_path: Path):
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match=r"tiny.yaml: finetune.temperature must be > 0, got 0.0"):
        run_series("tiny", runs, "r", overrides={"finetune.temperature": 0.0})
    assert not runs.exists()


def test_a_bad_value_in_the_profile_file_names_that_file(tmp_path: Path):
    path = tmp_path / "mine.yaml"
    path.write_text("finetune:\n  temperature: 0\n")
    with pytest.raises(ConfigError) as info:
        load_profile(str(path))
    assert str(info.value) == f"{path}: finetune.temperature must be > 0, got 0.0"


def test_optional_fields_take_none_or_their_type():
    assert load_profile("tiny").data.sample_seed is None
    assert load_profile("tiny", {"data.sample_seed": 3}).data.sample_seed == 3
    with pytest.raises(ConfigError, match="data.sample_seed must be an integer, got 'three'"):
        load_profile("tiny", {"data.sample_seed": "three"})


def test_config_name_lists_match_the_modules_that_use_them():
    """The names config validates at load are the ones the code accepts (the modules' Literal types)."""
    from typing import get_args

    from kalm_lib.config import POOLING_MODES, QUANTIZATIONS
    from kalm_lib.evaluation import Quantization
    from kalm_lib.pooling import PoolingMode

    assert get_args(PoolingMode) == POOLING_MODES and get_args(Quantization) == QUANTIZATIONS
