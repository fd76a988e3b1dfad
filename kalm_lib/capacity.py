"""Capacity plan: memory per GPU, tokens, FLOPs and wall time of each training stage.

Everything follows from the profile (batch, GradCache chunk, hard negatives, Matryoshka dims,
gradient checkpointing, bf16, max length) and the backbone's transformers config, as
:mod:`kalm_lib.training` really trains:

* **Replicated state.** ``Accelerator.prepare`` wraps the encoder in DDP on several processes:
  parameters, gradients and AdamW state are replicated on every GPU (no FSDP / ZeRO sharding), and
  DDP adds gradient buckets of the gradients' size (``gradient_as_bucket_view`` is off).
* **Precision.** :func:`kalm_lib.encoder.load_backbone` loads every checkpoint in float32 (Qwen2-0.5B
  is stored in bfloat16): the parameters are the master weights, bf16 autocast only changes the
  forward's compute dtype, and torch's AdamW keeps ``exp_avg`` and ``exp_avg_sq`` in the
  parameter dtype, so parameters, gradients and both moments take 4 bytes each.
* **GradCache** (``mini_batch_size > 0``): only one chunk of at most ``mini_batch_size x
  max_length`` padded tokens keeps a graph at a time; the loss over the cached embeddings is
  backpropagated before the chunks are re-run, so the score matrices and a chunk's activations
  are never alive together. Without GradCache every chunk's graph lives until the backward.
* **Loss.** Positives and hard negatives are gathered from every process (with gradient), so each
  GPU scores its local queries against the global candidates, once per Matryoshka prefix.

Activation sizes were counted from the tensors autograd saves in transformers' Qwen2 and BERT
layers (``torch.autograd.graph.saved_tensors_hooks``; ``tests/test_capacity.py`` re-counts them);
CUDA's sdpa kernels keep no seq x seq score tensor (only a log-sum-exp per head), eager attention
does. Not counted: the CUDA context and cuBLAS workspaces (~0.5-1 GiB), allocator fragmentation,
the no-grad forward of GradCache (smaller than the graph forward) and the loss's FLOPs (< 0.1%).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from transformers import AutoConfig, PretrainedConfig

from .config import ConfigError, ModelConfig, Profile, TrainConfig
from .distributed import world
from .encoder import random_init_config, random_init_tokenizer, resolve_model_path

GIB = 2**30
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense bf16 tensor cores (NVIDIA datasheet)
H100_MEMORY_GIB = 80.0
DEFAULT_MFU = 0.35  # an assumption, printed with every plan
STAGES = {"pretrain": "stage 1 pre-training", "finetune": "stage 2 fine-tuning"}
# Published hub configs, used only when no copy of the config is found locally (offline hosts).
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2-0.5B": {  # huggingface.co/Qwen/Qwen2-0.5B/blob/main/config.json
        "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936, "dtype": "bfloat16",
    },
}
SUPPORTED = ("qwen2", "bert")


class CapacityError(ValueError):
    """A stage does not fit the given GPU memory, or the plan's inputs are impossible."""


@dataclass(frozen=True)
class ModelDims:
    """The backbone sizes a plan needs, and where they came from."""

    model_type: str  # qwen2 (RMSNorm, SwiGLU, grouped-query attention) or bert (LayerNorm, GELU, pooler)
    hidden: int  # h
    layers: int  # L
    heads: int  # attention (query) heads
    kv_heads: int  # key/value heads (= heads without grouped-query attention)
    intermediate: int  # I, the MLP's inner size
    vocab: int
    positions: int  # bert: learned position table rows (qwen2: 0, rotary)
    token_types: int  # bert: token-type table rows (qwen2: 0)
    hidden_dropout: float
    attention_dropout: float
    param_bytes: int  # bytes per stored parameter (the dtype the code loads)
    source: str  # which config the sizes came from

    @property
    def head_dim(self) -> int:
        """h / heads."""
        return self.hidden // self.heads

    @property
    def kv_hidden(self) -> int:
        """h_kv = kv_heads x head_dim, the width of the key and value projections."""
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class Hardware:
    """The GPUs a plan is for: count, memory each, dense peak and the utilisation assumed."""

    gpus: int = 1
    gpu_memory_gib: float = H100_MEMORY_GIB
    peak_tflops: float = H100_BF16_DENSE_TFLOPS
    mfu: float = DEFAULT_MFU

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.gpu_memory_gib <= 0 or self.peak_tflops <= 0 or not 0 < self.mfu <= 1:
            raise CapacityError(f"need gpus >= 1, gpu memory > 0, peak > 0 and 0 < mfu <= 1, got {self}")


@dataclass(frozen=True)
class StageShape:
    """One stage's sizes per step, as :func:`kalm_lib.training.train_stage` lays them out."""

    steps: int
    runs: int  # stage 2 trains once per seed
    global_batch: int  # B, queries per step over all GPUs
    local_batch: int  # B / gpus
    negatives: int  # M hard negatives per query
    synthetic: int  # hard-negative-mixing negatives per query (0 when off)
    max_length: int  # s
    grad_cache: bool
    chunk_rows: int  # texts per graph-keeping forward pass (GradCache: mini_batch_size)
    checkpointing: bool
    prefixes: tuple[int, ...]  # embedding sizes the loss scores (Matryoshka dims, else the hidden size)

    @property
    def texts_per_example(self) -> int:
        """Query, positive and M hard negatives: 2 + M."""
        return 2 + self.negatives

    @property
    def local_texts(self) -> int:
        """Texts this GPU embeds per step: (B / gpus) x (2 + M)."""
        return self.local_batch * self.texts_per_example

    @property
    def candidates(self) -> int:
        """Columns of a local query's score row: B x (1 + M) gathered candidates + synthetic ones."""
        return self.global_batch * (1 + self.negatives) + self.synthetic


@dataclass(frozen=True)
class Line:
    """One row of a plan table."""

    section: str
    item: str
    value: float
    unit: str
    how: str


@dataclass(frozen=True)
class StagePlan:
    """A stage's plan: the table rows and the numbers the refusal needs."""

    stage: str
    total_gib: float
    gpu_memory_gib: float
    lines: list[Line]

    @property
    def shortfall_gib(self) -> float:
        """GiB missing per GPU (0 when the stage fits)."""
        return max(self.total_gib - self.gpu_memory_gib, 0.0)

    def table(self) -> pd.DataFrame:
        """The rows as a DataFrame (section, item, value, unit, how)."""
        return pd.DataFrame([vars(line) for line in self.lines])


# --- model sizes -----------------------------------------------------------------------------

def model_dims(cfg: ModelConfig) -> ModelDims:
    """Sizes of the backbone ``cfg`` names: a random model's config, a local config (a folder or the
    hub cache, never the network), or else the published config in :data:`PUBLISHED_CONFIGS`."""
    if cfg.random_init:
        return dims_from_config(random_init_config(cfg, len(random_init_tokenizer())), "random_init of the profile")
    path = resolve_model_path(cfg.name_or_path)
    try:
        return dims_from_config(AutoConfig.from_pretrained(path, local_files_only=True), "local config")
    except OSError:
        if cfg.name_or_path not in PUBLISHED_CONFIGS:
            raise ConfigError(f"no local config for {cfg.name_or_path!r} and no published fallback "
                              f"(known: {sorted(PUBLISHED_CONFIGS)}); download it once or pass a folder") from None
    values = dict(PUBLISHED_CONFIGS[cfg.name_or_path])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    return dims_from_config(config, "published config: fallback table, no local copy")


def dims_from_config(config: PretrainedConfig, source: str) -> ModelDims:
    """:class:`ModelDims` of a transformers config; parameters are float32 whatever dtype the config
    names, as :func:`kalm_lib.encoder.load_backbone` loads them."""
    if config.model_type not in SUPPORTED:
        raise ConfigError(f"capacity plan supports model types {SUPPORTED}, not {config.model_type!r}")
    bert = config.model_type == "bert"
    return ModelDims(
        model_type=config.model_type,
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        positions=config.max_position_embeddings if bert else 0,
        token_types=config.type_vocab_size if bert else 0,
        hidden_dropout=config.hidden_dropout_prob if bert else 0.0,
        attention_dropout=config.attention_probs_dropout_prob if bert else config.attention_dropout,
        param_bytes=torch.float32.itemsize,
        source=source,
    )


def layer_linear_weights(d: ModelDims) -> int:
    """Weights of one layer's matmuls (biases excluded).

    qwen2: q, o h x h; k, v h x h_kv; gate, up, down h x I:  2 h^2 + 2 h h_kv + 3 h I.
    bert:  q, k, v, o h x h; up, down h x I:                  4 h^2 + 2 h I.
    """
    h, i = d.hidden, d.intermediate
    if d.model_type == "qwen2":
        return 2 * h * h + 2 * h * d.kv_hidden + 3 * h * i
    return 4 * h * h + 2 * h * i


def parameter_count(d: ModelDims) -> int:
    """Every parameter of ``AutoModel`` (no LM head), from the config.

    qwen2: V h + L (layer weights + q, k, v biases h + 2 h_kv + two RMSNorms 2 h) + final norm h.
    bert:  (V + positions + token types) h + LayerNorm 2h
           + L (layer weights + biases 4h + I + h + two LayerNorms 4h) + pooler h^2 + h.
    """
    h, i = d.hidden, d.intermediate
    if d.model_type == "qwen2":
        layer = layer_linear_weights(d) + h + 2 * d.kv_hidden + 2 * h
        return d.vocab * h + d.layers * layer + h
    layer = layer_linear_weights(d) + 4 * h + i + h + 4 * h
    return (d.vocab + d.positions + d.token_types) * h + 2 * h + d.layers * layer + h * h + h


# --- FLOPs -----------------------------------------------------------------------------------

def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> int:
    """Forward FLOPs of scaled dot-product attention: Q K^T and P V, each 2 b heads q kv d.

    = 4 b heads q_len kv_len head_dim (torch's ``sdpa_flop_count``); the backward is twice that.
    """
    return 4 * batch * heads * q_len * kv_len * head_dim


def backbone_flops(d: ModelDims, batch: int, seq: int) -> int:
    """Forward FLOPs of the transformer layers on a padded ``[batch, seq]`` input, matmuls only.

    b s L (2 W + 4 s h) with W = :func:`layer_linear_weights`: 2 FLOPs per weight per token, and
    attention 4 s h per token per layer at the full, bidirectional, padded length. Their backward
    costs exactly 2 x this (gradients of the inputs and of the weights).
    """
    return batch * seq * d.layers * 2 * layer_linear_weights(d) + d.layers * attention_flops(batch, d.heads, seq, seq, d.head_dim)


def pooler_flops(d: ModelDims, batch: int) -> int:
    """bert's pooler, a dense layer on the first token: 2 b h^2 (computed by ``AutoModel`` though
    mean pooling never reads it, so no backward); qwen2 has none."""
    return 2 * batch * d.hidden**2 if d.model_type == "bert" else 0


def forward_flops(d: ModelDims, batch: int, seq: int) -> int:
    """Forward FLOPs of ``AutoModel`` on a padded ``[batch, seq]`` input: backbone + pooler."""
    return backbone_flops(d, batch, seq) + pooler_flops(d, batch)


def step_flops(d: ModelDims, chunks: Sequence[tuple[int, int]], passes: int) -> int:
    """Executed FLOPs of one step over chunks of padded shape ``(rows, width)``: ``passes`` x the
    backbone forward (:func:`forward_passes`) + (passes - 2) x the pooler (no backward reaches it).
    The loss's matmuls (queries x candidates) are not included."""
    return sum(passes * backbone_flops(d, rows, width) + (passes - 2) * pooler_flops(d, rows) for rows, width in chunks)


def _sdpa_forward_flops(query_shape: tuple[int, ...], key_shape: tuple[int, ...], *args: Any, out_shape: Any = None,
                        **kwargs: Any) -> int:
    """:func:`attention_flops` of an sdpa kernel call, from its argument shapes."""
    batch, heads, q_len, head_dim = query_shape
    return attention_flops(batch, heads, q_len, key_shape[2], head_dim)


def _sdpa_backward_flops(grad_out_shape: tuple[int, ...], query_shape: tuple[int, ...], key_shape: tuple[int, ...],
                         *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """Backward of an sdpa kernel: gradients of Q, K, V and P, 2 x the forward."""
    return 2 * _sdpa_forward_flops(query_shape, key_shape)


def cpu_sdpa_flop_formulas() -> dict[Any, Callable[..., int]]:
    """``FlopCounterMode(custom_mapping=...)`` entries for the fused CPU attention kernels, which
    torch's FLOP table lacks. FlopCounterMode passes argument shapes to them (it wraps each entry
    in its shape wrapper itself, so these must be plain formulas)."""
    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
    }


def forward_passes(grad_cache: bool, checkpointing: bool) -> int:
    """Forward-equivalents each token costs per step: forward 1 + backward 2, + 1 for GradCache's
    no-grad forward, + 1 for gradient checkpointing's recompute in the backward."""
    return 3 + int(grad_cache) + int(checkpointing)


# --- memory ----------------------------------------------------------------------------------

def layer_activation_bytes(d: ModelDims, seq: int, elem: int, attention: str) -> int:
    """Bytes one layer keeps for its backward, per token (``elem`` bytes per activation), for
    padded chunks (training's length-sorted chunks carry a padding mask):

    qwen2 (sdpa): elem (10 h + 4 I + s) + 4 heads + 8 + 2 h (4 - elem): the layer's inputs, norms,
    projections and MLP (8 h + 4 I), keys and values repeated to every head (grouped-query attention
    is expanded when a mask is passed: 2 h), the additive mask (s), the fp32 log-sum-exp per head,
    the two RMSNorms' fp32 rsqrt (8) and, in half precision, their fp32 copies of the input.
    bert (sdpa): elem (8 h + 2 I + s) + 4 heads + 16 (two LayerNorms' fp32 mean and rstd)
    + 2 h elem with hidden dropout on.
    eager attention keeps the probabilities instead of the log-sum-exp:
    + heads s (4 + 5 with attention dropout: its mask and output) - 4 heads.
    """
    h, i = d.hidden, d.intermediate
    if d.model_type == "qwen2":
        per_token = elem * (10 * h + 4 * i + seq) + 4 * d.heads + 8 + 2 * h * (4 - elem)
    else:
        per_token = elem * (8 * h + 2 * i + seq) + 4 * d.heads + 16 + (2 * h * elem if d.hidden_dropout > 0 else 0)
    if attention == "eager":
        per_token += d.heads * seq * (4 + (5 if d.attention_dropout > 0 else 0)) - 4 * d.heads
    return per_token


def activation_bytes(d: ModelDims, tokens: int, seq: int, elem: int, attention: str, checkpointing: bool) -> int:
    """Activation bytes of a forward over ``tokens`` padded tokens of length ``seq`` kept for backward.

    Without checkpointing: tokens (L a + o), a = :func:`layer_activation_bytes` and o = 2 h elem
    for the embedding output and the final hidden state (+ h elem for bert's embedding dropout).
    With checkpointing (each layer re-run in the backward): tokens (L h elem + a + o), the
    layers' inputs plus one layer recomputed at a time.
    """
    layer = layer_activation_bytes(d, seq, elem, attention)
    outside = (2 + int(d.hidden_dropout > 0)) * d.hidden * elem
    kept = d.layers * d.hidden * elem + layer if checkpointing else d.layers * layer
    return tokens * (kept + outside)


def embedding_bytes(d: ModelDims, shape: StageShape) -> tuple[int, int]:
    """(local, gathered) fp32 embedding bytes per GPU.

    local: copies x (B / gpus) (2 + M) x h x 4; 3 copies with GradCache (the chunks' outputs, the
    reordered leaf and its gradient), 2 without (the outputs and their reordered concatenation).
    gathered: B (1 + M) x sum(prefixes) x 4, the global candidates normalised per Matryoshka prefix.
    """
    copies = 3 if shape.grad_cache else 2
    local = copies * shape.local_texts * d.hidden * 4
    gathered = shape.global_batch * (1 + shape.negatives) * sum(shape.prefixes) * 4
    return local, gathered


def score_bytes(shape: StageShape) -> int:
    """Score-matrix bytes per GPU: (B / gpus) x C x (5 P + 12), C = :attr:`StageShape.candidates`.

    Per prefix the graph keeps the fp32 log-softmax (4 B) and the bool mask (1 B); the prefix being
    computed holds three transient fp32 copies (scores, masked, scaled: 12 B).
    """
    return shape.local_batch * shape.candidates * (5 * len(shape.prefixes) + 12)


# --- stages ----------------------------------------------------------------------------------

def stage_shape(profile: Profile, stage: str, gpus: int, hidden: int) -> StageShape:
    """The sizes of ``stage`` (pretrain or finetune) on ``gpus`` processes for a backbone of width
    ``hidden``. Stage 1 trains on pairs (in-batch negatives only, M = 0); stage 2 rows carry
    ``data.hard_negatives`` mined negatives."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose from {sorted(STAGES)}")
    cfg: TrainConfig = getattr(profile, stage)
    if cfg.batch_size % gpus:
        raise CapacityError(f"{STAGES[stage]}: batch_size {cfg.batch_size} is not divisible by {gpus} GPUs")
    local = cfg.batch_size // gpus
    negatives = profile.data.hard_negatives if stage == "finetune" else 0
    texts = local * (2 + negatives)
    model = profile.model
    return StageShape(
        steps=cfg.steps,
        runs=len(cfg.seeds) if stage == "finetune" else 1,
        global_batch=cfg.batch_size,
        local_batch=local,
        negatives=negatives,
        synthetic=cfg.mixing_pairs + cfg.mixing_query if cfg.hard_negative_mixing else 0,
        max_length=model.max_length,
        grad_cache=cfg.mini_batch_size > 0,
        chunk_rows=min(cfg.mini_batch_size, texts) if cfg.mini_batch_size else texts,
        checkpointing=model.gradient_checkpointing,
        prefixes=tuple(cfg.matryoshka_dims) or (hidden,),
    )


def _gib(value: float) -> float:
    return value / GIB


def _memory_lines(d: ModelDims, shape: StageShape, hw: Hardware, elem: int, attention: str) -> tuple[list[Line], float]:
    """Memory rows of a stage and its total per GPU in GiB."""
    params = parameter_count(d)
    weights = params * d.param_bytes
    buckets = weights if hw.gpus > 1 else 0
    casts = params * elem if elem < d.param_bytes else 0  # autocast caches a bf16 copy of each weight per forward region
    tokens = shape.chunk_rows * shape.max_length
    acts = {on: activation_bytes(d, tokens, shape.max_length, elem, attention, on) for on in (True, False)}
    local, gathered = embedding_bytes(d, shape)
    scores = score_bytes(shape)
    static = 4 * weights + buckets + casts
    loss_phase = gathered + scores
    active = acts[shape.checkpointing]
    total = static + local + (max(active, loss_phase) if shape.grad_cache else active + loss_phase)
    dtype = {2: "bf16", 4: "fp32"}.get(d.param_bytes, f"{d.param_bytes} B")
    chunk = f"{shape.chunk_rows:,} texts x {shape.max_length} tokens, {elem} B/activation"
    prefixes = "+".join(map(str, shape.prefixes))
    how_total = ("4 P + buckets + casts + local embeddings + max(activations, gathered + scores) (GradCache)" if shape.grad_cache
                 else "every item together (no GradCache: every chunk keeps its graph)")
    lines = [
        Line("memory", "parameters", _gib(weights), "GiB", f"P = {params:,} x {d.param_bytes} B ({dtype}, replicated)"),
        Line("memory", "gradients", _gib(weights), "GiB", f"P x {d.param_bytes} B (parameter dtype)"),
        Line("memory", "AdamW state", _gib(2 * weights), "GiB", f"2 x P x {d.param_bytes} B (exp_avg, exp_avg_sq in the parameter dtype)"),
        Line("memory", "DDP gradient buckets", _gib(buckets), "GiB", "P x param bytes when gpus > 1 (DDP, no sharding)"),
        Line("memory", "autocast weight copies", _gib(casts), "GiB", f"P x {elem} B under bf16 autocast (an upper bound: every weight)"),
        Line("memory", "activations, checkpointing on" + (" (used)" if shape.checkpointing else ""), _gib(acts[True]), "GiB",
             f"one chunk: {chunk}; L layer inputs + one layer"),
        Line("memory", "activations, checkpointing off" + ("" if shape.checkpointing else " (used)"), _gib(acts[False]), "GiB",
             f"one chunk: {chunk}; all L layers" if shape.grad_cache else f"whole local batch: {chunk}"),
        Line("memory", "embeddings, local", _gib(local), "GiB",
             f"{3 if shape.grad_cache else 2} x {shape.local_texts:,} texts x {d.hidden} x 4 B"),
        Line("memory", "embeddings, gathered", _gib(gathered), "GiB",
             f"{shape.global_batch * (1 + shape.negatives):,} candidates x ({prefixes}) x 4 B"),
        Line("memory", "score matrices", _gib(scores), "GiB",
             f"{shape.local_batch:,} x {shape.candidates:,} x (5 x {len(shape.prefixes)} prefixes + 12) B"),
        Line("memory", "total per GPU", _gib(total), "GiB", how_total),
        Line("memory", "GPU memory", hw.gpu_memory_gib, "GiB", "given (--gpu-memory)"),
        Line("memory", "headroom", hw.gpu_memory_gib - _gib(total), "GiB", "not counted: CUDA context, workspaces, fragmentation"),
    ]
    return lines, _gib(total)


def _compute_lines(d: ModelDims, shape: StageShape, hw: Hardware) -> list[Line]:
    """Token, FLOP and time rows of a stage (all runs: stage 2 trains once per seed)."""
    texts = shape.steps * shape.global_batch * shape.texts_per_example * shape.runs
    tokens = texts * shape.max_length
    forward = forward_flops(d, texts, shape.max_length)
    passes = forward_passes(shape.grad_cache, shape.checkpointing)
    executed = step_flops(d, [(texts, shape.max_length)], passes)
    seconds = executed / (hw.gpus * hw.peak_tflops * 1e12 * hw.mfu)
    extra = " + GradCache no-grad forward" * shape.grad_cache + " + checkpoint recompute" * shape.checkpointing
    return [
        Line("compute", "tokens", tokens, "tokens",
             f"{shape.runs} run(s) x {shape.steps:,} steps x {shape.global_batch:,} x {shape.texts_per_example} texts "
             f"x {shape.max_length} (max_length: an upper bound)"),
        Line("compute", "forward FLOPs per token", forward / tokens, "FLOP",
             f"2 x {layer_linear_weights(d):,} weights x {d.layers} layers + 4 x {shape.max_length} x {d.hidden} x {d.layers} (attention)"),
        Line("compute", "model FLOPs", 3 * forward, "FLOP", "3 x forward (forward + backward)"),
        Line("compute", "executed FLOPs", executed, "FLOP", f"{passes} x forward (forward + backward{extra})"),
        Line("compute", "utilisation", hw.mfu, "", f"assumed, of executed FLOPs (= {hw.mfu * 3 / passes:.2f} of model FLOPs)"),
        Line("compute", "peak", hw.peak_tflops, "TFLOP/s", "per GPU, dense bf16 (--peak-tflops; default H100 SXM)"),
        Line("compute", "wall time", seconds / 3600, "hours", f"executed / ({hw.gpus} GPUs x peak x utilisation)"),
        Line("compute", "GPU-hours", hw.gpus * seconds / 3600, "GPU-hours", "wall time x GPUs"),
    ]


def plan_stage(profile: Profile, stage: str, hw: Hardware, dims: ModelDims | None = None) -> StagePlan:
    """The plan of one stage on ``hw`` (``dims``: the backbone's sizes, default :func:`model_dims`)."""
    d = dims or model_dims(profile.model)
    shape = stage_shape(profile, stage, hw.gpus, d.hidden)
    elem = 2 if profile.model.bf16 or d.param_bytes == 2 else 4
    memory, total = _memory_lines(d, shape, hw, elem, profile.model.attn_implementation)
    return StagePlan(stage, total, hw.gpu_memory_gib, memory + _compute_lines(d, shape, hw))


def check_fits(plan: StagePlan) -> None:
    """Raise :class:`CapacityError` naming the stage and the shortfall when it does not fit."""
    if plan.shortfall_gib > 0:
        raise CapacityError(
            f"{STAGES[plan.stage]} ({plan.stage}) does not fit: it needs {plan.total_gib:.2f} GiB per GPU, "
            f"{plan.shortfall_gib:.2f} GiB more than the {plan.gpu_memory_gib:g} GiB given "
            "(lower mini_batch_size or max_length, or turn on gradient checkpointing)"
        )


def local_hardware() -> Hardware:
    """The GPUs this process trains with: one per process of the run (the torch.distributed world
    size; 1 in a notebook, which trains in one process whatever the host has), each of the first
    CUDA device's memory, or H100 sizes on a CPU host."""
    gpus = world()[1]
    if torch.cuda.is_available():
        return Hardware(gpus=gpus, gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / GIB)
    return Hardware(gpus=gpus)


def plan_table(profile: Profile, stage: str, hw: Hardware | None = None) -> pd.DataFrame:
    """The plan of ``stage`` as a DataFrame (default hardware: :func:`local_hardware`); a stage that
    does not fit shows a negative headroom (the ``plan`` command refuses it)."""
    return plan_stage(profile, stage, hw or local_hardware()).table()


def format_plan(profile: Profile, hw: Hardware) -> str:
    """The text ``python -m kalm_lib plan`` prints: assumptions, then one table per enabled stage.
    Raises :class:`CapacityError` for the first stage that does not fit."""
    d = model_dims(profile.model)
    out = [
        f"capacity plan: profile {profile.name}, {hw.gpus} GPU(s) x {hw.gpu_memory_gib:g} GiB, "
        f"peak {hw.peak_tflops:g} TFLOP/s, utilisation {hw.mfu:g} (assumed)",
        f"model {profile.model.name_or_path if not profile.model.random_init else d.model_type}: h={d.hidden}, L={d.layers}, "
        f"heads={d.heads}, kv_heads={d.kv_heads}, I={d.intermediate}, V={d.vocab}; sizes from the {d.source}",
    ]
    for stage, title in STAGES.items():
        if not getattr(profile, stage).enabled:
            out.append(f"\n{title}: disabled in the profile")
            continue
        plan = plan_stage(profile, stage, hw, d)
        check_fits(plan)
        out += [f"\n{title} ({stage})", *(f"  {x.item:<38} {x.value:>11,.4g} {x.unit:<9} {x.how}" for x in plan.lines)]
    return "\n".join(out) + "\n"
