"""Data-quality guarantees: normalised sources, answer-free and cross-reference-free evaluation
queries, spelling-insensitive and near-duplicate decontamination (also against standard mteb
tasks), and a curation seed that leaves the held-out split alone.

Each test failed on the pre-fix code (main at a8fed37) before the fix it guards was made.
"""

import functools
import re
from dataclasses import replace

import pandas as pd
import pytest

from kalm_lib import sources as source_loaders
from kalm_lib.builders import TRAIN_BUILDERS
from kalm_lib.config import load_profile
from kalm_lib.curation import curate, load_all_sources
from kalm_lib.data_cards import load_cards
from kalm_lib.layout import DATA_CARDS_DIR

SOURCE_CARD = """\
name: {name}
kind: source
description: test source
source: a test
license: CC0
loader: {loader}
fields: {fields}
"""
# Independent oracles (deliberately simpler than the library's rules, which must cover them).
CROSS_REFERENCE = re.compile(
    r"^\W*(?:see\b|same as\b|alt\. of\b|(?:a )?variant (?:spelling )?of\b|imp\.|p\. ?p\.|p\. ?pr\.|pl\. of\b)",
    re.IGNORECASE,
)
MARKUP_WORD = re.compile(r"[\[\](){}*\"`\\<>]")
MARKUP_TEXT = re.compile(r"1913 webster|webster 1913|<--|[{}*`\\]", re.IGNORECASE)


@functools.cache
def answer_pattern(word: str) -> re.Pattern:
    """Casefolded, word-boundary match of the word (any of - _ space or nothing between its parts)
    or the word plus a plain inflectional suffix."""
    parts = [re.escape(p) for p in re.split(r"[\s_-]+", word.casefold()) if p]
    return re.compile(r"(?<![^\W_])" + r"[\s_-]*".join(parts) + r"(?:s|es|'s|d|ed|ing|er|est|ly)?(?![^\W_])")


def contains_answer(text: str, word: str) -> bool:
    if word.isalnum():  # fast path: a token of the text is the word or the word plus a suffix
        tokens = set(re.findall(r"[^\W_]+", text.casefold()))
        return any(word.casefold() + suffix in tokens for suffix in ("", "s", "es", "d", "ed", "ing", "er", "est", "ly"))
    return answer_pattern(word).search(text.casefold()) is not None


def write_cards(folder, cards: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in cards.items():
        (folder / f"{name}.yaml").write_text(text)


# --- 1. source text is normalised ------------------------------------------------------------

def test_load_all_sources_normalises_string_columns(tmp_path, monkeypatch):
    write_cards(tmp_path, {"demo": SOURCE_CARD.format(name="demo", loader="gcide", fields="[word, definition]")})
    raw = pd.DataFrame({"word": ["ﬁne print"], "definition": ["  small\u00a0 type,\n\tas in a contract "]})
    monkeypatch.setitem(source_loaders.LOADERS, "gcide", lambda card: raw)
    loaded = load_all_sources(load_cards(tmp_path), {"demo"})["demo"]
    assert loaded.to_dict("list") == {"word": ["fine print"], "definition": ["small type, as in a contract"]}, (
        f"dtypes {raw.dtypes.to_dict()}: text columns were not normalised"
    )


# --- 2. evaluation and training texts do not contain their answer ------------------------------

@pytest.fixture(scope="module")
def cpu_curated():
    """The cpu profile's held-out tasks (its seed and eval settings), small training caps."""
    profile = load_profile("cpu")
    cfg = replace(profile.data, max_stage1_pairs_per_source=200, max_stage2_per_source=100)
    return curate(cfg, profile.seed, DATA_CARDS_DIR / "offline")


@pytest.mark.parametrize("name", ["eval_definition_retrieval", "validation_definition_retrieval"])
def test_retrieval_queries_are_answer_free_and_not_cross_references(cpu_curated, name):
    payload = cpu_curated.evals[name].payload
    corpus, queries = payload["corpus"], payload["queries"]
    answers = {qid: corpus[next(iter(docs))] for qid, docs in payload["qrels"].items()}
    leaking = [(answers[q], t) for q, t in queries.items() if contains_answer(t, answers[q])]
    cross = [(answers[q], t) for q, t in queries.items() if CROSS_REFERENCE.search(t)]
    markup = [w for w in corpus.values() if MARKUP_WORD.search(w)] + [t for t in queries.values() if MARKUP_TEXT.search(t)]
    assert len(queries) == load_profile("cpu").data.eval_retrieval_queries
    assert not leaking, f"{len(leaking)} of {len(queries)} queries contain their answer, e.g. {leaking[:4]}"
    assert not cross, f"{len(cross)} queries are cross-references, e.g. {cross[:4]}"
    assert not markup, f"{len(markup)} corpus words / queries are markup, e.g. {markup[:3]}"


@pytest.fixture(scope="module")
def real_sources():
    cards = load_cards(DATA_CARDS_DIR / "offline")
    return load_all_sources(cards, {"gcide", "oewn_glosses", "oewn_synonyms", "oewn_antonyms"})


@pytest.mark.parametrize("builder", ["gcide_definition_pairs", "oewn_gloss_pairs", "gloss_retrieval_triples"])
def test_training_definitions_do_not_contain_their_answer(real_sources, builder):
    frame = TRAIN_BUILDERS[builder](real_sources)
    leaking = [(p, q) for q, p in zip(frame["query"], frame["positive"]) if contains_answer(q, p)]
    assert len(frame) > 50_000
    assert not leaking, f"{builder}: {len(leaking)} of {len(frame)} rows contain their answer, e.g. {leaking[:4]}"


def test_gcide_training_pairs_have_no_cross_references_or_markup(real_sources):
    frame = TRAIN_BUILDERS["gcide_definition_pairs"](real_sources)
    bad = [
        (p, q) for q, p in zip(frame["query"], frame["positive"])
        if CROSS_REFERENCE.search(q) or MARKUP_WORD.search(p) or MARKUP_TEXT.search(q)
    ]
    assert not bad, f"{len(bad)} rows are cross-references or markup, e.g. {bad[:4]}"
