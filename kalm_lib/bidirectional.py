"""Switch a decoder-only transformers model to bidirectional attention (LLM2Vec / KaLM-Embedding-V2).

Mechanism (transformers 5.x, checked on 5.23). Two flags are set, nothing is monkey-patched:

* ``config.is_causal = False``. This is transformers' own switch: ``masking_utils.create_causal_mask``
  and ``create_sliding_window_causal_mask`` then delegate to ``create_bidirectional_mask`` (a
  padding-only mask: every query attends to every real key, never to a padding key), and the
  ``merge_with_config_defaults`` decorator on the backbone's ``forward`` passes ``is_causal=False``
  down to the attention function, so SDPA / flash-attention do not fall back to their causal kernel
  when no mask is materialised (no padding in the batch). The flag is saved by ``save_pretrained``,
  so a reloaded checkpoint is bidirectional again.
* ``module.is_causal = False`` on every attention module: the value SDPA / flash-attention read when
  no ``is_causal`` keyword reaches them (a backbone whose ``forward`` lacks the decorator).

Padding queries are not masked, only padding keys, so no attention row is fully masked (no NaN with
SDPA); the states at padding positions are meaningless and must be ignored by the pooling.

Supported: decoder-only models whose modeling module builds its masks with
``masking_utils.create_causal_mask`` (Qwen2, Llama, Mistral, Qwen3, Gemma...). Models that also use
mask builders blind to the flag (chunked or recurrent/linear attention), encoder-decoder models and
non-transformers modules raise ``TypeError``. Encoders (BERT...) are already bidirectional: they are
returned unchanged and ``is_bidirectional`` reports True.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, masking_utils

from .pooling import last_token_index, pool

_FLAG_BLIND_MASK_BUILDERS = frozenset({"create_chunked_causal_mask", "create_recurrent_attention_mask"})


def base_model(model: nn.Module) -> PreTrainedModel:
    """Backbone of a transformers model: ``Qwen2Model`` for ``Qwen2ForCausalLM``, or the model itself."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    return model.base_model


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Submodules carrying a boolean ``is_causal`` flag, i.e. the attention modules; TypeError if none."""
    modules = [m for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if not modules:
        raise TypeError(f"{type(model).__name__} has no attention module with an `is_causal` flag")
    return modules


def is_bidirectional(model: nn.Module) -> bool:
    """True for a decoder switched by ``enable_bidirectional`` (``config.is_causal`` False) or an encoder."""
    backbone = base_model(model)
    if getattr(backbone.config, "is_causal", None) is False:
        return True
    return not any(m.is_causal for m in _attention_modules(backbone))


def _check_supported(backbone: PreTrainedModel) -> None:
    """Raise TypeError unless ``backbone`` is decoder-only and builds its masks with flag-aware builders."""
    name = type(backbone).__name__
    if getattr(backbone.config, "is_encoder_decoder", False):
        raise TypeError(
            f"{name} is an encoder-decoder model; enable_bidirectional expects a decoder-only model"
        )
    namespace = vars(inspect.getmodule(type(backbone)))
    builders = {
        obj.__name__
        for obj in namespace.values()
        if inspect.isfunction(obj) and obj.__module__ == masking_utils.__name__
    }
    if "create_causal_mask" not in builders:
        raise TypeError(f"{name} does not build its masks with transformers.masking_utils.create_causal_mask")
    if blind := builders & _FLAG_BLIND_MASK_BUILDERS:
        raise TypeError(f"{name} uses mask builders that ignore config.is_causal: {sorted(blind)}")


def enable_bidirectional(model: PreTrainedModel) -> PreTrainedModel:
    """Make every real token attend to every real token (padding keys stay masked); in place, idempotent.

    Accepts a backbone (``AutoModel``) or a task model (``AutoModelForCausalLM``...). Encoders are
    returned unchanged. See the module docstring for the mechanism and the supported models.
    """
    backbone = base_model(model)
    attention = _attention_modules(backbone)
    if getattr(backbone.config, "is_causal", None) is None and not any(m.is_causal for m in attention):
        return model
    _check_supported(backbone)
    model.config.is_causal = False  # the config that save_pretrained writes
    backbone.config.is_causal = False  # the config that mask creation reads (usually the same object)
    for module in attention:
        module.is_causal = False
    return model


def _first_real_token_states(
    backbone: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor
) -> Tensor:
    """Last hidden state [B,H] of the first real token of each row, in eval mode without gradients."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            output = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        backbone.train(was_training)
    return pool(output.last_hidden_state, attention_mask, "cls")


def first_token_sensitivity(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> float:
    """Max abs change of the first real token's last hidden state when each row's last real token changes.

    Exactly 0 under causal attention (the first token cannot see later tokens), > 0 under bidirectional
    attention. Every row needs at least two real tokens; any padding side is fine.
    """
    if bool((attention_mask.sum(dim=1) < 2).any()):
        raise ValueError("first_token_sensitivity needs at least two real tokens in every row")
    backbone = base_model(model)
    input_ids = input_ids.to(backbone.device)
    attention_mask = attention_mask.to(backbone.device)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    last = last_token_index(attention_mask)
    changed = input_ids.clone()
    changed[rows, last] = (input_ids[rows, last] + 1) % backbone.get_input_embeddings().num_embeddings
    before = _first_real_token_states(backbone, input_ids, attention_mask)
    after = _first_real_token_states(backbone, changed, attention_mask)
    return (after - before).abs().max().item()
