"""Data cards: YAML files that say what a data source or a derived set is, and where it comes from.

Three kinds of card live under ``data_cards/``:

* ``source``: a raw source with a ``loader`` (an offline package or a hub dataset);
* ``derived``: a training or evaluation set built from sources by a named ``builder``;
* ``reference``: published numbers (e.g. the paper's MTEB table) shown beside our runs.

Curation writes a filled-in copy of every derived card (size, hash, split) into the run folder.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .outputs import write_output

CARD_KINDS = ("source", "derived", "reference")
TASK_TYPES = ("retrieval", "sts", "classification", "clustering", "pair_classification", "mixed")
STAGES = ("pretrain", "finetune", "eval")
REQUIRED = {
    "source": ("name", "kind", "description", "source", "license", "fields", "loader"),
    "derived": (
        "name", "kind", "description", "license", "fields", "task_type", "stage", "builder",
        "inputs", "instruction",
    ),
    "reference": ("name", "kind", "description", "source", "license", "fields"),
}

EVAL_REQUIRED = ("eval_file",)  # extra fields an evaluation (stage: eval) derived card needs
_TYPE_WORDS = {str: "a string", bool: "true or false", dict: "a mapping", list: "a list of strings"}


class DataCardError(ValueError):
    """A data card is missing, malformed, or refers to something unknown."""


@dataclass(frozen=True)
class DataCard:
    """One parsed and validated data card."""

    name: str
    kind: str
    description: str
    license: str
    fields: list[str]
    path: str
    source: str = ""
    loader: str = ""
    hub: dict[str, Any] = field(default_factory=dict)
    task_type: str = ""
    stage: str = ""
    builder: str = ""
    inputs: list[str] = field(default_factory=list)
    instruction: str = ""
    symmetric: bool = False
    in_batch_negatives: bool = True
    split: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def filled(self, **stats: Any) -> dict[str, Any]:
        """The card as a dict with run statistics (size, hash, ...) added, for writing out: its
        fields and extra fields side by side, as in the card it was read from."""
        record = {k: v for k, v in asdict(self).items() if v not in ("", [], {}) and k not in ("path", "extra")}
        record.update(self.extra)
        record.update(stats)
        return record


def load_card(path: Path) -> DataCard:
    """Parse and validate one card, naming the file and field on any problem."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DataCardError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise DataCardError(f"{path}: a data card must be a mapping of fields")
    kind = raw.get("kind")
    if kind not in CARD_KINDS:
        raise DataCardError(f"{path}: field 'kind' must be one of {CARD_KINDS}, got {kind!r}")
    if isinstance(raw.get("extra"), dict):  # filled cards of older runs nest their extra fields
        raw = {**raw.pop("extra"), **raw}
    required = REQUIRED[kind] + (EVAL_REQUIRED if kind == "derived" and raw.get("stage") == "eval" else ())
    missing = [key for key in required if raw.get(key) in (None, "", [])]
    if missing:
        raise DataCardError(f"{path}: missing required field(s) {missing} for a {kind} card")
    known = set(DataCard.__dataclass_fields__) - {"path", "extra"}
    _check_types(path, {k: v for k, v in raw.items() if k in known})
    extra = {k: v for k, v in raw.items() if k not in known}
    card = DataCard(**{k: v for k, v in raw.items() if k in known}, path=str(path), extra=extra)
    _check_values(card)
    return card


def _check_types(path: Path, fields: dict[str, Any]) -> None:
    """Each card field has its declared type (a quoted ``"false"`` is not a boolean; list items
    are strings), else an error naming the file and field."""
    hints = typing.get_type_hints(DataCard)
    for key, value in fields.items():
        origin = typing.get_origin(hints[key]) or hints[key]
        items_ok = origin is not list or all(isinstance(item, str) for item in value)
        if not isinstance(value, origin) or not items_ok:
            raise DataCardError(f"{path}: field {key!r} must be {_TYPE_WORDS[origin]}, got {value!r}")


def _check_values(card: DataCard) -> None:
    """Field-level checks that the types alone cannot express."""
    if card.kind == "derived":
        if card.task_type not in TASK_TYPES:
            raise DataCardError(
                f"{card.path}: field 'task_type' must be one of {TASK_TYPES}, got {card.task_type!r}"
            )
        if card.stage not in STAGES:
            raise DataCardError(
                f"{card.path}: field 'stage' must be one of {STAGES}, got {card.stage!r}"
            )
        if card.stage == "eval" and not isinstance(card.extra["eval_file"], str):
            raise DataCardError(f"{card.path}: field 'eval_file' must be a file name, got {card.extra['eval_file']!r}")
    if card.kind == "source" and card.loader == "hub" and "path" not in card.hub:
        raise DataCardError(f"{card.path}: a hub source needs 'hub: {{path: ...}}'")


def load_cards(cards_dir: Path, check_inputs: bool = True) -> dict[str, DataCard]:
    """Load every ``*.yaml`` card under ``cards_dir`` (recursively), keyed by unique name.

    ``check_inputs`` verifies that every card named in an ``inputs`` field is among them.
    """
    if not cards_dir.is_dir():
        raise DataCardError(f"data card folder not found: {cards_dir}")
    cards: dict[str, DataCard] = {}
    for path in sorted(cards_dir.rglob("*.yaml")):
        card = load_card(path)
        if card.name in cards:
            raise DataCardError(f"{path}: card name {card.name!r} already used by {cards[card.name].path}")
        cards[card.name] = card
    for card in cards.values() if check_inputs else ():
        for name in card.inputs:
            if name not in cards:
                raise DataCardError(f"{card.path}: field 'inputs' names unknown card {name!r}")
    return cards


def write_card(record: dict[str, Any], path: Path) -> None:
    """Write a filled-in card as YAML."""
    write_output(yaml.safe_dump(record, sort_keys=False, allow_unicode=True), path)
