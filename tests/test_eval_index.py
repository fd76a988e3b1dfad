"""The evaluation near-duplicate index on disk (issue #14): the same flags as a datasketch MinHash
LSH index with the same threshold and weights, memory-mapped after a save, built once for the
streamed curation and used by the in-memory one."""

import numpy as np
import pytest
from datasketch import MinHashLSH

from kalm_lib.dedup import NUM_PERM, signatures
from kalm_lib.eval_index import EVAL_INDEX_WEIGHTS, BandIndex, TextHashes, band_keys, band_shape, text_keys


def texts_and_near_copies(seed: int) -> tuple[list[str], list[str]]:
    """Evaluation texts and queries: a third unrelated, the rest copies with 0-3 words replaced."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(2000)]
    evaluation = [" ".join(rng.choice(words, 12)) for _ in range(400)]
    queries = []
    for i in range(600):
        tokens = list(rng.choice(words, 12)) if i % 3 == 0 else evaluation[rng.integers(len(evaluation))].split()
        for _ in range(int(rng.integers(0, 4)) if i % 3 else 0):
            tokens[rng.integers(len(tokens))] = str(rng.choice(words))
        queries.append(" ".join(tokens))
    return evaluation, queries


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_band_index_flags_what_the_lsh_index_flags(tmp_path, threshold):
    evaluation, queries = texts_and_near_copies(0)
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM, weights=EVAL_INDEX_WEIGHTS)
    for key, signature in enumerate(signatures(sorted(set(evaluation)))):
        lsh.insert(str(key), signature)
    expected = np.array([bool(lsh.query(signature)) for signature in signatures(queries)])
    index = BandIndex.build(evaluation, threshold)
    assert index.keys.shape == (band_shape(threshold)[0], len(set(evaluation)))
    index.save(tmp_path / "index.npy")
    loaded = BandIndex.load(tmp_path / "index.npy")
    assert isinstance(loaded.keys, np.memmap) and loaded.rows == index.rows
    flags = loaded.flags(queries)
    assert 0 < flags.sum() < len(queries) and np.array_equal(flags, expected)


def test_band_keys_are_the_hand_computed_polynomial():
    values = np.array([[1, 2, 3, 4, 5, 6]], dtype=np.uint64)
    p = 0x9E3779B97F4A7C15
    expected = [(1 * p + 2 * p**2 + 3 * p**3) % 2**64, (4 * p + 5 * p**2 + 6 * p**3) % 2**64]
    assert band_keys(values, bands=2, rows=3).tolist() == [expected]


def test_an_empty_index_flags_nothing(tmp_path):
    index = BandIndex.build([], 0.8)
    index.save(tmp_path / "empty.npy")
    assert not BandIndex.load(tmp_path / "empty.npy").flags(["any text at all"]).any()
    assert BandIndex.build(["a text"], 0.8).flags([]).size == 0


def test_text_keys_are_the_same_whatever_the_block():
    evaluation, _ = texts_and_near_copies(1)
    whole = text_keys(evaluation, 9, 4, block=len(evaluation))
    assert whole.shape == (len(evaluation), 9)
    assert np.array_equal(text_keys(evaluation, 9, 4, block=7), whole)


def test_text_hashes_answer_membership_after_a_save(tmp_path):
    members = TextHashes.build(["alpha", "beta", "beta", "gamma"])
    assert len(members.hashes) == 3 and np.all(members.hashes[1:] > members.hashes[:-1])
    members.save(tmp_path / "set.npy")
    loaded = TextHashes.load(tmp_path / "set.npy")
    assert isinstance(loaded.hashes, np.memmap)
    assert loaded.contains(["beta", "delta", "alpha", "Alpha", "gamma "]).tolist() == [True, False, True, False, False]
    assert TextHashes.build([]).contains(["alpha"]).tolist() == [False] and loaded.contains([]).size == 0
