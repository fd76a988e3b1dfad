"""Profiles and overrides: valid ones load, bad ones fail naming the problem."""

import pytest

from kalm_lib.config import ConfigError, available_profiles, load_profile


def test_shipped_profiles_load():
    assert {"cpu", "tiny", "gpu-qwen2-0.5b"} <= set(available_profiles())
    for name in available_profiles():
        assert load_profile(name).name == name


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
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['gama'\]"):
        load_profile("tiny", {"finetune.gama": 1.0})


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="optimiser"):
        load_profile("tiny", {"optimiser.lr": 1.0})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("finetune.steps", "ten", "TrainConfig.steps: expected int"),
        ("finetune.hard_negative_mixing", 1, "expected true/false"),
        ("finetune.learning_rate", True, "expected a number"),
    ],
)
def test_wrong_types_are_rejected(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_profile("tiny", {key: value})


def test_missing_profile_file(tmp_path):
    with pytest.raises(ConfigError, match="profile file not found"):
        load_profile(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("finetune.chunk_tokens", 0, r"finetune:TrainConfig: chunk_tokens must be >= 1, got 0"),
        ("pretrain.batch_size", 0, r"pretrain:TrainConfig: batch_size must be >= 1"),
        ("finetune.mini_batch_size", -4, r"finetune:TrainConfig: mini_batch_size must be >= 0"),
    ],
)
def test_out_of_range_values_are_named(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_profile("tiny", {key: value})


@pytest.mark.parametrize(
    ("dims", "weights", "message"),
    [([384, 256], [1.0], "one weight per dim"), ([128, 256], [1.0, 0.3], "strictly decreasing"), ([384], [0.0], "> 0")],
)
def test_matryoshka_settings_are_checked_when_the_profile_loads(dims, weights, message):
    with pytest.raises(ConfigError, match=message):
        load_profile("tiny", {"finetune.matryoshka_dims": dims, "finetune.matryoshka_weights": weights})


def test_optional_fields_take_none_or_their_type():
    assert load_profile("tiny").data.sample_seed is None
    assert load_profile("tiny", {"data.sample_seed": 3}).data.sample_seed == 3
    with pytest.raises(ConfigError, match="sample_seed: expected int"):
        load_profile("tiny", {"data.sample_seed": "three"})
