"""enable_bidirectional on tiny random Qwen2 / Llama models, eager and SDPA, left and right padding."""

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from transformers import (
    BertConfig,
    BertModel,
    Llama4TextConfig,
    Llama4TextModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
    T5Config,
    T5Model,
)

from kalm_lib.bidirectional import base_model, enable_bidirectional, first_token_sensitivity, is_bidirectional

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
)
MODEL_CLASSES = {
    ("qwen2", "base"): (Qwen2Config, Qwen2Model),
    ("qwen2", "lm"): (Qwen2Config, Qwen2ForCausalLM),
    ("llama", "base"): (LlamaConfig, LlamaModel),
    ("llama", "lm"): (LlamaConfig, LlamaForCausalLM),
}
ARCHS = ("qwen2", "llama")
ATTNS = ("eager", "sdpa")
SIDES = ("left", "right")
SEQUENCES = ([11, 12, 13, 14, 15, 16, 17], [21, 22, 23, 24])


def tiny_model(arch: str, attn: str, head: str = "base") -> PreTrainedModel:
    """Tiny random model in eval mode; the same weights for a given (arch, head) whatever ``attn``."""
    config_cls, model_cls = MODEL_CLASSES[(arch, head)]
    torch.manual_seed(0)
    return model_cls._from_config(config_cls(**TINY), attn_implementation=attn).eval()


def padded_batch(side: str, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """SEQUENCES padded to a common length on ``side``: (input_ids, attention_mask)."""
    length = max(map(len, SEQUENCES))
    ids, mask = [], []
    for seq in SEQUENCES:
        pad = length - len(seq)
        ids.append([pad_id] * pad + seq if side == "left" else seq + [pad_id] * pad)
        mask.append([0] * pad + [1] * len(seq) if side == "left" else [1] * len(seq) + [0] * pad)
    return torch.tensor(ids), torch.tensor(mask)


def hidden_states(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    with torch.no_grad():
        return base_model(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def real_token_states(model: PreTrainedModel, side: str) -> list[Tensor]:
    """Hidden states at the real positions of each row of the padded batch."""
    input_ids, attention_mask = padded_batch(side)
    hidden = hidden_states(model, input_ids, attention_mask)
    return [hidden[row][attention_mask[row].bool()] for row in range(len(SEQUENCES))]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("head", ("base", "lm"))
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("arch", ARCHS)
def test_first_token_sees_last_token_only_when_bidirectional(
    arch: str, attn: str, head: str, side: str
) -> None:
    model = tiny_model(arch, attn, head)
    input_ids, attention_mask = padded_batch(side)
    assert not is_bidirectional(model)
    assert first_token_sensitivity(model, input_ids, attention_mask) < 1e-6
    assert enable_bidirectional(model) is model
    assert is_bidirectional(model)
    assert first_token_sensitivity(model, input_ids, attention_mask) > 1e-3


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("arch", ARCHS)
def test_padding_is_masked(arch: str, attn: str, side: str) -> None:
    model = enable_bidirectional(tiny_model(arch, attn))
    for seq, padded in zip(SEQUENCES, real_token_states(model, side)):
        alone = hidden_states(model, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))[0]
        torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("arch", ARCHS)
def test_eager_and_sdpa_agree(arch: str, side: str) -> None:
    eager = real_token_states(enable_bidirectional(tiny_model(arch, "eager")), side)
    sdpa = real_token_states(enable_bidirectional(tiny_model(arch, "sdpa")), side)
    for eager_row, sdpa_row in zip(eager, sdpa):
        torch.testing.assert_close(eager_row, sdpa_row, atol=1e-5, rtol=0)


def test_enable_is_idempotent_and_recorded() -> None:
    model = enable_bidirectional(tiny_model("qwen2", "sdpa", "lm"))
    once = real_token_states(model, "left")
    assert enable_bidirectional(model) is model
    assert model.config.is_causal is False
    assert not any(layer.self_attn.is_causal for layer in model.model.layers)
    for first, second in zip(once, real_token_states(model, "left")):
        torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_state_survives_save_and_reload(tmp_path: Path) -> None:
    enable_bidirectional(tiny_model("llama", "sdpa")).save_pretrained(tmp_path)
    reloaded = LlamaModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert is_bidirectional(reloaded)
    assert first_token_sensitivity(reloaded, *padded_batch("right")) > 1e-3


def test_base_model_of_backbone_and_causal_lm() -> None:
    backbone = tiny_model("qwen2", "eager")
    causal_lm = tiny_model("qwen2", "eager", "lm")
    assert base_model(backbone) is backbone
    assert base_model(causal_lm) is causal_lm.model


def test_encoder_is_returned_unchanged() -> None:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    bert = BertModel(config)
    assert is_bidirectional(bert)
    assert enable_bidirectional(bert) is bert
    assert not hasattr(bert.config, "is_causal")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: nn.Linear(4, 4), "PreTrainedModel"),
        (
            lambda: T5Model(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)),
            "encoder-decoder",
        ),
        (
            lambda: Llama4TextModel(
                Llama4TextConfig(**TINY, head_dim=8, intermediate_size_mlp=64, num_local_experts=2)
            ),
            "create_chunked_causal_mask",
        ),
    ],
    ids=["not-transformers", "encoder-decoder", "chunked-attention"],
)
def test_unsupported_models_raise_type_error(build, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        enable_bidirectional(build())


def test_sensitivity_needs_two_real_tokens() -> None:
    with pytest.raises(ValueError, match="two real tokens"):
        first_token_sensitivity(
            tiny_model("llama", "eager"), torch.tensor([[5, 0]]), torch.tensor([[1, 0]])
        )
