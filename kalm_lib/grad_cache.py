"""GradCache (Gao et al. 2021): a large contrastive batch in the memory of a small one.

1. Embed the batch in mini-batches without a graph, remembering each mini-batch's RNG state.
2. Compute the loss on those (leaf) embeddings and backpropagate to them only.
3. Re-embed each mini-batch with a graph under the same RNG state (same dropout) and push the
   cached embedding gradients into the parameters.

Loss and parameter gradients equal the uncached step's up to float rounding; peak activation
memory is that of one mini-batch.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from accelerate import Accelerator
from torch import Tensor

from .batching import Batch
from .encoder import Encoder
from .losses import KalmContrastiveLoss


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
    encoder: Encoder,
    batch: Batch,
    loss_fn: KalmContrastiveLoss,
    mini_batch_size: int,
    accelerator: Accelerator,
) -> Tensor:
    """Backpropagate the batch loss through ``model`` chunk by chunk; return the detached loss."""
    groups = (batch.queries, batch.positives, batch.negatives)
    chunks = [g[i : i + mini_batch_size] for g in groups for i in range(0, len(g), mini_batch_size)]
    states, cached = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_RngState())
            cached.append(model(encoder.features(chunk)))
    embeddings = torch.cat(cached).detach().requires_grad_()
    loss = loss_fn.from_stacked(embeddings, len(batch.queries), batch.negatives_per_query, batch.in_batch_negatives)
    # Captured after the loss: its random draws (hard-negative mixing without a generator) must not
    # be rewound, or every step of a dropout-free model would replay the same mixing coefficients.
    after = _RngState()
    accelerator.backward(loss)
    grads = embeddings.grad.split([len(c) for c in chunks])
    for index, (chunk, state, grad) in enumerate(zip(chunks, states, grads)):
        state.restore()
        sync = nullcontext() if index == len(chunks) - 1 else accelerator.no_sync(model)
        with sync:
            model(encoder.features(chunk)).backward(grad)
    after.restore()
    return loss.detach()

