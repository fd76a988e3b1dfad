"""The evaluation indexes of the curation as sorted 64-bit keys, built once and memory-mapped.

A streamed curation asks, in every datatrove task (each worker of the local executor, each Slurm
or Ray job), whether a training row repeats an evaluation text, touches a held-out word, or is a
near-duplicate of an evaluation text. Python sets and a datasketch ``MinHashLSH`` live in one
process, so each task would get its own copy (pickled) or rebuild it: at the paper's evaluation
sets (millions of MTEB texts) gigabytes per worker and hours per task. Here each answer is a sorted
uint64 array saved once as ``.npy`` and memory-mapped by every task, searched by bisection:

- :class:`TextHashes`: exact membership of texts (or word keys) by a 64-bit BLAKE2b digest.
- :class:`BandIndex`: the near-duplicate test of both curation paths
  (:func:`kalm_lib.curation.drop_eval_near_duplicates` and :mod:`kalm_lib.scale`), MinHash LSH over
  the character shingles of :mod:`kalm_lib.dedup`: a text is flagged when one of its b bands of r
  MinHash values equals that band of an evaluation text. For each band it holds the sorted keys of
  the evaluation texts' band values. Bands and rows per band are those datasketch's ``MinHashLSH``
  picks for the same threshold and :data:`EVAL_INDEX_WEIGHTS`, and a band key is
  h(v) = sum_j v_j * P^j mod 2^64 over the band's r MinHash values v_j (P a fixed odd 64-bit
  multiplier): equal bands give equal keys, so every text the ``MinHashLSH`` flags is flagged here
  (tested against it).

Either flags a text wrongly only when two different texts (or bands) collide in 64 bits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dedup import NUM_PERM, lsh_bands, signatures

# LSH (false positive, false negative) weights of the evaluation index: missing a copy of an
# evaluation text costs more than dropping a training row. At threshold 0.8 a training text is
# dropped with probability ~0.88 at Jaccard 0.8, 0.97 at 0.85, > 0.99 at 0.9; ~0.5 at 0.7, ~0.2 at 0.6.
EVAL_INDEX_WEIGHTS = (0.1, 0.9)
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd, so each band value's multiplier is invertible mod 2^64


def band_shape(threshold: float) -> tuple[int, int]:
    """(bands, rows per band) a ``MinHashLSH`` with :data:`EVAL_INDEX_WEIGHTS` uses for ``threshold``."""
    return lsh_bands(threshold, NUM_PERM, EVAL_INDEX_WEIGHTS)


def band_keys(hashvalues: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[texts, bands] uint64 keys h(v) = sum_j v_j * P^j mod 2^64 of each band's ``rows`` values."""
    values = hashvalues[:, : bands * rows].astype(np.uint64).reshape(len(hashvalues), bands, rows)
    with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
        powers = np.cumprod(np.full(rows, _MULTIPLIER, dtype=np.uint64), dtype=np.uint64)
        return (values * powers).sum(axis=2, dtype=np.uint64)


def text_keys(texts: list[str], bands: int, rows: int, block: int = 10_000) -> np.ndarray:
    """:func:`band_keys` of the texts' MinHash signatures (:func:`~kalm_lib.dedup.signatures`),
    ``block`` texts at a time: only one block's shingles and MinHash objects exist at once (the
    paper profile indexes millions of MTEB texts), the result is [texts, bands] uint64."""
    keys = [band_keys(np.stack([signature.hashvalues for signature in signatures(texts[start : start + block])]), bands, rows)
            for start in range(0, len(texts), block)]
    return np.concatenate(keys) if keys else np.empty((0, bands), dtype=np.uint64)


@dataclass(frozen=True)
class BandIndex:
    """Per band, the sorted keys of the evaluation texts (``keys[i]``: band i)."""

    keys: np.ndarray  # [bands, texts] uint64, each row sorted
    rows: int  # MinHash values per band

    @classmethod
    def build(cls, texts: Iterable[str], threshold: float) -> BandIndex:
        """The index of the (distinct) evaluation texts for ``threshold``."""
        bands, rows = band_shape(threshold)
        keys = text_keys(sorted(set(texts)), bands, rows)
        return cls(np.sort(keys.T, axis=1), rows)

    def save(self, path: Path) -> None:
        """Write the keys as ``path`` (``.npy``; the rows per band in the file name's sibling ``.rows``)."""
        np.save(path, self.keys)
        path.with_suffix(".rows").write_text(str(self.rows))

    @classmethod
    def load(cls, path: Path) -> BandIndex:
        """The index :meth:`save` wrote, its keys memory-mapped (nothing read until searched)."""
        return cls(np.load(path, mmap_mode="r"), int(path.with_suffix(".rows").read_text()))

    def flags(self, texts: list[str]) -> np.ndarray:
        """Per text: does it share a band with an evaluation text (the ``MinHashLSH`` query)?"""
        found = np.zeros(len(texts), dtype=bool)
        if not self.keys.shape[1] or not texts:
            return found
        queried = text_keys(texts, self.keys.shape[0], self.rows)
        for band, sorted_keys in enumerate(self.keys):
            at = np.minimum(np.searchsorted(sorted_keys, queried[:, band]), len(sorted_keys) - 1)
            found |= sorted_keys[at] == queried[:, band]
        return found


def text_hashes(texts: Iterable[str]) -> np.ndarray:
    """uint64 BLAKE2b digests (8 bytes, of the UTF-8 text), in the texts' order."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in texts), dtype=np.uint64)


@dataclass(frozen=True)
class TextHashes:
    """A set of texts as the sorted unique :func:`text_hashes` of its members."""

    hashes: np.ndarray  # [members] uint64, sorted

    @classmethod
    def build(cls, texts: Iterable[str]) -> TextHashes:
        """The set of ``texts``."""
        return cls(np.unique(text_hashes(texts)))

    def save(self, path: Path) -> None:
        """Write the hashes as ``path`` (``.npy``)."""
        np.save(path, self.hashes)

    @classmethod
    def load(cls, path: Path) -> TextHashes:
        """The set :meth:`save` wrote, memory-mapped."""
        return cls(np.load(path, mmap_mode="r"))

    def contains(self, texts: list[str]) -> np.ndarray:
        """Per text: is it a member?"""
        if not len(self.hashes) or not texts:
            return np.zeros(len(texts), dtype=bool)
        queried = text_hashes(texts)
        at = np.minimum(np.searchsorted(self.hashes, queried), len(self.hashes) - 1)
        return self.hashes[at] == queried
