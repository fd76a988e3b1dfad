"""GradCache: chunked backward gives the uncached step's loss and parameter gradients.

The tiny random Qwen2 has no dropout (0.0 by default), so its forward is deterministic and the
plain step (queries, positives and negatives each in ONE padded forward, graph kept) is an exact
reference for both the length-sorted chunked step and GradCache. The packaged MiniLM has dropout
0.1: there other forward shapes draw other dropout masks, so GradCache is compared with the same
chunks embedded with a graph from the same RNG seed (exactly what GradCache must reproduce by
replaying the RNG state), which fails if the replay is removed.
"""

from __future__ import annotations

import pytest
import torch

from kalm_lib.batching import Batch
from kalm_lib.chunking import plan_chunks
from kalm_lib.config import ModelConfig
from kalm_lib.encoder import load_encoder
from kalm_lib.grad_cache import cached_backward
from kalm_lib.hard_negative_mixing import MixingConfig
from kalm_lib.losses import KalmContrastiveLoss
from kalm_lib.training import batch_loss, make_accelerator, stacked_loss

TINY_QWEN2 = {
    "model_type": "qwen2",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
}


def make_batch(in_batch: bool = True) -> Batch:
    return Batch(
        source="test",
        queries=["what is a cat", "define river", "a synonym of fast", "opposite of cold"],
        positives=["a small domesticated feline", "a natural flowing stream of water", "quick", "hot"],
        negatives=[
            "a large dog", "a wild lion",
            "a still lake", "the sea shore",
            "slow moving traffic", "rapidly changing weather in the mountains",
            "warm", "freezing winter night",
        ],
        negatives_per_query=2,
        in_batch_negatives=in_batch,
    )


@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator(False)


@pytest.fixture(scope="module")
def qwen2():
    torch.manual_seed(0)
    encoder = load_encoder(ModelConfig(random_init=TINY_QWEN2, max_length=32))
    encoder.train()
    return encoder


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def unchunked_loss(encoder, batch: Batch, loss_fn: KalmContrastiveLoss) -> torch.Tensor:
    """Queries, positives and negatives each in one padded forward pass, in order."""
    groups = [g for g in (batch.queries, batch.positives, batch.negatives) if g]
    return stacked_loss(batch, loss_fn)(torch.cat([encoder(encoder.features(g)) for g in groups]))


def mixing_loss(gamma: float, in_batch: bool, mixing: bool) -> KalmContrastiveLoss:
    """A fresh, identically seeded generator for the mixing draws of each run."""
    cfg = MixingConfig(top_k=3, pairs=2, query_mixes=1) if mixing else None
    return KalmContrastiveLoss(0.05, gamma, cfg, torch.Generator().manual_seed(0))


CASES = [(0.0, True, False), (2.0, True, False), (1.0, False, False), (1.0, True, True)]


@pytest.mark.parametrize("gamma, in_batch, mixing", CASES)
@pytest.mark.parametrize("budget", [12, 40, 10_000])
def test_chunked_step_matches_unchunked_step(qwen2, gamma, in_batch, mixing, budget):
    batch = make_batch(in_batch)
    qwen2.zero_grad(set_to_none=True)
    reference = unchunked_loss(qwen2, batch, mixing_loss(gamma, in_batch, mixing))
    reference.backward()
    expected = grads(qwen2)

    chunks = plan_chunks(qwen2, batch.texts, budget)
    assert sorted(r for c in chunks for r in c.rows) == list(range(len(batch.texts)))
    loss = batch_loss(qwen2, batch, chunks, mixing_loss(gamma, in_batch, mixing))
    loss.backward()
    assert abs(loss.item() - reference.item()) < 1e-5
    assert_same_grads(grads(qwen2), expected)


@pytest.mark.parametrize("gamma, in_batch, mixing", CASES)
def test_cached_backward_matches_uncached_step(qwen2, accelerator, gamma, in_batch, mixing):
    batch = make_batch(in_batch)
    qwen2.zero_grad(set_to_none=True)
    reference = unchunked_loss(qwen2, batch, mixing_loss(gamma, in_batch, mixing))
    reference.backward()
    expected = grads(qwen2)

    # 16 texts in chunks of at most 24 padded tokens: several chunks, each mixing queries,
    # positives and negatives of similar length, out of the loss's order.
    chunks = plan_chunks(qwen2, batch.texts, 24)
    assert len(chunks) > 3
    loss = cached_backward(qwen2, chunks, stacked_loss(batch, mixing_loss(gamma, in_batch, mixing)), accelerator)
    assert loss.grad_fn is None
    assert abs(loss.item() - reference.item()) < 1e-5
    assert_same_grads(grads(qwen2), expected)
    # A chunk that covers the batch is the uncached step too.
    whole = plan_chunks(qwen2, batch.texts, 10_000, max_padding=0.99)
    assert len(whole) == 1
    cached_backward(qwen2, whole, stacked_loss(batch, mixing_loss(gamma, in_batch, mixing)), accelerator)
    assert_same_grads(grads(qwen2), expected)


def test_cached_backward_leaves_rng_as_an_uncached_step_would(qwen2, accelerator):
    # With mixing drawing from the global RNG (no generator, as in training), GradCache must leave
    # the RNG where the uncached step leaves it: after the loss's draws. Rewinding to before them
    # would replay the very same mixing coefficients at every step of a dropout-free model.
    batch = make_batch()
    loss_fn = KalmContrastiveLoss(0.05, 1.0, MixingConfig(top_k=3, pairs=2, query_mixes=1))

    torch.manual_seed(123)
    start = torch.get_rng_state()
    with torch.no_grad():
        qwen2(qwen2.features(batch.queries))
    assert torch.equal(start, torch.get_rng_state())  # the tiny Qwen2 forward draws nothing

    chunks = plan_chunks(qwen2, batch.texts, 30)
    torch.manual_seed(123)
    reference = batch_loss(qwen2, batch, chunks, loss_fn)
    after_uncached = torch.rand(4)

    torch.manual_seed(123)
    first = cached_backward(qwen2, chunks, stacked_loss(batch, loss_fn), accelerator)
    after_cached = torch.rand(4)
    second = cached_backward(qwen2, chunks, stacked_loss(batch, loss_fn), accelerator)
    qwen2.zero_grad(set_to_none=True)

    assert abs(first.item() - reference.item()) < 1e-5
    assert torch.equal(after_cached, after_uncached)
    assert first.item() != second.item()  # the next step draws new mixing coefficients


@pytest.fixture(scope="module")
def minilm():
    encoder = load_encoder(ModelConfig(max_length=16))
    encoder.train()
    assert encoder.backbone.config.hidden_dropout_prob > 0
    return encoder


def test_cached_backward_replays_dropout(minilm, accelerator):
    batch = make_batch()
    loss_fn = KalmContrastiveLoss(0.05, 1.0)
    chunks = plan_chunks(minilm, batch.texts, 40)
    assert len(chunks) > 2

    # Reference: the same chunks embedded with a graph, in order, from the same seed (the dropout
    # masks GradCache's no-grad pass drew), then one ordinary backward.
    torch.manual_seed(7)
    reference = batch_loss(minilm, batch, chunks, loss_fn)
    reference.backward()
    expected = grads(minilm)

    torch.manual_seed(7)
    loss = cached_backward(minilm, chunks, stacked_loss(batch, loss_fn), accelerator)
    cached = grads(minilm)
    assert abs(loss.item() - reference.item()) < 1e-5
    assert_same_grads(cached, expected)

    # Reproducible from the seed, and dropout really is active (another seed, other gradients).
    torch.manual_seed(7)
    cached_backward(minilm, chunks, stacked_loss(batch, loss_fn), accelerator)
    assert_same_grads(grads(minilm), cached, atol=0.0)
    torch.manual_seed(8)
    cached_backward(minilm, chunks, stacked_loss(batch, loss_fn), accelerator)
    other = grads(minilm)
    assert any(not torch.allclose(other[k], cached[k], atol=1e-4) for k in cached)
