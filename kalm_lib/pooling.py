"""Pooling of token hidden states into one embedding per sequence.

All modes read the padding from ``attention_mask`` (1 = real token, 0 = padding), so they give the
same result whether the batch was padded on the left or on the right.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

PoolingMode = Literal["mean", "last", "cls"]
POOLING_MODES: tuple[str, ...] = get_args(PoolingMode)  # = config.POOLING_MODES (tests/test_config.py)


def first_token_index(attention_mask: Tensor) -> Tensor:
    """Index [B] of the first real token of each row (position 0 with right padding)."""
    return attention_mask.long().argmax(dim=1)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index [B] of the last real token of each row (position L-1 with left padding)."""
    length = attention_mask.shape[1]
    return length - 1 - attention_mask.long().flip(dims=[1]).argmax(dim=1)


def mean_pool(hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean [B,H] of the hidden states over real tokens, accumulated in float32, in the input dtype."""
    weights = attention_mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden_states.to(torch.float32) * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1.0)
    return (summed / counts).to(hidden_states.dtype)


def gather_positions(hidden_states: Tensor, positions: Tensor) -> Tensor:
    """Hidden state [B,H] at ``positions[b]`` of each row ``b``."""
    rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    return hidden_states[rows, positions.to(hidden_states.device)]


def pool(hidden_states: Tensor, attention_mask: Tensor, mode: PoolingMode = "mean") -> Tensor:
    """Pool ``hidden_states`` [B,L,H] into [B,H] with ``mode``.

    ``mean``: average over real tokens; ``last``: last real token; ``cls``: first real token.
    Raises ValueError for any other mode.
    """
    if hidden_states.ndim != 3 or attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"expected hidden_states [B,L,H] and attention_mask [B,L], got "
            f"{tuple(hidden_states.shape)} and {tuple(attention_mask.shape)}"
        )
    if mode == "mean":
        return mean_pool(hidden_states, attention_mask)
    if mode == "last":
        return gather_positions(hidden_states, last_token_index(attention_mask))
    if mode == "cls":
        return gather_positions(hidden_states, first_token_index(attention_mask))
    raise ValueError(f"unknown pooling mode {mode!r}; allowed modes: {', '.join(POOLING_MODES)}")
