"""Builders that turn source tables into derived training sets and held-out evaluation tasks.

Every training builder returns an *example frame* with the columns of :data:`EXAMPLE_COLUMNS`:
``query``, ``positive``, ``negatives`` (list of hard negatives, possibly empty, filled further by
mining) and ``words`` (every dictionary word the example touches, used by the contamination
filter). Evaluation builders return the JSON payload that :mod:`kalm_lib.mteb_tasks` reads, plus
the set of words they hold out.

Text rules shared by training and evaluation (so that a test query and a training query obey the
same contract):

* one word, every spelling: :func:`word_key` identifies a word across GCIDE and WordNet regardless
  of case, Unicode form, hyphens, underscores and spaces; the held-out split hashes that key.
* no answer in the question: a definition or gloss that contains its own word (or a plain
  inflection of it, :func:`answer_forms`), a word its word inflects ("quiet" for *quietness*),
  every part of a multi-word word, the pieces of a closed compound ("beech" and "nut" for
  *beechnut*), a word of 5 letters or more inside its word ("pacify" for *repacify*) or its
  word's stem with another ending ("pragmatic" for *pragmatist*, "incapable" for *incapability*) is dropped
  (:func:`contains_answer`).
* GCIDE: sense indices such as ``knave{3}`` are removed, and headwords or definitions that are raw
  markup, cross-references ("See X", "Same as X", "imp. & p. p. of X", ...) or hold a pointer
  anywhere ("... See Marque." for *mark*) are dropped.

These rules clean the sources once (:data:`SOURCE_CLEANERS`, applied by the curation when it loads
them), so every builder, training and evaluation alike, reads answer-free, cross-reference-free
definitions.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

EXAMPLE_COLUMNS = ["query", "positive", "negatives", "words"]
Sources = dict[str, pd.DataFrame]

_SEPARATORS = re.compile(r"[\s_'\-\u2010-\u2015\u2019]+")  # white space, underscore, apostrophes, hyphens and dashes
_TOKEN = re.compile(r"[^\W_]+")  # runs of letters and digits
_INFLECTIONS = ("s", "es", "d", "ed", "ing", "er", "est", "ly", "ness")  # "'s" is "s" once apostrophes separate tokens
_VOWELS = frozenset("aeiou")
# GCIDE definitions that only point elsewhere. Grammatical references: a chain of grammar labels
# then "of / from / fr. / for X", a bare word, or nothing ("imp. & p. p. of Hear", "a. & n. from
# Walk, v.", "3d pers. sing. present of Stand", "obs. imp. pl."); pointers: "See X", "See under X",
# "Same as X", "Alt. of X", "Var. of X", "Short for X", "(A) variant (spelling) of X", "An obsolete
# form of X"; a bare "A contraction / abbreviation / corruption / diminutive / plural of X" (at most
# four words after "of"); and "of X." fragments left by the source's parser.
_LABEL = r"(?:obs|imp|p|pr|pp|vb|n|a|pl|sing|pres|superl|compar|pret|pers?|indic|ind|subj|inf|fem|masc|l|poet)\.|\d(?:st|d|nd|rd|th)\b\.?"
_QUALIFIER = r"(?:and|or|rare|archaic|present)\s"
_GRAMMAR = (
    rf"(?:{_LABEL})(?:[\s,&(]*(?:{_QUALIFIER})?[\s,&(]*(?:{_LABEL}))*[\s,(]*(?:{_QUALIFIER})?"
    r"\s*(?:(?:of|for|from|fr\.)\s|[\w'-]+\.?$|$)"
)
_CROSS_REFERENCE = re.compile(
    r"^\W*(?:see\b|same\ as\b|alt\.\ of\b|var\.\ of\b|short\ for\b"
    r"|(?:an?\ )?variant\ (?:spelling\ )?(?:of|for)\b"
    r"|(?:an?\ )?(?:obsolete|archaic|old|aphetic|shortened)\ (?:form|spelling|variant|plural)s?\ (?:of|for)\b"
    r"|(?:an?\ )?(?:contraction|abbreviation|corruption|diminutive|plural)\ (?:of|for)\ [^\s;]+(?:\ [^\s;]+){0,3}$"
    rf"|{_GRAMMAR}"
    r"|of\ [^\W\d_][\w'-]*(?:,\ [^;]*)?\.?$)",
    re.IGNORECASE,
)
# A pointer anywhere in a definition ("A license of reprisals. See Marque." for *mark*, "To gride. See
# Gride." for *gryde*, "... Cf. Helix."): the target is often the answer in another spelling.
_POINTER = re.compile(r"(?:^|[.;:(]\s*|--\s*)(?:see|cf\.|same\ as)\s", re.IGNORECASE)
# Headwords that are parser debris ("a a* (, n. the state of ...", "newtonnew\"ton (n, ...") or
# alternations ("tracer/y", "adder fly/"): markup characters, or a slash next to a letter.
_MARKUP_WORD = re.compile(r"[\[\](){}*\"`\\<>]|[^\W\d_]/|/(?:[^\W\d_]|$)")
# Definitions holding source tags glued to cut text ("split into lamin1913 Webster]"), editorial
# comments ("<-- p. 26 -->"), pronunciation marks ("Af*flict\"ing*ly", "A` (#)"), RTF escapes or
# braces left once sense indices are removed ("copies of {ritten katter", "display{n3}").
_MARKUP_TEXT = re.compile(r"1913\ Webster|Webster\ 1913|\bPJC\]|WordNet\ \d|<--|-->|[*`{}\\]|\((?:\?|\#)\)", re.IGNORECASE)
_SENSE_INDEX = re.compile(r"\{\d+[a-z]?\}")  # "the navel{1}" -> "the navel", "bittersweet{3b}" -> "bittersweet"


def word_key(word: str) -> str:
    """A word's identity across sources: NFKC, casefolded, with white space, underscores,
    apostrophes and hyphens removed, so "Ice cream", "ice-cream", "ice_cream" and "icecream" are one
    word (and "o'clock" is "oclock")."""
    return _SEPARATORS.sub("", unicodedata.normalize("NFKC", word).casefold())


def is_held_out(word: str, fraction: float, seed: int) -> bool:
    """Stable hash split of :func:`word_key`: True for about ``fraction`` of all words, fixed by
    ``seed``; every spelling of a word lands on the same side."""
    digest = hashlib.blake2b(f"{seed}:{word_key(word)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def word_tokens(text: str) -> list[str]:
    """Casefolded runs of letters and digits: everything else (spaces, hyphens, apostrophes,
    underscores, punctuation) separates them."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def _inflected(stem: str) -> set[str]:
    """``stem`` plus each suffix of ``_INFLECTIONS``, with English spelling rules: a final e is
    dropped before a vowel (dance -> dancing), a final consonant + y becomes i (carry -> carried),
    a final consonant-vowel-consonant doubles (stop -> stopped)."""
    forms = {stem + suffix for suffix in _INFLECTIONS}
    vowel_suffixes = [s for s in _INFLECTIONS if s[0] in "ei"]
    if stem.endswith("e"):
        forms |= {stem[:-1] + s for s in vowel_suffixes}
    if len(stem) > 1 and stem.endswith("y") and stem[-2] not in _VOWELS:
        forms |= {stem[:-1] + "i" + s for s in ("es", "ed", "er", "est", "ly", "ness")}
    if len(stem) > 2 and stem[-1] not in _VOWELS | {"w", "x", "y"} and stem[-2] in _VOWELS and stem[-3] not in _VOWELS:
        forms |= {stem + stem[-1] + s for s in vowel_suffixes}
    return forms


def _stems(word: str) -> frozenset[str]:
    """The words ``word`` is an inflection of (:func:`_inflected`; stems of at least 4 letters,
    as shorter ones are mostly function words: "for" + "est" is no forest): "quietness" ->
    {"quiet"}, "sloppiness" -> {"sloppy"}, "biter" -> {"bite"}."""
    candidates = set()
    for suffix in _INFLECTIONS:
        if word.endswith(suffix) and len(word) - len(suffix) >= 2:
            base = word[: -len(suffix)]
            candidates |= {base, base + "e", base[:-1], base[:-1] + "y"}
    return frozenset(stem for stem in candidates if len(stem) >= 4 and word in _inflected(stem))


GLUED_MIN = 6  # letters of a closed compound :func:`_glued` looks for (from "air" + "man"; it also drops "can" + "did")


def _glued(tokens: set[str], word: str) -> bool:
    """True if ``word`` (:data:`GLUED_MIN` letters or more) is two or more of ``tokens`` (3 letters
    or more each) written together, in any order: a closed compound given away in pieces ("The
    nut of the beech tree" for *beechnut*, "The hide or skin of a calf" for *calfskin*)."""
    if len(word) < GLUED_MIN:
        return False
    pieces = {token for token in tokens if len(token) >= 3 and token in word}
    reach = {0: 0}  # end of a prefix of ``word`` -> most pieces that spell it
    for end in range(3, len(word) + 1):
        counts = [reach[end - len(p)] + 1 for p in pieces if end - len(p) in reach and word.startswith(p, end - len(p))]
        if counts:
            reach[end] = max(counts)
    return reach.get(len(word), 0) >= 2


SHARED_WORD_MIN = 5  # letters of a word the answer and its text may not share as prefix or suffix
SHARED_STEM_MIN = 6  # letters of a stem the answer and a word of its text may not share


def _affixed(longer: str, shorter: str) -> bool:
    """True if ``shorter`` (:data:`SHARED_WORD_MIN` letters or more) begins or ends ``longer``."""
    return len(shorter) >= SHARED_WORD_MIN and (longer.startswith(shorter) or longer.endswith(shorter))


def _shares_word(tokens: set[str], word: str) -> bool:
    """True if one of ``tokens`` begins or ends the closed ``word``, or the word begins or ends
    one of them (:func:`_affixed`): the answer is a text word with an affix ("Not audible" for
    *inaudible*, "To pacify again" for *repacify*, "A female juggler" for *juggleress*) or holds
    one as a part ("A disease characterized by ..." for *Basedow's disease*). Inside a word does
    not count ("arranged" holds *range* by chance)."""
    return any(_affixed(word, token) or _affixed(token, word) for token in tokens)


def _shares_stem(tokens: set[str], word: str) -> bool:
    """True if one of ``tokens`` and the closed ``word`` begin with the same letters, all of the
    shorter but its last 3 and at least :data:`SHARED_STEM_MIN`: a stem with another ending ("One
    who is pragmatic" for *pragmatist*, "Guilty of perjury" for *perjured*, "being incapable" for
    *incapability*, "punctuating" for *punctuation*; not "carpenter" for *carpet*)."""
    for token in tokens:
        shorter = min(len(token), len(word))
        need = max(SHARED_STEM_MIN, shorter - 3)
        if shorter >= need and token[:need] == word[:need]:
            return True
    return False


def answer_forms(word: str) -> frozenset[str]:
    """Closed forms that give ``word`` away: its tokens written together ("ice cream" ->
    "icecream"), also with an inflection of the last token ("icecreams", "flatteringly", "goes").
    Very short words over-match ("an" + "d" is "and"); that only drops more of their own rows."""
    closed = "".join(word_tokens(word))
    return frozenset({closed, *_inflected(closed)}) if closed else frozenset()


def _has_form(tokens: list[str], forms: frozenset[str]) -> bool:
    """True if a run of consecutive ``tokens``, written together, is one of ``forms``: whole tokens
    only, whatever separated them ("ice cream", "ice-cream", "icecream", "Kuklux Klan")."""
    closed = "".join(tokens)
    candidates = [form for form in forms if form in closed]
    if not candidates:
        return False
    bounds = set(itertools.accumulate(map(len, tokens), initial=0))
    for form in candidates:
        start = closed.find(form)
        while start >= 0:
            if start in bounds and start + len(form) in bounds:
                return True
            start = closed.find(form, start + 1)
    return False


StemFinder = Callable[[str], frozenset[str]]  # :func:`_stems`, or a memo of it


def _related(tokens: set[str], part: str, stems: StemFinder) -> bool:
    """True if ``part`` is one of ``tokens`` or shares an inflection stem with one: the token
    inflects the part (:func:`_inflected`), the part inflects the token ("quiet" for
    *quietness*, "tight" for *tightly*), or both inflect one stem ("bites" for *biter*)."""
    family = {part, *stems(part)}
    return not tokens.isdisjoint(family) or not tokens.isdisjoint(_inflected(part)) or any(
        not family.isdisjoint(stems(token)) for token in tokens)


def _has_parts(tokens: set[str], parts: Sequence[str], stems: StemFinder) -> bool:
    """True if ``parts`` are several word tokens and each of them is related to one of ``tokens``
    (:func:`_related`): a multi-word answer given away in pieces ("between yellow and brown" for
    "yellow-brown", "a pointed beard ... by Vandyke" for "vandyke beard", "a soldier who operates
    a machine gun" for "machine gunner")."""
    return len(parts) > 1 and all(_related(tokens, part, stems) for part in parts)


def _gives_away(tokens: list[str], forms: frozenset[str], parts: Sequence[str], stems: StemFinder) -> bool:
    """True if a text's ``tokens`` hold one of a word's closed ``forms`` (:func:`_has_form`), all
    of its ``parts`` (:func:`_has_parts`), a relative of its closed form (:func:`_related`: "The
    quality or state of being quiet" for *quietness*), the pieces it is glued from
    (:func:`_glued`), a word of 5 letters or more it shares (:func:`_shares_word`) or a stem with
    another ending (:func:`_shares_stem`)."""
    closed = "".join(parts)
    present = set(tokens)
    return (_has_form(tokens, forms) or _has_parts(present, parts, stems) or _related(present, closed, stems)
            or _glued(present, closed) or _shares_word(present, closed) or _shares_stem(present, closed))


def contains_answer(text: str, word: str) -> bool:
    """True if ``text`` gives ``word`` away (:func:`_gives_away`): it contains the word or an
    inflection of it (:func:`answer_forms`) as whole tokens, casefolded, in any spelling; a word
    sharing an inflection stem with it; for a word of several tokens, each of them (or a relative,
    :func:`_related`) anywhere; the pieces of a closed compound (:func:`_glued`); or a word of 5
    letters or more that the word contains or that contains the word (:func:`_shares_word`); or a
    word with the same stem and another ending (:func:`_shares_stem`)."""
    return _gives_away(word_tokens(text), answer_forms(word), word_tokens(word), _stems)


def answer_free(frame: pd.DataFrame, text_column: str, word_column: str = "word") -> pd.DataFrame:
    """Rows of ``frame`` whose text does not contain its own word (:func:`contains_answer`)."""
    words = frame[word_column].tolist()
    forms = {word: (answer_forms(word), word_tokens(word)) for word in set(words)}
    stems = functools.cache(_stems)  # tokens repeat across rows: each token's stems found once per call
    leaks = [_gives_away(word_tokens(text), *forms[word], stems) for text, word in zip(frame[text_column].tolist(), words)]
    return frame[~np.array(leaks, dtype=bool)]


def clean_gcide(frame: pd.DataFrame) -> pd.DataFrame:
    """GCIDE (word, definition) rows fit to train or test on: sense indices removed; markup
    headwords and definitions, cross-references and definitions containing their word dropped."""
    frame = frame.assign(definition=frame["definition"].str.replace(_SENSE_INDEX, "", regex=True))
    bad = (
        frame["word"].str.contains(_MARKUP_WORD)
        | frame["definition"].str.contains(_MARKUP_TEXT)
        | frame["definition"].str.contains(_CROSS_REFERENCE)
        | frame["definition"].str.contains(_POINTER)
    )
    return answer_free(frame[~bad], "definition")


def clean_glosses(frame: pd.DataFrame) -> pd.DataFrame:
    """WordNet (word, gloss) rows whose gloss does not contain its lemma."""
    return answer_free(frame, "gloss")


SOURCE_CLEANERS: dict[str, Callable[[pd.DataFrame], pd.DataFrame]] = {  # by source loader
    "gcide": clean_gcide,
    "oewn_glosses": clean_glosses,
}


def _relation_map(frame: pd.DataFrame, column: str) -> dict[str, list[str]]:
    """word -> list of related words, in row order (a plain loop: under pandas 3,
    ``groupby(...).agg(list)`` takes 15 times as long on the WordNet tables)."""
    related: dict[str, list[str]] = {}
    for word, other in zip(frame["word"].tolist(), frame[column].tolist()):
        related.setdefault(word, []).append(other)
    return related


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


def hub_positive_pairs(sources: Sources, input_name: str) -> pd.DataFrame:
    """The positive pairs of a labelled hub pair set (binary STS / paraphrase / question-matching
    sets such as ATEC, LCQMC, BQ, AFQMC, PAWS-X, whose label 1 means "same meaning"): rows whose
    ``label`` field is 1, as (query, positive) with no negatives. Rows labelled 0 are dropped, not
    turned into negatives: the loss takes only rows that pair a text with an equivalent one."""
    frame = sources[input_name]
    frame = frame[frame["label"].astype(int) == 1]
    return _examples(frame["query"], frame["positive"], [[] for _ in range(len(frame))], [[] for _ in range(len(frame))])


# --- held-out evaluation tasks ----------------------------------------------------------------

@dataclass(frozen=True)
class EvalTask:
    """An evaluation payload (for :mod:`kalm_lib.mteb_tasks`), the words it holds out and the texts
    a model sees when evaluated on it (queries, documents, sentences)."""

    payload: dict
    words: frozenset[str]
    texts: frozenset[str]


def definition_retrieval_task(
    sources: Sources, held_out: Callable[[str], bool], n_queries: int, rng: np.random.Generator, instruction: str
) -> EvalTask:
    """GCIDE definition -> headword retrieval over a corpus of held-out headwords only.

    Reads GCIDE as cleaned by :func:`clean_gcide` (no query contains its answer or is a
    cross-reference). The corpus has one document per :func:`word_key`, written as the first of its
    spellings in sorted order; a query is the first definition of a word, for ``n_queries`` words
    drawn by ``rng``.
    """
    frame = sources["gcide"]
    frame = frame[frame["word"].map(held_out)]
    frame = frame.assign(key=frame["word"].map(word_key))
    spelling = frame.groupby("key")["word"].min()
    first = frame.drop_duplicates("key")
    picked = first.iloc[rng.permutation(len(first))[:n_queries]]
    queries = {f"q{i}": text for i, text in enumerate(picked["definition"])}
    doc_ids = {key: f"d{i}" for i, key in enumerate(spelling.index)}
    qrels = {f"q{i}": {doc_ids[key]: 1} for i, key in enumerate(picked["key"])}
    payload = {
        "name": "KalmDefinitionRetrieval",
        "instruction": instruction,
        "queries": queries,
        "corpus": {doc_ids[key]: word for key, word in spelling.items()},
        "qrels": qrels,
    }
    return EvalTask(payload, frozenset(frame["word"]), frozenset(queries.values()) | frozenset(spelling))


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


SINGLE_INPUT_BUILDERS: dict[str, Callable[[Sources, str], pd.DataFrame]] = {
    "hub_pairs": hub_pairs,
    "hub_positive_pairs": hub_positive_pairs,
}
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
