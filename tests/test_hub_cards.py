"""The paper profile's hub cards, offline: every hub source card loads from a local Parquet fixture
with the published schema of its hub subset, and every derived paper card builds and curates from
those rows, so a card whose columns disagree with its dataset or its builder fails without network.

Fixtures: ``tests/fixtures/hub/<card name>.parquet``, written by ``make_fixtures.py`` beside them.
"""

import dataclasses
import importlib.util
import re

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalm_lib import sources
from kalm_lib.builders import EXAMPLE_COLUMNS, SINGLE_INPUT_BUILDERS, TRAIN_BUILDERS
from kalm_lib.config import load_profile
from kalm_lib.curation import curate
from kalm_lib.data_cards import DataCardError, load_cards
from kalm_lib.layout import DATA_CARDS_DIR, REPO_ROOT
from kalm_lib.sources import load_hub, load_source

PAPER = DATA_CARDS_DIR / "paper"
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "hub"
CARDS = load_cards(PAPER)
HUB_CARDS = sorted(name for name, card in CARDS.items() if card.kind == "source" and card.loader == "hub")
DERIVED = sorted(name for name, card in CARDS.items() if card.kind == "derived")
ARROW_TYPES = {"string": pa.string(), "int32": pa.int32()}  # dataset-card dtypes used by the paper's hub subsets


def fixture(name: str):
    return FIXTURES / f"{name}.parquet"


def expected_rows(name: str) -> int:
    """Rows a derived card builds from its source's fixture: all of them, or for
    ``hub_positive_pairs`` the rows labelled 1."""
    card = CARDS[name]
    source = CARDS[card.inputs[0]]
    raw = pd.read_parquet(fixture(source.name)).rename(columns=source.hub["columns"])
    return int((raw["label"] == 1).sum()) if card.builder == "hub_positive_pairs" else len(raw)


def make_fixtures_module():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_cards_cover_the_hub_sources_and_their_derived_sets():
    assert len(HUB_CARDS) == 11 and len(DERIVED) == 11
    assert {i for name in DERIVED for i in CARDS[name].inputs} == set(HUB_CARDS)


@pytest.mark.parametrize("name", HUB_CARDS)
def test_card_records_what_was_verified_and_drops_the_placeholder(name):
    card = CARDS[name]
    verified = card.extra["verified"]
    assert verified["date"] == "2026-11-24" and verified["sources"] and int(verified["rows"]) > 0
    assert set(card.hub["columns"]) <= set(verified["features"])  # the card maps published columns only
    assert sorted(card.hub["columns"].values()) == sorted(card.fields)
    assert {"path", "name", "split"} <= set(card.hub)  # subset and split always named explicitly
    for text in (card.description, card.license):
        assert "verify" not in text.lower() and "see the dataset card" not in text.lower()


@pytest.mark.parametrize("name", HUB_CARDS)
def test_fixture_has_exactly_the_published_schema(name):
    features = CARDS[name].extra["verified"]["features"]
    table = pq.read_table(fixture(name))
    assert table.schema.names == list(features)
    assert [table.schema.field(column).type for column in features] == [ARROW_TYPES[dtype] for dtype in features.values()]
    assert 5 <= table.num_rows <= 20


def test_fixtures_are_what_the_script_writes(tmp_path):
    module = make_fixtures_module()
    assert sorted(module.FIXTURES) == HUB_CARDS
    for path in module.write_fixtures(tmp_path):
        assert pq.read_table(path).equals(pq.read_table(FIXTURES / path.name)), path.name


@pytest.mark.parametrize("name", HUB_CARDS)
def test_hub_card_loads_offline_from_its_fixture(name):
    card = CARDS[name]
    raw = pd.read_parquet(fixture(name))
    frame = load_source(card, data_files=fixture(name))
    assert list(frame.columns) == card.fields and len(frame) == len(raw)
    for hub_column, field in card.hub["columns"].items():
        assert frame[field].tolist() == raw[hub_column].tolist()
        if pd.api.types.is_string_dtype(raw[hub_column]):
            assert frame[field].str.strip().str.len().gt(0).all(), field


@pytest.mark.parametrize("name", DERIVED)
def test_derived_card_builds_from_its_fixture_sources(name):
    """Each derived card's builder, called as the curation calls it, on the loaded fixture rows."""
    card = CARDS[name]
    loaded = {i: load_source(CARDS[i], data_files=fixture(i)) for i in card.inputs}
    if card.builder in SINGLE_INPUT_BUILDERS:
        frame = SINGLE_INPUT_BUILDERS[card.builder](loaded, card.inputs[0])
    else:
        frame = TRAIN_BUILDERS[card.builder](loaded)
    assert list(frame.columns) == card.fields == EXAMPLE_COLUMNS
    assert len(frame) == expected_rows(name) and frame["query"].str.len().gt(0).all()
    has_negative = "negative" in CARDS[card.inputs[0]].fields
    assert frame["negatives"].map(len).eq(1 if has_negative else 0).all()


def test_paper_profile_curates_every_derived_card_from_the_fixtures(monkeypatch):
    """The whole curation of the paper profile's cards folder, with each hub dataset replaced by
    its fixture: every derived set comes out non-empty, with the source's own negatives."""
    data = load_profile("gpu-qwen2-0.5b").data
    assert REPO_ROOT / data.cards_dir == PAPER
    monkeypatch.setitem(sources.LOADERS, "hub", lambda card: load_hub(card, data_files=fixture(card.name)))
    result = curate(data, seed=42, cards_dir=REPO_ROOT / data.cards_dir)
    assert sorted(result.train) == DERIVED and not result.evals
    for name, frame in result.train.items():
        assert len(frame) == expected_rows(name), name
    assert result.train["ft_hub_msmarco_triplets"]["negatives"].map(len).eq(1).all()


def test_fixture_with_other_columns_names_the_card_and_the_missing_column(tmp_path):
    card = CARDS["hub_allnli_triplets"]
    wrong = tmp_path / "pair_class.parquet"  # all-nli's pair-class subset instead of triplet
    pq.write_table(pa.table({"premise": ["A man sleeps."], "hypothesis": ["A man rests."], "label": [0]}), wrong)
    with pytest.raises(DataCardError, match=rf"^{re.escape(card.path)}: .*\['anchor', 'positive', 'negative'\]"):
        load_source(card, data_files=wrong)


def test_natural_questions_column_is_query_not_the_question_its_prose_names(tmp_path):
    card = CARDS["hub_nq"]
    prose = tmp_path / "nq_prose.parquet"
    pq.write_table(pa.table({"question": ["who wrote hamlet"], "answer": ["Hamlet is a tragedy by William Shakespeare."]}), prose)
    with pytest.raises(DataCardError, match=r"hub_nq\.yaml: field 'hub\.columns' maps column\(s\) \['query'\]"):
        load_source(card, data_files=prose)


def test_positive_pairs_keep_only_the_pairs_labelled_same():
    """ATEC's score-0 pairs (different questions) are neither training pairs nor negatives."""
    raw = pd.read_parquet(fixture("hub_atec"))
    loaded = {"hub_atec": load_source(CARDS["hub_atec"], data_files=fixture("hub_atec"))}
    frame = SINGLE_INPUT_BUILDERS["hub_positive_pairs"](loaded, "hub_atec")
    same = raw[raw["score"] == 1]
    assert frame["query"].tolist() == same["sentence1"].tolist() and frame["positive"].tolist() == same["sentence2"].tolist()
    assert not set(raw.loc[raw["score"] == 0, "sentence2"]) & set(frame["positive"]) and frame["negatives"].map(len).eq(0).all()


def test_local_files_keep_the_cards_limit():
    card = dataclasses.replace(CARDS["hub_gooaq"], hub={**CARDS["hub_gooaq"].hub, "limit": 2})
    frame = load_source(card, data_files=[fixture("hub_gooaq")])
    assert len(frame) == 2 and frame["query"].tolist() == pd.read_parquet(fixture("hub_gooaq"))["question"][:2].tolist()


def test_local_files_are_for_hub_sources_only():
    gcide = load_cards(DATA_CARDS_DIR / "offline")["gcide"]
    with pytest.raises(DataCardError, match="gcide.yaml: local data files stand in for hub sources only"):
        load_source(gcide, data_files=fixture("hub_gooaq"))


def test_hub_path_calls_load_dataset_with_the_cards_id_subset_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_parquet(str(fixture("hub_msmarco_triplets")))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    frame = load_source(CARDS["hub_msmarco_triplets"])
    assert calls == [("sentence-transformers/msmarco-bm25", "triplet", {"split": "train"})]
    assert list(frame.columns) == ["query", "positive", "negative"] and len(frame) == 6


def test_readme_table_lists_every_hub_card_as_configured():
    rows = {line.split("|")[1].strip(" `"): line for line in (PAPER / "README.md").read_text().splitlines() if line.startswith("| `")}
    assert sorted(rows) == HUB_CARDS
    for name in HUB_CARDS:
        hub, verified = CARDS[name].hub, CARDS[name].extra["verified"]
        for fact in (f"`{hub['path']}`", f"`{hub['name']}`", f"`{hub['split']}`", f"{int(verified['rows']):,}"):
            assert fact in rows[name], (name, fact)
        for hub_column, field in hub["columns"].items():
            assert f"{hub_column} ({verified['features'][hub_column]}) -> {field}" in rows[name], (name, hub_column)
