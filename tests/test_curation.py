"""Curation steps on hand-made frames, and the contamination guarantee on the real data."""

import logging

import numpy as np
import pandas as pd
import pytest

from kalm_lib.builders import clean_gcide, contains_answer, is_held_out
from kalm_lib.config import DataConfig
from kalm_lib.curation import (
    curate,
    decontaminate,
    exact_dedup,
    flag_below_one_batch,
    length_filter,
    near_dedup,
    normalise,
)
from kalm_lib.layout import DATA_CARDS_DIR


def frame(rows):
    return pd.DataFrame(
        [(q, p, list(n), list(w)) for q, p, n, w in rows], columns=["query", "positive", "negatives", "words"]
    )


def test_normalise_folds_unicode_and_space():
    assert normalise("  ﬁne\u00a0 print\n\tcase ") == "fine print case"


def test_length_filter_checks_query_and_positive():
    f = frame([("ok query", "word", [], []), ("x", "word", [], []), ("ok query", "w" * 50, [], [])])
    assert length_filter(f, 2, 20)["query"].tolist() == ["ok query"]


def test_exact_dedup_is_case_insensitive():
    f = frame([("A cat", "cat", [], []), ("a CAT", "Cat", [], []), ("a cat", "dog", [], [])])
    assert len(exact_dedup(f)) == 2


def test_near_dedup_removes_near_copies_only():
    base = "a small domesticated carnivorous mammal with soft fur and retractable claws"
    f = frame([
        (base, "cat", [], []),
        (base + " often kept", "cat", [], []),  # near copy: same words plus two
        ("a large body of salt water that covers most of the planet", "ocean", [], []),
    ])
    kept = near_dedup(f, threshold=0.7)
    assert kept["positive"].tolist() == ["cat", "ocean"]


def test_decontaminate_drops_words_texts_and_negatives():
    f = frame([
        ("definition one", "alpha", [], ["alpha"]),
        ("definition two", "beta", [], ["beta"]),
        ("held-out text", "gamma", [], ["gamma"]),
        ("definition four", "delta", ["held-out text"], ["delta"]),
    ])
    kept = decontaminate(f, frozenset({"beta"}), frozenset({"held-out text"}))
    assert kept["positive"].tolist() == ["alpha"]


@pytest.mark.parametrize(
    ("text", "word", "leaks"),
    [
        ("That flatters; as, a flattering speech.", "flattering", True),  # the word itself
        ("To lay so as to form an imbricated surface.", "imbricate", True),  # e dropped before -ed
        ("as, this goes to show.", "go", True),  # short words inflect too
        ("called also Kuklux Klan and the Klan.", "ku klux klan", True),  # any spacing of its parts
        ("An ice-cream cone.", "icecream", True),
        ("Of or pertaining to psychiatry.", "psychiatric", True),  # a stem with another ending
        ("That flatters (in the various senses of the verb).", "flattering", True),  # both inflect "flatter"
        ("A dicey dessert.", "ice cream", False),  # whole tokens only
        ("Having a color intermediate between yellow and brown.", "yellow-brown", True),  # every part, apart
        ("A trim, pointed beard, such as those often seen in pictures by Vandyke.", "vandyke beard", True),
        ("Struck with a panic; as, the panic-stricken crowd.", "panic-struck", True),
        ("Malthus' theories. See Malthusian.", "malthusian theory", True),  # parts inflected too
        ("A trim, pointed hat.", "vandyke beard", False),  # no part
        ("The quality or state of being quiet.", "quietness", True),  # a word the answer inflects
        ("In a tight manner; closely.", "tightly", True),
        ("State or quality of being frisky.", "friskiness", True),  # y -> i
        ("One who, or that which, bites.", "biter", True),  # e dropped
        ("The nut of the beech tree.", "beechnut", True),  # a closed compound in pieces
        ("A fishing line held by hand.", "handline", True),  # in any order
        ("A soldier who operates a machine gun.", "machine gunner", True),  # a part inflects a token
        ("The pole flounder.", "craig flounder", True),  # a part of 5 letters or more
        ("A small beam of light.", "beamlet", False),  # a shared word under 5 letters is kept
        ("To pacify again.", "repacify", True),  # a word of the text with an affix
        ("Not audible; silent.", "inaudible", True),
        ("In a state of sleep.", "asleep", True),
        ("Of or pertaining to the crocodile.", "crocodilian", True),
        ("One who is pragmatic.", "pragmatist", True),
        ("Guilty of perjury.", "perjured", True),
        ("The quality of being incapable.", "incapability", True),  # the stem up to the last 3 letters
        ("Abounding in fens.", "fenny", False),  # stems under 5 letters are kept
        ("To stand still.", "stank", False),  # 4 shared letters are no stem
        ("A rug; a carpenter's work.", "carpet", False),  # nor are 5
        ("A large wood used for hunting.", "forest", False),  # "for" is no stem of forest
        ("Cream churned, but salted.", "butter", False),
        ("Things arranged in a row.", "range", False),  # a word inside a text word is chance
        ("An enlisted man in the air force.", "airman", True),  # two 3-letter pieces
    ],
)
def test_answer_rule(text, word, leaks):
    assert contains_answer(text, word) is leaks


def test_gcide_cleaning_drops_cross_references_markup_and_answers():
    rows = {
        ("opulency", "See Opulence."): False,
        ("heard", "imp. & p. p. of Hear."): False,
        ("walking", "a. & n. from Walk, v."): False,
        ("manilla", "Same as Manila."): False,
        ("tracer/y", "Ornamental stonework."): False,  # markup headword
        ("cleavage", "Division into lamin [1913 Webster]"): False,  # markup definition
        ("flask", "A small bottle-shaped vessel; as, a flask of oil."): False,  # contains its answer
        ("mark", "A license of reprisals. See Marque."): False,  # a pointer after the definition
        ("cycloid", "A curve traced by a point of a rolling circle.  Cf. Helix."): False,
        ("flask", "A small bottle-shaped vessel for holding fluids."): True,
        ("brownstone", "A building faced with sandstone{1}."): True,
    }
    frame = pd.DataFrame(list(rows), columns=["word", "definition"])
    kept = clean_gcide(frame)
    assert list(zip(kept["word"], kept["definition"])) == [
        ("flask", "A small bottle-shaped vessel for holding fluids."),
        ("brownstone", "A building faced with sandstone."),
    ]


def test_held_out_split_is_stable_and_sized():
    words = [f"w{i}" for i in range(20000)]
    share = np.mean([is_held_out(w, 0.1, 3) for w in words])
    assert 0.09 < share < 0.11
    assert [is_held_out(w, 0.1, 3) for w in words[:50]] == [is_held_out(w, 0.1, 3) for w in words[:50]]
    assert [is_held_out(w, 0.1, 3) for w in words[:200]] != [is_held_out(w, 0.1, 4) for w in words[:200]]


@pytest.fixture(scope="module")
def curated():
    cfg = DataConfig(eval_word_fraction=0.02, max_stage1_pairs_per_source=300, max_stage2_per_source=200,
                     eval_retrieval_queries=40, eval_pairs=40, eval_clusters=6)
    return curate(cfg, seed=11, cards_dir=DATA_CARDS_DIR / "offline", batch_sizes={"pretrain": 1, "finetune": 10**6})


def test_no_training_row_touches_evaluation(curated):
    test_words = frozenset().union(*(t.words for t in curated.evals.values()))
    test_texts = frozenset().union(*(t.texts for t in curated.evals.values()))
    assert len(test_words) > 100
    for name, f in curated.train.items():
        for words, query, positive, negatives in zip(f["words"], f["query"], f["positive"], f["negatives"]):
            assert not test_words.intersection(words), name
            assert query not in test_texts and positive not in test_texts, name
            assert not test_texts.intersection(negatives), name


def test_validation_and_test_splits_are_disjoint(curated):
    test = curated.evals["eval_definition_retrieval"].words
    validation = curated.evals["validation_definition_retrieval"].words
    assert test and validation and not test & validation


def test_summary_counts_every_step(curated):
    summary = pd.DataFrame(curated.summary)
    steps = ["built", "after_length", "after_exact_dedup", "after_decontamination", "after_near_dedup_of_pool", "kept"]
    assert (summary[steps].diff(axis=1).iloc[:, 1:] <= 0).all().all()
    assert (summary["after_decontamination"] < summary["after_exact_dedup"]).all()


def test_summary_flags_sets_smaller_than_one_batch_of_their_stage(curated):
    summary = pd.DataFrame(curated.summary)
    assert set(summary["stage"]) == {"pretrain", "finetune"}
    assert (summary["batch_size"] == summary["stage"].map({"pretrain": 1, "finetune": 10**6})).all()
    assert (summary["below_one_batch"] == (summary["stage"] == "finetune")).all()


def test_below_one_batch_is_logged_and_unchecked_stages_are_left_alone(caplog):
    summary = [
        {"set": "small", "stage": "finetune", "kept": 7},
        {"set": "enough", "stage": "finetune", "kept": 8},
        {"set": "stage_off", "stage": "pretrain", "kept": 1},
    ]
    with caplog.at_level(logging.WARNING, logger="kalm_lib.curation"):
        flag_below_one_batch(summary, {"finetune": 8})
    assert [row.get("below_one_batch") for row in summary] == [True, False, None]
    assert [row.get("batch_size") for row in summary] == [8, 8, None]
    assert [r.getMessage() for r in caplog.records] == [
        "finetune set 'small' keeps 7 rows, fewer than one batch (8): training will never draw from it"
    ]


def test_eval_payloads_are_consistent(curated):
    retrieval = curated.evals["eval_definition_retrieval"].payload
    assert set(retrieval["qrels"]) == set(retrieval["queries"])
    assert all(doc in retrieval["corpus"] for rel in retrieval["qrels"].values() for doc in rel)
    pairs = curated.evals["eval_synonym_antonym"].payload
    assert sorted(set(pairs["labels"])) == [0, 1]
    clusters = curated.evals["eval_synset_clustering"].payload
    assert len(set(clusters["labels"])) == 6 and len(clusters["sentences"]) == len(clusters["labels"])
