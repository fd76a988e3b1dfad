"""Pooling checked against hand computation, with right, left and no padding."""

import pytest
import torch

from kalm_lib.pooling import POOLING_MODES, first_token_index, last_token_index, pool

# Row 0 is right-padded, row 1 left-padded, row 2 unpadded.
HIDDEN = torch.arange(18, dtype=torch.float32).reshape(3, 3, 2)
MASK = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 1, 1]])

EXPECTED = {
    "mean": [[1.0, 2.0], [9.0, 10.0], [14.0, 15.0]],
    "last": [[2.0, 3.0], [10.0, 11.0], [16.0, 17.0]],
    "cls": [[0.0, 1.0], [8.0, 9.0], [12.0, 13.0]],
}


def test_pooling_modes_constant() -> None:
    assert POOLING_MODES == ("mean", "last", "cls")


def test_token_indices() -> None:
    assert first_token_index(MASK).tolist() == [0, 1, 0]
    assert last_token_index(MASK).tolist() == [1, 2, 2]


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pool_matches_hand_computation(mode: str) -> None:
    torch.testing.assert_close(pool(HIDDEN, MASK, mode), torch.tensor(EXPECTED[mode]))


def test_mean_is_default() -> None:
    torch.testing.assert_close(pool(HIDDEN, MASK), torch.tensor(EXPECTED["mean"]))


def test_mean_on_bf16_accumulates_in_float32() -> None:
    # The token count 257 is not representable in bf16 (it rounds to 256): a bf16 mean would give 2.0.
    hidden = torch.ones(1, 257, 1, dtype=torch.bfloat16)
    hidden[0, 0, 0] = 256.0
    pooled = pool(hidden, torch.ones(1, 257), "mean")
    assert pooled.dtype == torch.bfloat16
    assert pooled.item() == torch.tensor(512.0 / 257.0, dtype=torch.bfloat16).item()


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_padding_values_are_ignored(mode: str) -> None:
    noisy = HIDDEN.clone()
    noisy[MASK == 0] = 1e6
    torch.testing.assert_close(pool(noisy, MASK, mode), torch.tensor(EXPECTED[mode]))


def test_unknown_mode_names_allowed_modes() -> None:
    with pytest.raises(ValueError, match="allowed modes: mean, last, cls"):
        pool(HIDDEN, MASK, "max")  # type: ignore[arg-type]


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="attention_mask"):
        pool(HIDDEN, MASK[:, :2])
