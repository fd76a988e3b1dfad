"""Model soup: exact averaging and greedy selection."""

import pytest
import torch

from kalm_lib.soup import average_states, greedy_soup


def test_uniform_average_is_exact():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([3])}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor([3])}
    c = {"w": torch.tensor([2.0, 1.0]), "n": torch.tensor([3])}
    soup = average_states([a, b, c])
    assert torch.equal(soup["w"], torch.tensor([2.0, 3.0]))
    assert torch.equal(soup["n"], torch.tensor([3]))


def test_average_keeps_dtype_and_uses_double_accumulation():
    states = [{"w": torch.full((4,), v, dtype=torch.bfloat16)} for v in (1.0, 1.0, 4.0)]
    soup = average_states(states)
    assert soup["w"].dtype == torch.bfloat16 and torch.equal(soup["w"], torch.full((4,), 2.0, dtype=torch.bfloat16))


def test_average_rejects_mismatches():
    with pytest.raises(ValueError, match="zero checkpoints"):
        average_states([])
    with pytest.raises(ValueError, match="different parameters"):
        average_states([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="integer tensor 'n'"):
        average_states([{"n": torch.tensor([1])}, {"n": torch.tensor([2])}])


def test_greedy_soup_keeps_only_helpful_checkpoints():
    # score = -|w - 1|: checkpoints at 0.8, 1.3, 5.0; best single 0.8; adding 1.3 -> 1.05 (better);
    # adding 5.0 -> 2.37 (worse) so it is left out.
    states = [{"w": torch.tensor([0.8])}, {"w": torch.tensor([1.3])}, {"w": torch.tensor([5.0])}]
    result = greedy_soup(states, lambda s: -abs(float(s["w"]) - 1.0))
    assert result.chosen == [0, 1]
    assert [step["kept"] for step in result.trace] == [True, True, False]
    assert float(result.state["w"]) == pytest.approx(1.05)
    assert result.score == pytest.approx(-0.05)
    assert result.singles == pytest.approx([-0.2, -0.3, -4.0])
