"""Online hard-negative mixing: selection, synthesis geometry, and its effect on the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kalm_lib import losses
from kalm_lib.hard_negative_mixing import MixingConfig, hardest_negatives, synthesise
from kalm_lib.losses import KalmContrastiveLoss


def unit(angles) -> torch.Tensor:
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], dim=-1).float()


def random_batch(seed: int, batch: int = 4, negatives: int = 3, dim: int = 8):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    p = F.normalize(q + 0.7 * F.normalize(torch.randn(batch, dim, generator=gen), dim=-1), dim=-1)
    n = F.normalize(q[:, None] + 1.2 * F.normalize(torch.randn(batch, negatives, dim, generator=gen), dim=-1), dim=-1)
    return q, p, n


# ----------------------------------------------------------------------------------------- config


def test_mixing_config_validation():
    MixingConfig()  # defaults are valid
    MixingConfig(top_k=1, pairs=0, query_mixes=0, beta_max=0.0)
    MixingConfig(beta_max=0.5)
    for bad in (
        dict(top_k=0),
        dict(pairs=-1),
        dict(query_mixes=-1),
        dict(beta_max=0.51),
        dict(beta_max=-0.1),
    ):
        with pytest.raises(ValueError, match="mixing"):
            MixingConfig(**bad)


# ------------------------------------------------------------------------------- hardest negatives

# q0 at angle 0, q1 at angle 1.6; candidates c0 (q0's positive), c1 (q1's positive), then others.
HN_Q = unit([0.0, 1.6])
HN_C = unit([0.05, 1.55, 0.3, -0.5, 1.0, 2.0, 3.0])
# cos(q0, c): .999 (masked) .021 .955 .878 .540 -.416 -.990  -> top 3 allowed: c2 c3 c4
# cos(q1, c): .021 .999 (masked) .267 -.505 .825 .921 .170  -> top 3 allowed: c5 c4 c2


def test_hardest_negatives_picks_top_k_allowed_in_order():
    allowed = torch.ones(2, 7, dtype=torch.bool)
    allowed[0, 0] = allowed[1, 1] = False  # own positives
    hardest = hardest_negatives(HN_Q, HN_C, allowed, top_k=3)
    assert hardest.shape == (2, 3, 2)
    torch.testing.assert_close(hardest[0], HN_C[[2, 3, 4]], atol=0, rtol=0)
    torch.testing.assert_close(hardest[1], HN_C[[5, 4, 2]], atol=0, rtol=0)


def test_hardest_negatives_never_returns_masked_candidates():
    # Row 0 may only use c5 and c6 (its least similar candidates), row 1 c0, c3, c6.
    allowed = torch.zeros(2, 7, dtype=torch.bool)
    allowed[0, [5, 6]] = True
    allowed[1, [0, 3, 6]] = True
    hardest = hardest_negatives(HN_Q, HN_C, allowed, top_k=10)
    # k = min(top_k, fewest allowed in a row) = 2
    assert hardest.shape == (2, 2, 2)
    torch.testing.assert_close(hardest[0], HN_C[[5, 6]], atol=0, rtol=0)
    torch.testing.assert_close(hardest[1], HN_C[[6, 0]], atol=0, rtol=0)  # cos .170 > .021 > -.505


def test_hardest_negatives_needs_a_negative_per_row():
    allowed = torch.ones(2, 7, dtype=torch.bool)
    allowed[1] = False
    with pytest.raises(ValueError, match="at least one negative"):
        hardest_negatives(HN_Q, HN_C, allowed, top_k=2)


# -------------------------------------------------------------------------------------- synthesise


def test_synthesise_shape_unit_norm_and_detached():
    q = F.normalize(torch.randn(5, 8), dim=-1).requires_grad_()
    hardest = F.normalize(torch.randn(5, 3, 8), dim=-1).requires_grad_()
    out = synthesise(q, hardest, MixingConfig(top_k=3, pairs=3, query_mixes=2), torch.Generator().manual_seed(0))
    assert out.shape == (5, 5, 8)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5, 5))
    assert not out.requires_grad and out.grad_fn is None
    empty = synthesise(q, hardest, MixingConfig(top_k=3, pairs=0, query_mixes=0))
    assert empty.shape == (5, 0, 8)


def test_query_mixes_stay_within_beta_max():
    # q = e1 and the only hardest negative n = e2: h' = norm(b e1 + (1 - b) e2) gives b = h_x / (h_x + h_y).
    batch, beta_max = 200, 0.2
    q = torch.tensor([[1.0, 0.0]]).repeat(batch, 1)
    hardest = torch.tensor([[[0.0, 1.0]]]).repeat(batch, 1, 1)
    cfg = MixingConfig(top_k=1, pairs=0, query_mixes=4, beta_max=beta_max)
    out = synthesise(q, hardest, cfg, torch.Generator().manual_seed(3))
    b = out[..., 0] / (out[..., 0] + out[..., 1])
    assert (b >= 0).all() and (b <= beta_max + 1e-6).all()
    assert b.max() > 0.9 * beta_max and b.min() < 0.1 * beta_max  # really drawn over [0, beta_max)
    # beta_max = 0: the "mix" is the negative itself.
    none = synthesise(q, hardest, MixingConfig(top_k=1, pairs=0, query_mixes=2, beta_max=0.0))
    torch.testing.assert_close(none, hardest.expand(batch, 2, 2))


def test_query_mixes_stay_closer_to_the_negative_than_to_the_query():
    q, _, n = random_batch(0, batch=64, negatives=3, dim=16)
    out = synthesise(q, n, MixingConfig(top_k=3, pairs=0, query_mixes=8, beta_max=0.5), torch.Generator().manual_seed(1))
    to_query = torch.einsum("bd,bmd->bm", q, out)
    to_negatives = torch.einsum("bmd,bkd->bmk", out, n).amax(dim=-1)
    assert (to_query <= to_negatives + 1e-6).all()
    # ... and closer to the query than the negatives are (the point of mixing the query in).
    assert (to_query.mean() > torch.einsum("bd,bkd->bk", q, n).mean())


def test_pair_mixes_lie_between_two_hardest_negatives():
    batch = 50
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    hardest = torch.stack([e1, e2]).repeat(batch, 1, 1)
    q = F.normalize(torch.ones(batch, 2), dim=-1)
    out = synthesise(q, hardest, MixingConfig(top_k=2, pairs=6, query_mixes=0), torch.Generator().manual_seed(5))
    # On the arc from e1 to e2: both coordinates in [0, 1], unit norm.
    assert (out >= 0).all() and (out <= 1 + 1e-6).all()
    interior = ((out > 1e-3).all(dim=-1)).sum()
    assert interior > 0  # some are genuine mixes of two different negatives


def test_pair_mixes_never_mix_a_negative_with_itself():
    # Three orthogonal hardest negatives: a mix of two different ones has exactly two non-zero
    # coordinates; a negative mixed with itself (a copy) would have one.
    batch = 200
    hardest = torch.eye(3).repeat(batch, 1, 1)
    q = F.normalize(torch.ones(batch, 3), dim=-1)
    out = synthesise(q, hardest, MixingConfig(top_k=3, pairs=4, query_mixes=0), torch.Generator().manual_seed(0))
    assert ((out.abs() > 1e-6).sum(dim=-1) == 2).all()


def test_pair_mixes_are_skipped_with_fewer_than_two_hardest_negatives():
    # Classification-style rows have one label negative: a pair mix would only copy it.
    batch = 8
    n = F.normalize(torch.randn(batch, 1, 2), dim=-1)
    q = F.normalize(torch.randn(batch, 2), dim=-1)
    out = synthesise(q, n, MixingConfig(top_k=1, pairs=3, query_mixes=2), torch.Generator().manual_seed(5))
    assert out.shape == (batch, 2, 2)  # the two query mixes only
    assert not torch.isclose(out, n.expand(batch, 2, 2)).all(dim=-1).any()


# ------------------------------------------------------------------------------------- in the loss


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_mixing_raises_the_loss(gamma):
    q, p, n = random_batch(1)
    plain = KalmContrastiveLoss(0.05, gamma)(q, p, n)
    mixed = KalmContrastiveLoss(0.05, gamma, MixingConfig(), torch.Generator().manual_seed(0))(q, p, n)
    # Extra exponentials in every denominator lower p_i: -(1-p)^gamma log p grows.
    assert mixed > plain + 1e-4
    for in_batch in (True, False):
        plain = KalmContrastiveLoss(0.05, gamma)(q, p, n, in_batch)
        mixed = KalmContrastiveLoss(0.05, gamma, MixingConfig(top_k=2), torch.Generator().manual_seed(0))(q, p, n, in_batch)
        assert mixed > plain


def test_mixing_reproducible_with_seeded_generator():
    q, p, n = random_batch(2)

    def run(seed):
        leaves = [t.clone().requires_grad_() for t in (q, p, n)]
        loss = KalmContrastiveLoss(0.05, 1.0, MixingConfig(), torch.Generator().manual_seed(seed))(*leaves)
        loss.backward()
        return loss, [leaf.grad for leaf in leaves]

    (la, ga), (lb, gb), (lc, _) = run(11), run(11), run(12)
    assert torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert not torch.equal(la, lc)


@pytest.mark.parametrize("in_batch", [True, False])
def test_mixing_gradients_treat_synthetic_negatives_as_constants(in_batch):
    tau, cfg, seed = 0.1, MixingConfig(top_k=3, pairs=2, query_mixes=2, beta_max=0.5), 21
    q, p, n = random_batch(3)
    batch, m, dim = n.shape
    leaves = [t.clone().requires_grad_() for t in (q, p, n)]
    loss = KalmContrastiveLoss(tau, 0.0, cfg, torch.Generator().manual_seed(seed))(*leaves, in_batch_negatives=in_batch)
    loss.backward()

    # Reference: the same synthetic vectors (same seed, same selection) as plain constant tensors,
    # appended to each query's own row; InfoNCE written out with logsumexp.
    cands = torch.cat([p, n.reshape(-1, dim)])
    allowed = torch.ones(batch, len(cands), dtype=torch.bool)
    if not in_batch:
        allowed[:] = False
        for i in range(batch):
            allowed[i, i] = True
            allowed[i, batch + i * m : batch + (i + 1) * m] = True
    negative_mask = allowed.clone()
    negative_mask[torch.arange(batch), torch.arange(batch)] = False
    synthetic = synthesise(q, hardest_negatives(q, cands, negative_mask, cfg.top_k), cfg, torch.Generator().manual_seed(seed))
    synthetic = synthetic.clone()  # a plain constant
    rq, rp, rn = [t.clone().requires_grad_() for t in (q, p, n)]
    rc = torch.cat([rp, rn.reshape(-1, dim)])
    real = (rq @ rc.T).masked_fill(~allowed, float("-inf"))
    syn = (rq[:, None, :] * synthetic).sum(-1)
    logits = torch.cat([real, syn], dim=1) / tau
    ref = (torch.logsumexp(logits, dim=1) - logits[torch.arange(batch), torch.arange(batch)]).mean()
    ref.backward()

    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for ours, theirs in zip(leaves, (rq, rp, rn)):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-5)
    # Not vacuous: the synthetic terms change the gradients w.r.t. the real candidates.
    plain = [t.clone().requires_grad_() for t in (q, p, n)]
    KalmContrastiveLoss(tau)(*plain, in_batch_negatives=in_batch).backward()
    assert not torch.allclose(plain[1].grad, rp.grad, atol=1e-4)


@pytest.mark.parametrize("in_batch", [True, False])
def test_mixing_draws_from_allowed_negatives_only(monkeypatch, in_batch):
    # Each query's own positive is its most similar candidate; query 1's negatives sit right on
    # q_0 (next most similar to q_0), q_0's own negatives are far away.
    q = unit([0.0, 2.0, 4.0])
    p = unit([0.001, 2.001, 4.001])
    n = unit([[2.5, 3.0], [0.02, -0.02], [0.03, 5.0]])
    seen = []

    def spy(queries, candidates, allowed, top_k):
        out = hardest_negatives(queries, candidates, allowed, top_k)
        seen.append(out)
        return out

    monkeypatch.setattr(losses, "hardest_negatives", spy)
    KalmContrastiveLoss(0.05, 0.0, MixingConfig(top_k=2), torch.Generator().manual_seed(0))(q, p, n, in_batch)
    (hardest,) = seen
    for i in range(3):
        rows = {tuple(round(x, 5) for x in v) for v in hardest[i].tolist()}
        assert tuple(round(x, 5) for x in p[i].tolist()) not in rows  # never the own positive
        if not in_batch:
            own = {tuple(round(x, 5) for x in v) for v in n[i].tolist()}
            assert rows == own
    if in_batch:
        expected = {tuple(round(x, 5) for x in v) for v in n[1].tolist()}  # angles +-0.02
        assert {tuple(round(x, 5) for x in v) for v in hardest[0].tolist()} == expected
