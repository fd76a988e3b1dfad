"""The capacity plan: its formulas against what torch counts, and the plan command.

Tolerances: forward and backward FLOPs match FlopCounterMode exactly (every matmul and attention
kernel is in the formula); parameter counts and bytes exactly; activation bytes within 2% of the
tensors autograd saves (fp32 and bf16), the plan's only estimated memory item checked here.
"""

import pytest
import torch
from accelerate.utils import DistributedDataParallelKwargs
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModel

from kalm_lib.__main__ import main
from kalm_lib.capacity import (
    PUBLISHED_CONFIGS,
    CapacityError,
    Hardware,
    activation_bytes,
    cpu_sdpa_flop_formulas,
    dims_from_config,
    forward_flops,
    model_dims,
    parameter_count,
    plan_stage,
    plan_table,
    pooler_flops,
)
from kalm_lib.config import PACKAGED_MINILM, ConfigError, ModelConfig, load_profile
from kalm_lib.encoder import load_backbone, resolve_model_path

TINY_QWEN2 = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 100}
TINY_BERT = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 96, "vocab_size": 100, "attention_probs_dropout_prob": 0.0}


def config_of(values: dict) -> AutoConfig:
    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def minilm_config() -> AutoConfig:
    """The packaged all-MiniLM-L6-v2 config (BERT, h 384, 6 layers), without its dropout."""
    return AutoConfig.from_pretrained(resolve_model_path(PACKAGED_MINILM), attention_probs_dropout_prob=0.0)


def padded_inputs(batch: int = 3, seq: int = 12) -> dict[str, torch.Tensor]:
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq // 2:] = 0  # padding: still computed, and counted by the formula
    return {"input_ids": torch.randint(0, 100, (batch, seq)), "attention_mask": mask}


@pytest.mark.parametrize("config", [config_of(TINY_QWEN2), minilm_config()], ids=["qwen2", "minilm"])
def test_forward_and_backward_flops_equal_flop_counter(config):
    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation="sdpa")
    dims = dims_from_config(config, "test")
    inputs = padded_inputs()
    counter = FlopCounterMode(display=False, custom_mapping=cpu_sdpa_flop_formulas())
    with counter:
        hidden = model(**inputs).last_hidden_state
        forward = counter.get_total_flops()
        hidden.sum().backward()
    assert forward == forward_flops(dims, 3, 12)
    # backward = 2 x forward, except bert's pooler, which no gradient reaches
    assert counter.get_total_flops() == 3 * forward_flops(dims, 3, 12) - 2 * pooler_flops(dims, 3)
    if dims.attention_dropout == 0:  # the fused CPU kernel ran, with the formulas shared with benchmarks/mfu.py
        assert "aten._scaled_dot_product_flash_attention_for_cpu" in map(str, counter.get_flop_counts()["Global"])


@pytest.mark.parametrize("config", [config_of(TINY_QWEN2), config_of(TINY_BERT), minilm_config()], ids=["qwen2", "bert", "minilm"])
def test_parameter_count_and_bytes_equal_the_model(config):
    model = AutoModel.from_config(config)
    dims = dims_from_config(config, "test")
    assert parameter_count(dims) == sum(p.numel() for p in model.parameters())
    assert parameter_count(dims) * dims.param_bytes == sum(p.numel() * p.element_size() for p in model.parameters())


def test_published_qwen2_config_has_the_published_size():
    values = dict(PUBLISHED_CONFIGS["Qwen/Qwen2-0.5B"])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):  # no memory: 494M parameters
        model = AutoModel.from_config(config)
    dims = dims_from_config(config, "test")
    assert parameter_count(dims) == sum(p.numel() for p in model.parameters()) == 494_032_768
    assert dims.param_bytes == 4  # stored in bf16, trained in fp32 (load_backbone)


def test_model_dims_offline():
    gpu = model_dims(load_profile("gpu-qwen2-0.5b").model)
    assert (gpu.hidden, gpu.layers, gpu.heads, gpu.kv_heads, gpu.intermediate, gpu.vocab) == (896, 24, 14, 2, 4864, 151936)
    assert "local config" in gpu.source or "fallback" in gpu.source
    assert model_dims(load_profile("tiny").model).param_bytes == 4  # from_config: float32
    with pytest.raises(ConfigError, match="no local config"):
        model_dims(ModelConfig(name_or_path="someone/unknown-model"))


def test_a_bf16_checkpoint_trains_in_fp32_and_adamw_keeps_fp32_state(tmp_path):
    """The plan's precision claim, and the reason for it: a bf16 checkpoint (as Qwen2-0.5B is stored)
    loads as float32 master weights and AdamW's state follows them; bf16 parameters would lose
    an update of the recipe's size (lr 1e-5) entirely."""
    AutoModel.from_config(config_of(TINY_QWEN2)).to(torch.bfloat16).save_pretrained(tmp_path)
    backbone, _ = load_backbone(ModelConfig(name_or_path=str(tmp_path), bidirectional=False))
    assert {p.dtype for p in backbone.parameters()} == {torch.float32}
    assert model_dims(ModelConfig(name_or_path=str(tmp_path))).param_bytes == 4
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-3, fused=True)
    backbone(**padded_inputs()).last_hidden_state.float().sum().backward()
    optimizer.step()
    state = optimizer.state[next(backbone.parameters())]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    weight = torch.tensor([0.5], dtype=torch.bfloat16)
    assert torch.equal(weight - 1e-5, weight)  # what a bf16 master weight would do with the update


def saved_activation_bytes(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd saves for backward, parameters excluded."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for pointer, size in storages.items() if pointer not in params)


@pytest.mark.parametrize("values", [TINY_QWEN2, TINY_BERT, {**TINY_BERT, "hidden_dropout_prob": 0.0}],
                         ids=["qwen2", "bert", "bert-no-dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_bytes_match_saved_tensors(values, dtype):
    torch.manual_seed(0)
    config = config_of({**values, "num_hidden_layers": 4})
    model = AutoModel.from_config(config, attn_implementation="sdpa").to(dtype).train()
    measured = saved_activation_bytes(model, padded_inputs(4, 16))
    planned = activation_bytes(dims_from_config(config, "test"), 4 * 16, 16, dtype.itemsize, "sdpa", checkpointing=False)
    assert planned == pytest.approx(measured, rel=0.02)


def test_checkpointing_keeps_less():
    dims = dims_from_config(config_of({**TINY_QWEN2, "num_hidden_layers": 8}), "test")
    full, checkpointed = (activation_bytes(dims, 1024, 64, 2, "sdpa", on) for on in (False, True))
    assert checkpointed < full / 2
    assert activation_bytes(dims, 1024, 64, 2, "eager", False) > full  # eager keeps the probabilities


ROWS = ("parameters", "gradients", "AdamW state", "DDP gradient buckets", "embeddings, local", "embeddings, gathered",
        "score matrices", "activations, checkpointing on (used)")


@pytest.mark.parametrize("gpus", [1, 8])
def test_per_gpu_memory_follows_ddp(gpus):
    """training.make_accelerator wraps the encoder in DDP (no FSDP / ZeRO): parameters, gradients and
    AdamW state are replicated, DDP adds gradient-sized buckets on several processes
    (gradient_as_bucket_view off), and only the local shard's embeddings and scores shrink."""
    assert DistributedDataParallelKwargs().gradient_as_bucket_view is False
    profile = load_profile("gpu-qwen2-0.5b")
    one, many = (plan_stage(profile, "pretrain", Hardware(gpus=n)).table().set_index("item")["value"] for n in (1, gpus))
    weights = 494_032_768 * 4 / 2**30  # float32 master weights
    assert [many[row] for row in ROWS[:3]] == [weights, weights, 2 * weights] == [one[row] for row in ROWS[:3]]
    assert many["DDP gradient buckets"] == (weights if gpus > 1 else 0)
    for row in ("embeddings, local", "score matrices"):
        assert many[row] == pytest.approx(one[row] / gpus)
    for row in ("embeddings, gathered", "activations, checkpointing on (used)"):
        assert many[row] == one[row]
    assert many["wall time"] == pytest.approx(one["wall time"] / gpus)


def test_plan_table_on_the_tiny_profile():
    table = plan_table(load_profile("tiny"), "finetune")  # the notebooks' call: 1 process
    assert list(table.columns) == ["section", "item", "value", "unit", "how"]
    assert set(table["section"]) == {"memory", "compute"}
    values = table.set_index("item")["value"]
    assert 0 < values["total per GPU"] < values["GPU memory"]
    assert values["tokens"] == 2 * 3 * 8 * (2 + 2) * 32  # seeds x steps x batch x (query, positive, 2 negatives) x max_length


@pytest.mark.parametrize("profile", ["tiny", "cpu"])
def test_plan_command_prints_both_stages(profile, capsys):
    assert main(["plan", "--profile", profile, "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    for text in ("stage 1 pre-training", "stage 2 fine-tuning", "total per GPU", "executed FLOPs", "wall time",
                 "utilisation 0.35 (assumed)", "peak 989 TFLOP/s"):
        assert text in out


def test_plan_command_refuses_what_does_not_fit(capsys):
    assert main(["plan", "--profile", "tiny", "--gpu-memory", "0.001"]) == 2
    err = capsys.readouterr().err
    assert "stage 1 pre-training (pretrain) does not fit" in err and "GiB more than the 0.001 GiB given" in err
    assert main(["plan", "--profile", "tiny", "--gpus", "3"]) == 2  # 8 queries do not split over 3 GPUs
    assert "not divisible by 3 GPUs" in capsys.readouterr().err
    with pytest.raises(CapacityError):
        Hardware(mfu=1.5)
