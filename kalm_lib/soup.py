"""Model soup (stage 3): average the parameters of several fine-tuned checkpoints.

* uniform soup: theta = (1/K) sum_k theta_k over all K checkpoints;
* greedy soup (Wortsman et al. 2022): sort checkpoints by held-out score, start from the best and
  add each next one to the average only if the held-out score of the new average does not drop.

Floating-point tensors are averaged in float64 and cast back; integer buffers must agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

StateDict = dict[str, torch.Tensor]


def load_state(checkpoint: Path) -> StateDict:
    """Backbone weights of a saved stage folder (``model.safetensors``)."""
    path = checkpoint / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no model.safetensors in checkpoint {checkpoint}")
    return load_file(str(path))


def average_states(states: Sequence[StateDict]) -> StateDict:
    """Element-wise mean of state dicts with identical keys and shapes."""
    if not states:
        raise ValueError("cannot average zero checkpoints")
    keys = set(states[0])
    for index, state in enumerate(states[1:], start=1):
        if set(state) != keys:
            raise ValueError(f"checkpoint {index} has different parameters than checkpoint 0")
    averaged = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            total = sum(state[key].double() for state in states)
            averaged[key] = (total / len(states)).to(first.dtype)
        elif all(torch.equal(first, state[key]) for state in states):
            averaged[key] = first.clone()
        else:
            raise ValueError(f"integer tensor {key!r} differs between checkpoints")
    return averaged


@dataclass(frozen=True)
class GreedySoup:
    """Result of greedy selection: chosen checkpoints and the score after each decision."""

    chosen: list[int]
    trace: list[dict]
    singles: list[float]
    score: float
    state: StateDict


def greedy_soup(states: Sequence[StateDict], score: Callable[[StateDict], float]) -> GreedySoup:
    """Greedy soup: add checkpoints best-first while the held-out ``score`` does not drop."""
    singles = [score(state) for state in states]
    order = sorted(range(len(states)), key=lambda i: -singles[i])
    chosen = [order[0]]
    best = singles[order[0]]
    trace = [{"candidate": order[0], "score": best, "kept": True}]
    for index in order[1:]:
        trial = average_states([states[i] for i in chosen + [index]])
        value = score(trial)
        kept = value >= best
        trace.append({"candidate": index, "score": value, "kept": kept})
        if kept:
            chosen.append(index)
            best = value
    return GreedySoup(chosen, trace, singles, best, average_states([states[i] for i in chosen]))
