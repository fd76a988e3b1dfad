"""Builders that turn source tables into derived training sets and held-out evaluation tasks.

Every training builder returns an *example frame* with the columns of :data:`EXAMPLE_COLUMNS`:
``query``, ``positive``, ``negatives`` (list of hard negatives, possibly empty, filled further by
mining) and ``words`` (every dictionary word the example touches, used by the contamination
filter). Evaluation builders return the JSON payload that :mod:`kalm_lib.mteb_tasks` reads, plus
the set of words they hold out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

EXAMPLE_COLUMNS = ["query", "positive", "negatives", "words"]
Sources = dict[str, pd.DataFrame]


def is_held_out(word: str, fraction: float, seed: int) -> bool:
    """Stable hash split: True for about ``fraction`` of all words, fixed by ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{word}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def _relation_map(frame: pd.DataFrame, column: str) -> dict[str, list[str]]:
    """word -> list of related words."""
    return frame.groupby("word")[column].agg(list).to_dict()


def _examples(query: pd.Series, positive: pd.Series, negatives: list[list[str]], words: list[list[str]]) -> pd.DataFrame:
    """Assemble an example frame."""
    return pd.DataFrame(
        {"query": query.to_numpy(), "positive": positive.to_numpy(), "negatives": negatives, "words": words}
    )


# --- stage 1: weakly supervised pairs ------------------------------------------------------------

def definition_to_word(sources: Sources, input_name: str, text_column: str) -> pd.DataFrame:
    """(definition or gloss -> the word it defines) pairs."""
    frame = sources[input_name]
    return _examples(
        frame[text_column], frame["word"], [[] for _ in range(len(frame))], [[w] for w in frame["word"]]
    )


def gcide_definition_pairs(sources: Sources) -> pd.DataFrame:
    """GCIDE definition -> headword."""
    return definition_to_word(sources, "gcide", "definition")


def oewn_gloss_pairs(sources: Sources) -> pd.DataFrame:
    """WordNet gloss -> lemma."""
    return definition_to_word(sources, "oewn_glosses", "gloss")


def oewn_synonym_pairs(sources: Sources) -> pd.DataFrame:
    """Word -> synonym (a symmetric pair)."""
    frame = sources["oewn_synonyms"]
    words = [[a, b] for a, b in zip(frame["word"], frame["synonym"])]
    return _examples(frame["word"], frame["synonym"], [[] for _ in range(len(frame))], words)


# --- stage 2: triples with hard negatives -----------------------------------------------------

def gloss_retrieval_triples(sources: Sources) -> pd.DataFrame:
    """WordNet gloss -> lemma, seeded with the lemma's antonyms as hard negatives (mining adds more)."""
    frame = sources["oewn_glosses"]
    antonyms = _relation_map(sources["oewn_antonyms"], "antonym")
    negatives = [list(antonyms.get(word, [])) for word in frame["word"]]
    words = [[w, *n] for w, n in zip(frame["word"], negatives)]
    return _examples(frame["gloss"], frame["word"], negatives, words)


def synonym_triples(sources: Sources) -> pd.DataFrame:
    """Word -> synonym with the word's antonyms as hard negatives (mining adds more)."""
    frame = sources["oewn_synonyms"]
    antonyms = _relation_map(sources["oewn_antonyms"], "antonym")
    negatives = [list(antonyms.get(word, [])) for word in frame["word"]]
    words = [[a, b, *n] for a, b, n in zip(frame["word"], frame["synonym"], negatives)]
    return _examples(frame["word"], frame["synonym"], negatives, words)


def relation_classification(sources: Sources) -> pd.DataFrame:
    """"w1, w2" -> its relation label ("synonyms"/"antonyms"); the other label is the negative.

    Classification-style data: other examples' positives share the label space, so the card sets
    ``in_batch_negatives: false`` and the loss uses only the explicit negative.
    """
    ant = sources["oewn_antonyms"]
    syn = sources["oewn_synonyms"]
    syn = syn[syn["word"].isin(set(ant["word"]))]
    rows = [(f"{a}, {b}", "antonyms", ["synonyms"], [a, b]) for a, b in zip(ant["word"], ant["antonym"])]
    rows += [(f"{a}, {b}", "synonyms", ["antonyms"], [a, b]) for a, b in zip(syn["word"], syn["synonym"])]
    return pd.DataFrame(rows, columns=EXAMPLE_COLUMNS)


def hub_pairs(sources: Sources, input_name: str) -> pd.DataFrame:
    """Generic (query, positive[, negative]) rows of a hub source; no dictionary words involved."""
    frame = sources[input_name]
    negatives = [[n] for n in frame["negative"]] if "negative" in frame else [[] for _ in range(len(frame))]
    return _examples(frame["query"], frame["positive"], negatives, [[] for _ in range(len(frame))])


# --- held-out evaluation tasks ----------------------------------------------------------------

@dataclass(frozen=True)
class EvalTask:
    """An evaluation payload (for :mod:`kalm_lib.mteb_tasks`) and the words it holds out."""

    payload: dict
    words: frozenset[str]
    texts: frozenset[str]


def definition_retrieval_task(
    sources: Sources, held_out: Callable[[str], bool], n_queries: int, rng: np.random.Generator, instruction: str
) -> EvalTask:
    """GCIDE definition -> headword retrieval over a corpus of held-out headwords only."""
    frame = sources["gcide"]
    frame = frame[frame["word"].map(held_out)]
    corpus_words = sorted(set(frame["word"]))
    first = frame.drop_duplicates("word")
    picked = first.iloc[rng.permutation(len(first))[:n_queries]]
    queries = {f"q{i}": text for i, text in enumerate(picked["definition"])}
    doc_ids = {word: f"d{i}" for i, word in enumerate(corpus_words)}
    qrels = {f"q{i}": {doc_ids[word]: 1} for i, word in enumerate(picked["word"])}
    payload = {
        "name": "KalmDefinitionRetrieval",
        "instruction": instruction,
        "queries": queries,
        "corpus": {doc_id: word for word, doc_id in doc_ids.items()},
        "qrels": qrels,
    }
    return EvalTask(payload, frozenset(corpus_words), frozenset(queries.values()))


def synonym_antonym_task(
    sources: Sources, held_out: Callable[[str], bool], n_pairs: int, rng: np.random.Generator, instruction: str
) -> EvalTask:
    """Pairs (word, synonym)=1 and (word, antonym)=0 for held-out words having both relations."""
    synonyms = _relation_map(sources["oewn_synonyms"], "synonym")
    antonyms = _relation_map(sources["oewn_antonyms"], "antonym")
    seeds = sorted(w for w in antonyms if w in synonyms and held_out(w))
    seeds = [seeds[i] for i in rng.permutation(len(seeds))[: max(1, n_pairs // 2)]]
    s1, s2, labels = [], [], []
    for word in seeds:
        for other, label in ((rng.choice(synonyms[word]), 1), (rng.choice(antonyms[word]), 0)):
            s1.append(word)
            s2.append(str(other))
            labels.append(label)
    payload = {
        "name": "KalmSynonymAntonymPairClassification",
        "instruction": instruction,
        "sentence1": s1,
        "sentence2": s2,
        "labels": labels,
    }
    words = frozenset(s1) | frozenset(s2)
    return EvalTask(payload, words, words)


def synset_clustering_task(
    sources: Sources, held_out: Callable[[str], bool], n_clusters: int, rng: np.random.Generator, instruction: str
) -> EvalTask:
    """Cluster held-out words by synonym set: each cluster is a word and 3-6 of its synonyms."""
    synonyms = _relation_map(sources["oewn_synonyms"], "synonym")
    seeds = [w for w in sorted(synonyms) if held_out(w) and len(set(synonyms[w])) >= 3]
    used: set[str] = set()
    sentences: list[str] = []
    labels: list[int] = []
    for index in rng.permutation(len(seeds)):
        members = [seeds[index], *sorted(set(synonyms[seeds[index]]))[:6]]
        if used.intersection(members):
            continue
        used.update(members)
        sentences.extend(members)
        labels.extend([len(set(labels))] * len(members))
        if len(set(labels)) >= n_clusters:
            break
    payload = {"name": "KalmSynsetClustering", "instruction": instruction, "sentences": sentences, "labels": labels}
    return EvalTask(payload, frozenset(used), frozenset(used))


SINGLE_INPUT_BUILDERS: dict[str, Callable[[Sources, str], pd.DataFrame]] = {"hub_pairs": hub_pairs}
TRAIN_BUILDERS: dict[str, Callable[[Sources], pd.DataFrame]] = {
    "gcide_definition_pairs": gcide_definition_pairs,
    "oewn_gloss_pairs": oewn_gloss_pairs,
    "oewn_synonym_pairs": oewn_synonym_pairs,
    "gloss_retrieval_triples": gloss_retrieval_triples,
    "synonym_triples": synonym_triples,
    "relation_classification": relation_classification,
}
EVAL_BUILDERS = {
    "definition_retrieval_task": definition_retrieval_task,
    "synonym_antonym_task": synonym_antonym_task,
    "synset_clustering_task": synset_clustering_task,
}
