"""The scale path of the curation (issue #14): hub sources streamed as Arrow tables, Arrow
normalisation equal to the in-memory one, datatrove near-dedup equal in effect to the old engine,
and the streamed curation of hub sets to Parquet shards (filters, decontamination, counts)."""

import dataclasses

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalm_lib.curation import near_dedup, normalise
from kalm_lib.data_cards import DataCardError, load_cards
from kalm_lib.dedup import lsh_bands, parquet_files
from kalm_lib.layout import DATA_CARDS_DIR, REPO_ROOT
from kalm_lib.scale import StreamSettings, curate_stream, normalise_column
from kalm_lib.sources import hub_batches, load_source

PAPER = load_cards(DATA_CARDS_DIR / "paper")
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "hub"
HUB_CARDS = sorted(name for name, card in PAPER.items() if card.kind == "source" and card.loader == "hub")
WORDS = np.array([f"{a}{b}{c}" for a in "bdfgklmnprst" for b in "aeiou" for c in "lmnrst"])


def fixture(name: str):
    return FIXTURES / f"{name}.parquet"


def read_rows(folder) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(path) for path in parquet_files(folder)], ignore_index=True)


@pytest.mark.parametrize("name", HUB_CARDS)
def test_streamed_fixture_equals_the_in_memory_load(name):
    card = PAPER[name]
    tables = list(hub_batches(card, data_files=fixture(name), batch_rows=4))
    assert [t.num_rows for t in tables] == [4, 2]
    streamed = pa.concat_tables(tables).to_pandas()[card.fields]
    assert streamed.equals(load_source(card, data_files=fixture(name)))


def test_stream_keeps_the_limit_across_batches_and_checks_columns(tmp_path):
    card = dataclasses.replace(PAPER["hub_gooaq"], hub={**PAPER["hub_gooaq"].hub, "limit": 5})
    assert [t.num_rows for t in hub_batches(card, data_files=[fixture("hub_gooaq")], batch_rows=2)] == [2, 2, 1]
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"premise": ["a"]}), wrong)
    with pytest.raises(DataCardError, match=r"hub_gooaq\.yaml: field 'hub\.columns' maps column\(s\) \['question', 'answer'\]"):
        next(hub_batches(card, data_files=wrong))


def test_hub_stream_asks_load_dataset_for_a_stream(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_parquet(str(fixture("hub_msmarco_triplets"))).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    tables = list(hub_batches(PAPER["hub_msmarco_triplets"], batch_rows=5))
    assert calls == [("sentence-transformers/msmarco-bm25", "triplet", {"split": "train", "streaming": True})]
    assert [t.num_rows for t in tables] == [5, 1] and tables[0].column_names == ["query", "positive", "negative"]


def test_arrow_normalisation_equals_the_python_one():
    texts = ["  ﬁne\u00a0 print\n\tcase ", "a\u2028b\x1cc\x85d", "\u3000x\u2003 y\u200b", "Ⅻ  ㎏", "plain"]
    assert normalise_column(pa.chunked_array([texts])).to_pylist() == [normalise(t) for t in texts]


def test_both_engines_cut_at_the_same_bands_and_drop_the_same_near_copy():
    assert lsh_bands(0.85) == (4, 15)
    rng = np.random.default_rng(0)
    queries = [" ".join(rng.choice(WORDS, 30)) for _ in range(200)]
    rows = pd.DataFrame({"query": queries + [queries[3] + " often", queries[7]], "positive": ["p"] * 202})
    old, new = near_dedup(rows, 0.85, "datasketch"), near_dedup(rows, 0.85, "datatrove")
    assert len(old) == len(new) == 200
    assert old.index.equals(new.index) and list(new.index) == list(range(200))  # the first of each pair is kept


def hub_rows(rng, count: int, eval_texts: list[str]) -> pd.DataFrame:
    """S2ORC-schema rows: distinct titles and abstracts plus copies of rows and of evaluation texts."""
    titles = [" ".join(rng.choice(WORDS, 8)) for _ in range(count)]
    abstracts = [" ".join(rng.choice(WORDS, 25)) for _ in range(count)]
    titles += [titles[0], titles[1], eval_texts[0], eval_texts[1] + " again", "x"]
    abstracts += [abstracts[0], abstracts[1] + " too", "an abstract", "another abstract", "short title"]
    return pd.DataFrame({"title": titles, "abstract": abstracts})


def test_streamed_curation_filters_dedups_and_decontaminates(tmp_path):
    rng = np.random.default_rng(1)
    eval_texts = [" ".join(rng.choice(WORDS, 10)) for _ in range(20)]
    frame = hub_rows(rng, 300, eval_texts)
    for i, start in enumerate(range(0, len(frame), 100)):
        frame.iloc[start : start + 100].to_parquet(tmp_path / f"part{i}.parquet")
    settings = StreamSettings(min_chars=2, max_chars=400, eval_near_dup_threshold=0.8, near_dup_threshold=0.85, cap=0, seed=0,
                              shard_rows=64)
    files = sorted(tmp_path.glob("part*.parquet"))
    counts = curate_stream(PAPER["pt_hub_s2orc_title_abstract"], PAPER["hub_s2orc_title_abstract"], settings, frozenset(),
                           frozenset(eval_texts), tmp_path / "out", tmp_path / "work", data_files=files)
    assert counts == {"set": "pt_hub_s2orc_title_abstract", "stage": "pretrain", "built": 305, "after_length": 304,
                      "after_decontamination": 303, "eval_near_duplicates": 1, "after_near_dedup_of_pool": 300, "kept": 300}
    kept = read_rows(tmp_path / "out")
    assert list(kept.columns) == ["query", "positive", "negatives", "words"]
    assert sorted(kept["query"]) == sorted(frame["title"][:300])
    assert kept["negatives"].map(len).eq(0).all()


def test_streamed_curation_draws_a_pool_and_a_cap(tmp_path):
    rng = np.random.default_rng(2)
    frame = hub_rows(rng, 2000, ["unused eval text", "another one"])
    frame.to_parquet(tmp_path / "part.parquet")
    settings = StreamSettings(min_chars=2, max_chars=400, eval_near_dup_threshold=0.8, near_dup_threshold=0.85, cap=300, seed=0)
    counts = curate_stream(PAPER["pt_hub_s2orc_title_abstract"], PAPER["hub_s2orc_title_abstract"], settings, frozenset(),
                           frozenset(), tmp_path / "out", tmp_path / "work", data_files=tmp_path / "part.parquet")
    assert 500 < counts["after_near_dedup_of_pool"] < 700  # about twice the cap
    assert 240 < counts["kept"] < 360  # about the cap (binomial)
    assert len(read_rows(tmp_path / "out")) == counts["kept"]


def test_streamed_curation_takes_hub_pairs_cards_only(tmp_path):
    offline = load_cards(DATA_CARDS_DIR / "offline")
    settings = StreamSettings(2, 400, 0.8, 0.85, cap=0, seed=0)
    with pytest.raises(DataCardError, match="pt_gcide_definitions.yaml: streamed curation needs a hub_pairs card"):
        curate_stream(offline["pt_gcide_definitions"], offline["gcide"], settings, frozenset(), frozenset(), tmp_path, tmp_path)
