"""Data cards: the shipped ones validate; malformed ones fail naming file and field."""

from pathlib import Path

import pandas as pd
import pytest
import yaml

from kalm_lib import sources
from kalm_lib.data_cards import DataCardError, load_card, load_cards
from kalm_lib.layout import DATA_CARDS_DIR
from kalm_lib.sources import load_source

GOOD = """\
name: demo
kind: source
description: demo source
source: a test
license: CC0
loader: gcide
fields: [word, definition]
"""


def write(tmp_path: Path, text: str, name: str = "card.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_cards_validate():
    cards = load_cards(DATA_CARDS_DIR)
    kinds = {card.kind for card in cards.values()}
    assert {"source", "derived"} <= kinds
    stages = {card.stage for card in cards.values() if card.kind == "derived"}
    assert stages == {"pretrain", "finetune", "eval"}


def test_good_card_parses(tmp_path):
    card = load_card(write(tmp_path, GOOD))
    assert card.name == "demo" and card.fields == ["word", "definition"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: [unclosed", "not valid YAML"),
        ("- a list", "must be a mapping"),
        (GOOD.replace("kind: source", "kind: recipe"), "field 'kind'"),
        (GOOD.replace("license: CC0\n", ""), r"missing required field\(s\) \['license'\]"),
        (GOOD.replace("fields: [word, definition]", "fields: word"), "field 'fields'"),
        (GOOD.replace("loader: gcide", "loader: hub"), "hub source needs"),
    ],
)
def test_malformed_cards_name_the_problem(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(DataCardError, match=message) as info:
        load_card(path)
    assert str(path) in str(info.value)


def test_derived_card_checks_task_type_and_inputs(tmp_path):
    derived = (
        "name: d\nkind: derived\ndescription: x\nlicense: x\nfields: [query]\ntask_type: {tt}\n"
        "stage: pretrain\nbuilder: oewn_gloss_pairs\ninputs: [{inp}]\ninstruction: x\n"
    )
    write(tmp_path, derived.format(tt="regression", inp="demo"))
    with pytest.raises(DataCardError, match="field 'task_type'"):
        load_cards(tmp_path)
    write(tmp_path, derived.format(tt="retrieval", inp="nowhere"))
    with pytest.raises(DataCardError, match="unknown card 'nowhere'"):
        load_cards(tmp_path)


DERIVED = """\
name: d
kind: derived
description: x
license: x
fields: [query, positive]
task_type: retrieval
stage: finetune
builder: oewn_gloss_pairs
inputs: [demo]
instruction: x
symmetric: true
in_batch_negatives: false
"""
EVAL = DERIVED.replace("stage: finetune", "stage: eval") + "split: test\neval_file: d.json\n"


def test_good_derived_and_eval_cards_parse(tmp_path):
    card = load_card(write(tmp_path, DERIVED))
    assert card.symmetric is True and card.in_batch_negatives is False and card.inputs == ["demo"]
    assert load_card(write(tmp_path, EVAL)).extra["eval_file"] == "d.json"


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        (DERIVED.replace("symmetric: true", 'symmetric: "false"'), "symmetric", "must be true or false, got 'false'"),
        (DERIVED.replace("in_batch_negatives: false", "in_batch_negatives: 0"), "in_batch_negatives",
         "must be true or false, got 0"),
        (DERIVED.replace("inputs: [demo]", "inputs: demo"), "inputs", "must be a list of strings, got 'demo'"),
        (DERIVED.replace("inputs: [demo]", "inputs: [demo, 3]"), "inputs", r"must be a list of strings, got \['demo', 3\]"),
        (DERIVED.replace("instruction: x", "instruction: [x]"), "instruction", r"must be a string, got \['x'\]"),
        (EVAL.replace("eval_file: d.json\n", ""), "eval_file", r"missing required field\(s\) \['eval_file'\]"),
        (EVAL.replace("eval_file: d.json", "eval_file: [d.json]"), "eval_file", "must be a file name"),
    ],
)
def test_derived_card_fields_are_type_checked(tmp_path, text, field, message):
    path = write(tmp_path, text)
    with pytest.raises(DataCardError, match=message) as info:
        load_card(path)
    assert str(info.value).startswith(f"{path}: ") and f"'{field}'" in str(info.value)


def test_a_filled_card_reloads_as_the_card_it_was_filled_from(tmp_path):
    card = load_card(write(tmp_path, EVAL + "mteb_task: T\n"))
    filled = write(tmp_path, yaml.safe_dump(card.filled(size=3, file="eval/d.json")), "filled.yaml")
    again = load_card(filled)
    assert again.extra == {"eval_file": "d.json", "mteb_task": "T", "size": 3, "file": "eval/d.json"}
    assert again.filled() == card.filled(size=3, file="eval/d.json")


def test_a_filled_card_of_an_older_run_with_nested_extra_fields_loads(tmp_path):
    nested = EVAL.replace("eval_file: d.json\n", "extra: {eval_file: d.json, mteb_task: T}\n") + "size: 3\n"
    assert load_card(write(tmp_path, nested)).extra == {"eval_file": "d.json", "mteb_task": "T", "size": 3}


def test_duplicate_names_are_rejected(tmp_path):
    write(tmp_path, GOOD, "a.yaml")
    write(tmp_path, GOOD, "b.yaml")
    with pytest.raises(DataCardError, match="already used"):
        load_cards(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(DataCardError, match="folder not found"):
        load_cards(tmp_path / "absent")


def test_unknown_loader_and_missing_columns(tmp_path):
    with pytest.raises(DataCardError, match="field 'loader'"):
        load_source(load_card(write(tmp_path, GOOD.replace("loader: gcide", "loader: ftp"))))
    card = load_card(write(tmp_path, GOOD.replace("[word, definition]", "[word, etymology]")))
    with pytest.raises(DataCardError, match=r"\['etymology'\]"):
        load_source(card)


def test_empty_source_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sources.LOADERS, "gcide", lambda card: pd.DataFrame(columns=["word", "definition"]))
    with pytest.raises(DataCardError, match="source 'demo' is empty"):
        load_source(load_card(write(tmp_path, GOOD)))


def test_packaged_sources_are_real_and_sizeable():
    cards = load_cards(DATA_CARDS_DIR)
    gcide = load_source(cards["gcide"])
    antonyms = load_source(cards["oewn_antonyms"])
    assert len(gcide) > 150_000 and gcide["word"].nunique() > 90_000
    assert ("hot", "cold") in set(zip(antonyms["word"], antonyms["antonym"]))
