"""The scale path of the curation (issue #14): hub sources streamed as Arrow tables, Arrow
normalisation equal to the in-memory one, datatrove near-dedup equal in effect to the old engine,
and the streamed curation of hub sets to Parquet shards (filters, decontamination, counts)."""

import dataclasses
import gc
import time

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasketch import MinHash

from kalm_lib.batching import make_batch, negatives_per_query
from kalm_lib.builders import hub_pairs, word_key
from kalm_lib.config import load_profile
from kalm_lib.curation import curate, load_train_sets, near_dedup, normalise, write_curated
from kalm_lib.data_cards import DataCardError, load_cards
from kalm_lib.dedup import EXAMPLE_SCHEMA, NUM_PERM, CharShingleSignature, lsh_bands, minhash_config, parquet_files, shingles
from kalm_lib.layout import DATA_CARDS_DIR, REPO_ROOT, RunLayout
from kalm_lib.scale import StreamSettings, curate_stream, curate_streamed_sets, example_table, normalise_column, streamed_sets
from kalm_lib.shards import ShardRows, write_arrow_copy
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
    with pytest.raises(DataCardError, match=r"that local data file \S*wrong\.parquet lacks"):  # a later file: before any row is read
        next(hub_batches(card, data_files=[fixture("hub_gooaq"), wrong]))


def test_local_stream_memory_does_not_grow_with_the_number_of_files(tmp_path):
    """Arrow memory held while streaming 12 files stays within a few batches, also when the
    consumer is slow (as the curation is: normalising and writing each table). No read-ahead of
    files: pyarrow's default held 7-8 batches here, and its dataset scanner with
    ``batch_readahead=0, fragment_readahead=0`` still decoded every file ahead of a slow consumer
    (10 of 10 files, the peak of the curation grew ~30 MiB per 1e5 rows)."""
    rng = np.random.default_rng(0)
    rows = 20_000
    files = []
    for index in range(12):
        letters = rng.integers(ord("a"), ord("i"), size=(rows, 60), dtype=np.uint8)
        column = pa.array(letters.view("S60").ravel().astype(str))
        files.append(tmp_path / f"{index:05d}.parquet")
        pq.write_table(pa.table({"question": column, "answer": column}), files[-1])
    batch_bytes = pq.read_table(files[0]).nbytes
    gc.collect()
    start = peak = pa.total_allocated_bytes()
    for table in hub_batches(PAPER["hub_gooaq"], data_files=files, batch_rows=rows):
        time.sleep(0.2)  # a consumer's work: a background reader would decode the next files meanwhile
        peak = max(peak, pa.total_allocated_bytes())
        del table
    assert peak - start <= 5 * batch_bytes


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


@pytest.mark.parametrize("name", ["hub_msmarco_triplets", "hub_gooaq"])
def test_arrow_example_rows_equal_the_hub_pairs_builder(name):
    """With and without a negative column: the rows the stream writes are the in-memory builder's."""
    card = PAPER[name]
    table = pa.concat_tables(hub_batches(card, data_files=fixture(name)))
    expected = hub_pairs({name: load_source(card, data_files=fixture(name))}, name)
    expected = expected.assign(query=expected["query"].map(normalise), positive=expected["positive"].map(normalise),
                               negatives=expected["negatives"].map(lambda negs: [normalise(n) for n in negs]))
    rows = example_table(table)
    assert rows.schema == EXAMPLE_SCHEMA
    assert rows.to_pylist() == expected[["query", "positive", "negatives", "words"]].to_dict("records")


def test_datatrove_signatures_are_the_datasketch_minhash_bands(tmp_path):
    signer = CharShingleSignature(str(tmp_path), minhash_config(0.85))
    for text in ["a small domesticated carnivorous mammal || cat", "x || y", "Ⅻ  ㎏ || ﬁne"]:
        expected = MinHash.bulk([shingles(text)], num_perm=NUM_PERM)[0].hashvalues[:60].tolist()
        bands = signer.get_signature(signer.get_shingles(text))
        assert [len(band) for band in bands] == [15] * 4 and sum(bands, []) == expected


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


@pytest.mark.parametrize("workers", [1, 2])
def test_streamed_curation_filters_dedups_and_decontaminates(tmp_path, workers):
    """With one worker datatrove runs every task in this process; with two, in a process pool (as
    ``data.curation_workers`` does): the same counts and rows either way."""
    rng = np.random.default_rng(1)
    eval_texts = [" ".join(rng.choice(WORDS, 10)) for _ in range(20)]
    frame = hub_rows(rng, 300, eval_texts)
    for i, start in enumerate(range(0, len(frame), 100)):
        frame.iloc[start : start + 100].to_parquet(tmp_path / f"part{i}.parquet")
    settings = StreamSettings(min_chars=2, max_chars=400, eval_near_dup_threshold=0.8, near_dup_threshold=0.85, cap=0, seed=0,
                              shard_rows=64, workers=workers)
    files = sorted(tmp_path.glob("part*.parquet"))
    counts = curate_stream(PAPER["pt_hub_s2orc_title_abstract"], PAPER["hub_s2orc_title_abstract"], settings, frozenset(),
                           frozenset(eval_texts), tmp_path / "out", tmp_path / "work", data_files=files)
    assert counts == {"set": "pt_hub_s2orc_title_abstract", "stage": "pretrain", "built": 305, "after_length": 304,
                      "after_decontamination": 303, "eval_near_duplicates": 1, "after_near_dedup_of_pool": 300, "kept": 300}
    kept = read_rows(tmp_path / "out")
    assert list(kept.columns) == ["query", "positive", "negatives", "words"]
    assert sorted(kept["query"]) == sorted(frame["title"][:300])
    assert kept["negatives"].map(len).eq(0).all()


def test_streamed_curation_builds_no_lsh_index_in_its_tasks(tmp_path, monkeypatch):
    """The evaluation index is built once (a BandIndex file) and loaded by each task; a task never
    builds a MinHash LSH index (each of the paper's hundreds of tasks would index millions of texts)."""
    import datasketch

    def refuse(*args, **kwargs):
        raise AssertionError("a MinHash LSH index was built")

    for method in ("insert", "insertion_session"):  # an LSH index is filled one way or the other
        monkeypatch.setattr(datasketch.MinHashLSH, method, refuse)
    rng = np.random.default_rng(3)
    eval_texts = [" ".join(rng.choice(WORDS, 10)) for _ in range(5)]
    frame = hub_rows(rng, 100, eval_texts)
    frame.to_parquet(tmp_path / "part.parquet")
    settings = StreamSettings(min_chars=2, max_chars=400, eval_near_dup_threshold=0.8, near_dup_threshold=0.85, cap=0, seed=0,
                              shard_rows=40)
    counts = curate_stream(PAPER["pt_hub_s2orc_title_abstract"], PAPER["hub_s2orc_title_abstract"], settings, frozenset(),
                           frozenset(eval_texts), tmp_path / "out", tmp_path / "work", data_files=tmp_path / "part.parquet")
    assert counts["eval_near_duplicates"] >= 1


def test_streamed_tasks_carry_no_evaluation_text(tmp_path, monkeypatch):
    """What each datatrove task gets (its pickled pipeline: forkserver workers, Slurm and Ray jobs)
    holds no evaluation text or held-out word, only paths to the memory-mapped indexes; a pipeline
    carrying them costs every worker a copy of millions of MTEB texts."""
    import pickle

    from kalm_lib import scale

    pickled = []
    real_run_steps = scale.run_steps

    def capture(pipeline, tasks, workers, logs):
        pickled.append(pickle.dumps(list(pipeline)))
        return real_run_steps(pipeline, tasks, workers, logs)

    monkeypatch.setattr(scale, "run_steps", capture)
    rng = np.random.default_rng(5)
    eval_texts = [f"evaluation text number {i} " + " ".join(rng.choice(WORDS, 6)) for i in range(50)]
    frame = hub_rows(rng, 60, eval_texts)
    frame.to_parquet(tmp_path / "part.parquet")
    settings = StreamSettings(min_chars=2, max_chars=400, eval_near_dup_threshold=0.8, near_dup_threshold=0.85, cap=20, seed=0)
    counts = curate_stream(PAPER["pt_hub_s2orc_title_abstract"], PAPER["hub_s2orc_title_abstract"], settings,
                           frozenset({"Zygomorphic"}), frozenset(eval_texts), tmp_path / "out", tmp_path / "work",
                           data_files=tmp_path / "part.parquet")
    assert counts["after_length"] - counts["after_decontamination"] == 1  # the copy of eval_texts[0]
    assert len(pickled) == 3  # cleaning; pool and evaluation near-duplicates; cap
    for blob in pickled:
        assert b"zygomorphic" not in blob.lower()
        assert not [t for t in eval_texts if t.encode() in blob]


def test_decontamination_filter_drops_held_out_words_in_any_spelling_and_eval_texts(tmp_path):
    from datatrove.data import Document

    from kalm_lib.eval_index import TextHashes
    from kalm_lib.scale import DecontaminationFilter

    TextHashes.build(["an evaluation text"]).save(tmp_path / "texts.npy")
    TextHashes.build(word_key(w) for w in ["ice cream", "o'clock"]).save(tmp_path / "words.npy")
    rows = [("a query", "a positive", [], ["Ice-cream"]), ("a query", "a positive", ["an evaluation text"], []),
            ("an evaluation text", "x", [], []), ("q", "p", ["n"], ["O'Clock", "other"]), ("q", "p", ["n"], ["clock"])]
    docs = [Document(text=f"{q} || {p}", id=str(i), metadata={"query": q, "positive": p, "negatives": n, "words": w})
            for i, (q, p, n, w) in enumerate(rows)]
    decontamination = DecontaminationFilter(tmp_path / "texts.npy", tmp_path / "words.npy")
    assert decontamination.filter_batch(docs) == [False, False, False, False, True]
    assert [decontamination.filter(doc) for doc in docs] == [False, False, False, False, True]


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


def test_streamed_pool_is_about_twice_the_cap_of_the_rows_that_pass_the_filters(tmp_path):
    """The pool's rate is set from the rows left after the length filter and decontamination, as
    the in-memory path draws its pool after them: with three rows in four too long, the cap is
    still met (a rate from the rows built would pool about 2 x cap / 4 and keep half the cap)."""
    rng = np.random.default_rng(4)
    frame = hub_rows(rng, 2000, ["unused eval text", "another one"])
    long_rows = rng.permutation(len(frame))[:1500]
    frame.loc[long_rows, "abstract"] = [" ".join(rng.choice(WORDS, 150)) for _ in long_rows]  # about 600 characters
    frame.to_parquet(tmp_path / "part.parquet")
    settings = StreamSettings(min_chars=2, max_chars=400, eval_near_dup_threshold=0.8, near_dup_threshold=0.85, cap=300, seed=0)
    counts = curate_stream(PAPER["pt_hub_s2orc_title_abstract"], PAPER["hub_s2orc_title_abstract"], settings, frozenset(),
                           frozenset(), tmp_path / "out", tmp_path / "work", data_files=tmp_path / "part.parquet")
    assert 490 <= counts["after_length"] <= 505 and counts["after_decontamination"] == counts["after_length"]
    assert counts["after_near_dedup_of_pool"] >= 490  # 2 x cap > the rows left: all of them pooled
    assert 240 < counts["kept"] < 360  # about the cap (binomial)


@pytest.mark.parametrize("cap", [0, 20])
def test_a_set_the_filters_empty_fails_with_a_clear_error(tmp_path, cap):
    rng = np.random.default_rng(6)
    frame = hub_rows(rng, 50, ["unused eval text", "another one"])
    frame["abstract"] = [" ".join(rng.choice(WORDS, 150)) for _ in range(len(frame))]  # every row too long
    frame.to_parquet(tmp_path / "part.parquet")
    settings = StreamSettings(min_chars=2, max_chars=400, eval_near_dup_threshold=0.8, near_dup_threshold=0.85, cap=cap, seed=0)
    with pytest.raises(DataCardError, match="empty after curation"):
        curate_stream(PAPER["pt_hub_s2orc_title_abstract"], PAPER["hub_s2orc_title_abstract"], settings, frozenset(),
                      frozenset(), tmp_path / "out", tmp_path / "work", data_files=tmp_path / "part.parquet")


def test_streamed_curation_takes_hub_pairs_cards_only(tmp_path):
    offline = load_cards(DATA_CARDS_DIR / "offline")
    settings = StreamSettings(2, 400, 0.8, 0.85, cap=0, seed=0)
    with pytest.raises(DataCardError, match="pt_gcide_definitions.yaml: streamed curation needs a hub_pairs card"):
        curate_stream(offline["pt_gcide_definitions"], offline["gcide"], settings, frozenset(), frozenset(), tmp_path, tmp_path)


# --- streamed sets in a run folder, and training reading them a batch at a time --------------

def test_shard_rows_read_rows_in_the_asked_order(tmp_path):
    frame = pd.DataFrame({"query": [f"q{i}" for i in range(25)], "positive": [f"p{i}" for i in range(25)],
                          "negatives": [[f"n{i}"] * (1 + i % 3) for i in range(25)], "words": [[] for _ in range(25)]})
    for i, start in enumerate(range(0, 25, 10)):
        pq.write_table(pa.Table.from_pandas(frame.iloc[start : start + 10], preserve_index=False), tmp_path / f"{i}.parquet",
                       row_group_size=4)
    assert write_arrow_copy(parquet_files(tmp_path), tmp_path / "set.arrow") == 25
    rows = ShardRows(tmp_path / "set.arrow")
    assert len(rows) == 25 and rows.min_list_length("negatives") == 1
    picked = rows.iloc[np.array([24, 0, 13, 3, 13])]
    assert picked["query"].tolist() == ["q24", "q0", "q13", "q3", "q13"]
    assert [list(n) for n in picked["negatives"]] == [frame["negatives"][i] for i in (24, 0, 13, 3, 13)]
    assert rows.head(2)["positive"].tolist() == ["p0", "p1"]
    with pytest.raises(IndexError):
        rows.take(np.array([25]))
    assert rows.take(np.array([], dtype=np.int64)).columns.tolist() == frame.columns.tolist()
    with pytest.raises(FileNotFoundError, match="no Arrow copy"):
        ShardRows(tmp_path / "missing.arrow")


def test_streamed_sets_are_curated_into_the_run_and_trained_from_their_shards(tmp_path, monkeypatch):
    """The paper cards with every hub dataset replaced by its fixture: stage-1 sets streamed into
    shard folders with filled cards, stage-2 sets curated in memory, and training batches read
    from the shards."""
    def fake_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        card = next(c for c in PAPER.values() if c.kind == "source" and c.hub["path"] == path and c.hub.get("name") == name)
        dataset = datasets.Dataset.from_parquet(str(fixture(card.name)))
        return dataset.to_iterable_dataset() if streaming else dataset

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = dataclasses.replace(load_profile("gpu-qwen2-0.5b").data, max_stage1_pairs_per_source=100)
    assert data.stream_hub_sets
    streamed = streamed_sets(PAPER)
    assert sorted(streamed) == sorted(n for n, c in PAPER.items() if c.kind == "derived" and c.stage == "pretrain")
    layout = RunLayout(tmp_path / "run")
    result = curate(data, 42, DATA_CARDS_DIR / "paper", exclude=streamed)
    assert not set(result.train) & streamed and not set(result.sources) & {PAPER[n].inputs[0] for n in streamed}
    curate_streamed_sets(result, data, 42, PAPER, streamed, layout, batch_sizes={"pretrain": 8})
    write_curated(result, layout)
    assert not layout.streaming_work("pt_hub_gooaq").exists()
    sets = load_train_sets(layout, "pretrain")
    assert sorted(sets) == sorted(streamed)
    for name, (rows, card) in sets.items():
        assert isinstance(rows, ShardRows) and len(rows) == card.extra["size"] == 6, name
        assert layout.arrow_copy("pretrain", name).is_file()  # written by the curation, memory-mapped by training
        assert card.extra["file"] == f"pretrain/{name}"
        batch = make_batch(rows, card, np.array([5, 0, 2, 1]), negatives_per_query(rows, 3), 0, 1)
        source = pd.read_parquet(fixture(card.inputs[0]))
        query_column = next(hub for hub, field in PAPER[card.inputs[0]].hub["columns"].items() if field == "query")
        assert batch.queries[1].endswith(normalise(source.iloc[0][query_column]))
    summary = pd.read_csv(layout.curation_summary).set_index("set")
    assert set(summary.index) == {n for n, c in PAPER.items() if c.kind == "derived"}
    assert summary.loc[sorted(streamed), "kept"].eq(6).all()
    assert summary.loc[sorted(streamed), "below_one_batch"].astype(bool).all()  # 6 rows < a batch of 8: flagged
