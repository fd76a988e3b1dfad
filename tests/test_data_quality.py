"""Data-quality guarantees: normalised sources, answer-free and cross-reference-free evaluation
queries, spelling-insensitive and near-duplicate decontamination (also against standard mteb
tasks), and a curation seed that leaves the held-out split alone.

Each test failed on the pre-fix code (main at a8fed37) before the fix it guards was made.
"""

import functools
import json
import os
import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from kalm_lib import sources as source_loaders
from kalm_lib.builders import TRAIN_BUILDERS, definition_retrieval_task, is_held_out
from kalm_lib.config import DataConfig, load_profile
from kalm_lib.curation import curate, decontaminate, load_all_sources
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
DERIVED_CARD = """\
name: {name}
kind: derived
stage: {stage}
builder: {builder}
inputs: [{input}]
task_type: retrieval
description: test set
instruction: Given a dictionary definition, retrieve the word it defines
license: CC0
fields: [query, positive, negatives, words]
split: {split}
eval_file: definition_retrieval.json
"""
# Independent oracles (deliberately simpler than the library's rules, which must cover them).
CROSS_REFERENCE = re.compile(
    r"^\W*(?:see\b|same as\b|alt\. of\b|(?:a )?variant (?:spelling )?of\b|imp\.|p\. ?p\.|p\. ?pr\.|pl\. of\b)",
    re.IGNORECASE,
)
POINTER = re.compile(r"(?:^|[.;(]\s*)(?:see|cf\.)\s", re.IGNORECASE)  # "... See Marque." anywhere
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
    return answer_pattern(word).search(text.casefold()) is not None or all_parts_present(text, word)


def inflects_a_token(text: str, word: str) -> bool:
    """The answer is a token of the text (4 letters or more) plus a plain suffix ("quiet" for
    *quietness*; e dropped before a vowel, y -> i after a consonant), contains a token of 5
    letters or more at its start or end ("pacify" for *repacify*) or all but the last letter of
    one of 7 letters or more ("pragmatic" for *pragmatist*), or is two tokens written together
    ("beech", "nut" for *beechnut*)."""
    tokens = set(re.findall(r"[^\W_]+", text.casefold()))
    answer = "".join(re.findall(r"[^\W_]+", word.casefold()))
    suffixes = ("s", "es", "d", "ed", "ing", "er", "est", "ly", "ness")
    for token in (t for t in tokens if len(t) >= 4):
        stems = [(token, suffixes)]
        if token.endswith("e"):
            stems.append((token[:-1], ("ed", "er", "es", "est", "ing")))
        if token.endswith("y") and token[-2] not in "aeiou":
            stems.append((token[:-1] + "i", ("es", "ed", "er", "est", "ly", "ness")))
        if any(answer == stem + suffix for stem, endings in stems for suffix in endings):
            return True
    if any(len(t) >= 5 and (answer.startswith(t) or answer.endswith(t)) for t in tokens):
        return True  # a word of the text with an affix ("pacify", repacify)
    if any(min(len(t), len(answer)) >= 7 and os.path.commonprefix([t, answer]) == t[:-1] for t in tokens):
        return True  # the stem up to the token's last letter ("pragmatic", pragmatist)
    long = [t for t in tokens if len(t) >= 3]
    return any(answer == a + b for a in long for b in long if a != b)


def all_parts_present(text: str, word: str) -> bool:
    """A multi-word answer given away in pieces: each part of the word (or the part plus a plain
    suffix, or the part's stem before a final e / y) is a token of the text."""
    tokens = set(re.findall(r"[^\W_]+", text.casefold()))
    parts = re.findall(r"[^\W_]+", word.casefold())
    suffixes = ("", "s", "es", "d", "ed", "ing", "er", "est", "ly")

    def forms(part: str) -> set[str]:
        stems = {part + x for x in suffixes}
        if part.endswith("e"):  # dance -> dancing
            stems |= {part[:-1] + x for x in ("ing", "ed", "er", "est", "es")}
        if part.endswith("y"):  # theory -> theories
            stems |= {part[:-1] + "i" + x for x in ("es", "ed", "er", "est", "ly")}
        return stems

    return len(parts) > 1 and all(not tokens.isdisjoint(forms(p)) for p in parts)


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
    leaking = [(answers[q], t) for q, t in queries.items() if contains_answer(t, answers[q]) or inflects_a_token(t, answers[q])]
    cross = [(answers[q], t) for q, t in queries.items() if CROSS_REFERENCE.search(t) or POINTER.search(t)]
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
    leaking = [(p, q) for q, p in zip(frame["query"], frame["positive"]) if contains_answer(q, p) or inflects_a_token(q, p)]
    assert len(frame) > 50_000
    assert not leaking, f"{builder}: {len(leaking)} of {len(frame)} rows contain their answer, e.g. {leaking[:4]}"


def test_gcide_training_pairs_have_no_cross_references_or_markup(real_sources):
    frame = TRAIN_BUILDERS["gcide_definition_pairs"](real_sources)
    bad = [
        (p, q) for q, p in zip(frame["query"], frame["positive"])
        if CROSS_REFERENCE.search(q) or POINTER.search(q) or MARKUP_WORD.search(p) or MARKUP_TEXT.search(q)
    ]
    assert not bad, f"{len(bad)} rows are cross-references or markup, e.g. {bad[:4]}"


# --- 3a. one word, every spelling ---------------------------------------------------------------

SPELLINGS = ["ice cream", "ice-cream", "ice_cream", "Ice Cream", "icecream", "ICE–CREAM"]


def test_held_out_split_puts_every_spelling_on_one_side():
    split = {seed: {s: is_held_out(s, 0.5, seed) for s in SPELLINGS} for seed in range(12)}
    mixed = {seed: sides for seed, sides in split.items() if len(set(sides.values())) > 1}
    assert not mixed, f"spellings of one word on both sides of the split: {mixed}"


def test_retrieval_corpus_has_one_document_per_word_whatever_its_spelling():
    gcide = pd.DataFrame({
        "word": ["ice cream", "ice-cream", "Ice Cream", "sorbet"],
        "definition": ["A frozen dessert of cream.", "A frozen food made of cream.", "A cold sweet.", "A water ice."],
    })
    task = definition_retrieval_task({"gcide": gcide}, lambda word: True, 10, np.random.default_rng(0), "x")
    corpus, qrels = task.payload["corpus"], task.payload["qrels"]
    assert len(corpus) == 2 and "sorbet" in corpus.values(), corpus
    assert len(qrels) == 2 and {next(iter(docs)) for docs in qrels.values()} == set(corpus)


def test_decontamination_matches_words_across_spellings():
    rows = [(f"definition {i}", word, [], [word]) for i, word in enumerate(SPELLINGS)] + [("cold dessert", "sorbet", [], ["sorbet"])]
    frame = pd.DataFrame(rows, columns=["query", "positive", "negatives", "words"])
    kept = decontaminate(frame, frozenset({"ice cream"}), frozenset())
    assert kept["positive"].tolist() == ["sorbet"]


# --- 3b. near-duplicates of evaluation texts ---------------------------------------------------

VOCABULARY = (
    "small large ancient bright dark heavy light narrow broad soft hard green red blue sharp dull "
    "plant animal vessel tool stone river mountain garment weapon instrument fabric mineral bird "
    "fish used making holding cutting covering growing found near along under within between "
    "water fire earth wood iron glass silk wool salt sugar bread grain leaf root flower seed shell"
).split()


def definitions(rng: np.random.Generator, count: int, length: int = 12) -> list[str]:
    """Distinct random definitions over a fixed vocabulary."""
    return [" ".join(rng.choice(VOCABULARY, size=length)) for _ in range(count)]


def near_copy(text: str) -> str:
    """The same definition with a capital, a full stop and one word more: not an exact match."""
    return f"{text[0].upper()}{text[1:]} often."


@pytest.fixture
def gcide_cards(tmp_path, monkeypatch):
    """A cards folder with a small GCIDE-like source: held-out words w*, and training words x*
    whose definitions are near-copies of the held-out definitions."""
    rng = np.random.default_rng(0)
    held = [f"w{i}" for i in range(400) if is_held_out(f"w{i}", 0.3, 5)]
    texts = definitions(rng, len(held))
    rows = [(w, "n.", t) for w, t in zip(held, texts)]
    rows += [(f"x{i}", "n.", near_copy(t)) for i, t in enumerate(texts)]
    rows += [(f"y{i}", "n.", t) for i, t in enumerate(definitions(rng, 300))]
    frame = pd.DataFrame(rows, columns=["word", "pos", "definition"])
    monkeypatch.setitem(source_loaders.LOADERS, "gcide", lambda card: frame)
    write_cards(tmp_path, {
        "gcide": SOURCE_CARD.format(name="gcide", loader="gcide", fields="[word, pos, definition]"),
        "test": DERIVED_CARD.format(name="test", stage="eval", builder="definition_retrieval_task", input="gcide", split="test"),
        "validation": DERIVED_CARD.format(
            name="validation", stage="eval", builder="definition_retrieval_task", input="gcide", split="validation"
        ),
        "train": DERIVED_CARD.format(name="train", stage="pretrain", builder="gcide_definition_pairs", input="gcide", split="train"),
    })
    return tmp_path


SMALL = DataConfig(eval_word_fraction=0.3, eval_retrieval_queries=400, max_stage1_pairs_per_source=1000)


def test_training_rows_near_duplicating_evaluation_texts_are_dropped(gcide_cards):
    result = curate(SMALL, 5, gcide_cards)
    eval_texts = {t.casefold() for task in result.evals.values() for t in task.payload["queries"].values()}
    train = result.train["train"]
    leaking = [q for q in train["query"] if q.casefold().removesuffix(" often.") in eval_texts]
    assert eval_texts and not leaking, f"{len(leaking)} training queries near-copy evaluation queries, e.g. {leaking[:3]}"
    assert pd.DataFrame(result.summary).set_index("set").loc["train", "eval_near_duplicates"] > 0
    source = source_loaders.LOADERS["gcide"](None)
    unrelated = source[source["word"].str.startswith("y") & ~source["word"].map(
        lambda w: is_held_out(w, SMALL.eval_word_fraction, 5) or is_held_out(w, SMALL.eval_word_fraction, 6)
    )]
    assert set(unrelated["definition"]) <= set(train["query"])  # rows unrelated to evaluation all survive


# --- 3c. decontamination against standard mteb tasks -----------------------------------------

def test_hub_rows_repeating_or_near_copying_mteb_task_texts_are_dropped(tmp_path, monkeypatch):
    from kalm_lib.curation import task_texts
    from kalm_lib.mteb_tasks import build_local_tasks

    rng = np.random.default_rng(1)
    queries, pairs = definitions(rng, 20), definitions(rng, 20, length=8)
    eval_dir = tmp_path / "mteb"
    eval_dir.mkdir()
    instruction = {"instruction": "Given a text, retrieve the text that pairs with it"}
    retrieval = {"name": "KalmDefinitionRetrieval", **instruction, "queries": {f"q{i}": t for i, t in enumerate(queries)},
                 "corpus": {"d0": "alpha", "d1": "beta"}, "qrels": {f"q{i}": {"d0": 1} for i in range(20)}}
    pair_task = {"name": "KalmSynonymAntonymPairClassification", **instruction,
                 "sentence1": pairs[:10], "sentence2": pairs[10:], "labels": [0, 1] * 5}
    (eval_dir / "definition_retrieval.json").write_text(json.dumps(retrieval))
    (eval_dir / "synonym_antonym_pairs.json").write_text(json.dumps(pair_task))
    tasks = build_local_tasks(eval_dir, ["KalmDefinitionRetrieval", "KalmSynonymAntonymPairClassification"])
    texts = task_texts(tasks)
    assert set(queries) | set(pairs) <= texts
    assert not {"alpha", "beta"} & texts  # the retrieval corpus is a shared collection, not a test text

    clean = definitions(rng, 30)
    hub = pd.DataFrame({
        "query": [queries[0], near_copy(queries[1]), "what is a clean question", *clean[:15]],
        "positive": ["an answer", "another answer", near_copy(pairs[3]), *clean[15:]],
    })
    monkeypatch.setitem(source_loaders.LOADERS, "hub", lambda card: hub)
    write_cards(tmp_path / "cards", {
        "hub_demo": SOURCE_CARD.format(name="hub_demo", loader="hub", fields="[query, positive]") + "hub: {path: demo/demo}\n",
        "pt_hub_demo": DERIVED_CARD.format(name="pt_hub_demo", stage="pretrain", builder="hub_pairs", input="hub_demo", split="train"),
    })
    result = curate(DataConfig(), 3, tmp_path / "cards", extra_eval_texts=texts)
    kept = result.train["pt_hub_demo"]
    assert sorted(kept["query"]) == sorted(clean[:15])


# --- 4. a curation seed that leaves the held-out split alone -----------------------------------

def test_sample_seed_changes_training_rows_but_not_evaluation(gcide_cards):
    small = replace(SMALL, max_stage1_pairs_per_source=60)
    base = curate(small, 5, gcide_cards)
    same = curate(replace(small, sample_seed=5), 5, gcide_cards)
    other = curate(replace(small, sample_seed=6), 5, gcide_cards)
    for name in ("test", "validation"):
        assert other.evals[name].payload == base.evals[name].payload, name
    assert same.train["train"].equals(base.train["train"])  # None means the profile seed
    assert set(other.train["train"]["query"]) != set(base.train["train"]["query"])


def test_curation_drops_training_rows_that_copy_a_standard_task_text(curated_tiny, tmp_path, monkeypatch):
    """Notebook 00 hands the evaluated standard mteb tasks' texts to the curation (the paper
    profile's MTEB decontamination): a training query copied into such a task is dropped."""
    from kalm_lib import pipeline
    from kalm_lib.curation import load_train_sets
    from kalm_lib.layout import RunLayout
    from kalm_lib.pipeline import open_run, run_curation

    sets = load_train_sets(RunLayout(curated_tiny), "pretrain")
    name, (frame, _) = next(iter(sets.items()))
    copied = frame["query"].iloc[0]
    tasks = [object()]  # stands in for the mteb task objects of evaluation.standard_tasks
    monkeypatch.setattr(pipeline, "evaluated_standard_tasks", lambda cfg: tasks)
    monkeypatch.setattr(pipeline, "task_texts", lambda given: frozenset({copied}) if given is tasks else frozenset())
    profile, run = open_run("tiny", tmp_path / "run")
    run_curation(profile, run)
    again = load_train_sets(RunLayout(run), "pretrain")[name][0]
    assert copied not in set(again["query"]) and copied not in set(again["positive"])
