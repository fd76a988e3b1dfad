"""Length-sorted chunks: budgets hold, every text is embedded once, order comes back."""

from __future__ import annotations

import pytest
import torch

from kalm_lib.chunking import embed_chunks, length_sorted_chunks, plan_chunks
from kalm_lib.config import ModelConfig
from kalm_lib.encoder import load_encoder

TEXTS = [
    "a", "a somewhat longer text about rivers and the sea", "cat", "a medium sized sentence",
    "dog", "the quick brown fox jumps over the lazy dog again and again", "sun", "a short one",
]


def test_hand_worked_example():
    # sorted longest first: 10 (i=1), 9 (i=3), 5 (i=0), 4 (i=4), 1 (i=2)
    lengths = [5, 10, 1, 9, 4]
    # budget 20 tokens, padding up to half: [10, 9] pads to 20; 5 would make 30 > 20
    assert length_sorted_chunks(lengths, 20, 0.5) == [[1, 3], [0, 4, 2]]
    # [5, 4, 1] = 15 padded, 10 real: padding 5/15 > 0.25 closes the chunk before the 1
    assert length_sorted_chunks(lengths, 20, 0.25) == [[1, 3], [0, 4], [2]]


def test_budgets_hold_and_each_index_appears_once():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 65, (500,), generator=generator).tolist()
    chunks = length_sorted_chunks(lengths, 512, 0.1)
    assert sorted(i for c in chunks for i in c) == list(range(500))
    for chunk in chunks:
        width = max(lengths[i] for i in chunk)
        padded, real = width * len(chunk), sum(lengths[i] for i in chunk)
        assert padded <= 512
        assert padded - real <= 0.1 * padded
    all_padded = 500 * max(lengths)
    assert sum(max(lengths[i] for i in c) * len(c) for c in chunks) < 0.6 * all_padded


def test_a_text_over_the_budget_gets_its_own_chunk():
    assert length_sorted_chunks([3, 50, 2], 16, 0.5) == [[1], [0, 2]]


@pytest.mark.parametrize(
    ("max_tokens", "max_padding", "message"), [(0, 0.1, "max_tokens"), (8, 1.0, "max_padding"), (8, -0.1, "max_padding")]
)
def test_bad_budgets_are_named(max_tokens, max_padding, message):
    with pytest.raises(ValueError, match=message):
        length_sorted_chunks([1, 2], max_tokens, max_padding)


def test_chunked_embeddings_come_back_in_input_order():
    encoder = load_encoder(ModelConfig(max_length=32)).eval()
    chunks = plan_chunks(encoder, TEXTS, 24)
    assert len(chunks) > 2
    with torch.no_grad():
        chunked = embed_chunks(encoder, chunks)
        one_by_one = torch.cat([encoder.embed([t]) for t in TEXTS])
    torch.testing.assert_close(chunked, one_by_one, atol=1e-5, rtol=0)


def test_nothing_to_embed_is_an_error():
    encoder = load_encoder(ModelConfig(max_length=32))
    with pytest.raises(ValueError, match="no texts"):
        plan_chunks(encoder, [], 24)
