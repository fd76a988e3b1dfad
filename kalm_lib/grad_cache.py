"""GradCache (Gao et al. 2021): a large contrastive batch in the memory of a small one.

1. Embed the step's chunks without a graph, remembering each chunk's RNG state.
2. Compute the loss on those (leaf) embeddings and backpropagate to them only.
3. Re-embed each chunk with a graph under the same RNG state (same dropout) and push the cached
   embedding gradients into the parameters.

Loss and parameter gradients equal the uncached step's up to float rounding; peak activation
memory is that of one chunk (see :mod:`kalm_lib.chunking` for how chunks are cut).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from torch import Tensor

from .chunking import Chunk, restore_order


class _RngState:
    """CPU (and CUDA) RNG state captured at construction, restorable later."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        """Put the captured state back."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def cached_backward(
    model: torch.nn.Module,
    chunks: Sequence[Chunk],
    loss_of: Callable[[Tensor], Tensor],
    accelerator: Accelerator,
) -> Tensor:
    """Backpropagate ``loss_of(embeddings)`` through ``model`` chunk by chunk; return the detached loss.

    ``loss_of`` takes the embeddings of all chunked texts in their original order.
    """
    states, cached = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_RngState())
            cached.append(model(chunk.features))
    order = restore_order(chunks)
    embeddings = torch.cat(cached)[order.to(cached[0].device)].detach().requires_grad_()
    loss = loss_of(embeddings)
    # Captured after the loss: its random draws (hard-negative mixing without a generator) must not
    # be rewound, or every step of a dropout-free model would replay the same mixing coefficients.
    after = _RngState()
    accelerator.backward(loss)
    grads = embeddings.grad
    for index, (chunk, state) in enumerate(zip(chunks, states)):
        state.restore()
        sync = nullcontext() if index == len(chunks) - 1 else accelerator.no_sync(model)
        with sync:
            rows = torch.tensor(chunk.rows, device=grads.device)
            model(chunk.features).backward(grads[rows])
    after.restore()
    return loss.detach()
