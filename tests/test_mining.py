"""Hard-negative mining: exact blockwise ranking, bans, the released script's filter and padding,
robustness to float noise, and the quality table, on hand-made embeddings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from spawned_ranks import gloo_group, run_ranks

from kalm_lib.builders import synonym_triples
from kalm_lib.data_cards import DataCard
from kalm_lib.distributed import gather_rows, shard
from kalm_lib.mining import (
    MiningConfig,
    banned_keys,
    mine_hard_negatives,
    mining_quality,
    paired_dots,
    pool_table,
    related_by_key,
    top_ranked,
)

QUERY_MARK = "\n Query: "


class TableEncoder:
    """Embeds a text by looking up its bare form (the instruction prefix removed) in a table."""

    device = torch.device("cpu")  # where mining ranks (the Encoder's device)

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return np.stack([self.table[t.rsplit(QUERY_MARK, 1)[-1]] for t in texts]).astype(np.float32)


def card(symmetric: bool = False) -> DataCard:
    return DataCard(name="set", kind="derived", description="d", license="l", fields=[], path="set.yaml",
                    task_type="retrieval", stage="finetune", instruction="Find the word", symmetric=symmetric)


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def frame(rows: list[tuple[str, str, list[str]]]) -> pd.DataFrame:
    return pd.DataFrame({"query": [r[0] for r in rows], "positive": [r[1] for r in rows],
                         "negatives": [r[2] for r in rows], "words": [[r[1]] for r in rows]})


def full_matrix_top_k(queries: np.ndarray, pool: np.ndarray, k: int, decimals: int) -> np.ndarray:
    """The reference: the whole queries x pool matrix, each row sorted by (rounded score desc, index)."""
    scores = np.round((queries @ pool.T).astype(np.float64) * 10**decimals)
    return np.array([np.lexsort((np.arange(len(pool)), -row))[:k] for row in scores])


def dyadic_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Vectors of multiples of 1/64 in [-3/64, 3/64]: every dot product is exact in float32 whatever
    the kernel or block shape, and many fall on one rounding grid point (ties)."""
    return (rng.integers(-3, 4, size=(n, dim)) / 64).astype(np.float32)


BLOCKS = [(1, 1), (3, 7), (7, 97), (20, 60), (64, 299), (1024, 16384)]


@pytest.mark.parametrize(("block_queries", "block_pool"), BLOCKS)
@pytest.mark.parametrize("decimals", [1, 3, 4])
def test_blocked_top_k_equals_the_full_matrix_ranking_ties_included(block_queries, block_pool, decimals):
    # 300 candidates (block sizes that divide it and ones that don't), exact scores, and a vector
    # repeated 40 times: more than k = 25 candidates tie on one grid point, so the smaller pool
    # index decides, inside a block and across blocks. decimals=1 puts every score on one grid
    # point; decimals=3 puts later blocks' candidates one grid point above a row's k-th key.
    rng = np.random.default_rng(0)
    queries, pool = dyadic_rows(rng, 20, 16), dyadic_rows(rng, 300, 16)
    pool[100:140] = pool[5]
    queries[0] = pool[5]
    cfg = MiningConfig(count=1, rank_min=0, rank_max=5, score_decimals=decimals, block_queries=block_queries, block_pool=block_pool)
    np.testing.assert_array_equal(top_ranked(queries, pool, 25, cfg), full_matrix_top_k(queries, pool, 25, decimals))


@pytest.mark.parametrize(("block_queries", "block_pool"), [(1, 1000), (37, 999), (64, 4096), (1024, 16384)])
def test_blocked_top_k_on_unit_vectors_with_duplicates_equals_one_block(block_queries, block_pool):
    # 384-d random unit vectors as mining sees them; 150 copies of one candidate and 50 of another.
    rng = np.random.default_rng(1)
    queries, pool = unit_rows(rng, 100, 384), unit_rows(rng, 5000, 384)
    pool[1000:1150] = pool[0]
    pool[3000:3050] = pool[7]
    queries[:2] = pool[[0, 7]]
    one_block = MiningConfig(count=7, rank_min=10, rank_max=50, block_queries=len(queries), block_pool=len(pool))
    blocked = MiningConfig(count=7, rank_min=10, rank_max=50, block_queries=block_queries, block_pool=block_pool)
    expected = top_ranked(queries, pool, 114, one_block)
    np.testing.assert_array_equal(top_ranked(queries, pool, 114, blocked), expected)
    assert expected[0, :114].tolist() == [0, *range(1000, 1113)]  # ties in pool order


def test_a_tiny_perturbation_changes_at_most_a_handful_of_rows():
    # Embeddings clustered around one direction, like real word embeddings under one instruction,
    # so near-ties are common; 1e-6 noise stands in for another CPU's kernels. Mining that ranked
    # raw scores and drew from the window in rank order (the code before this test) changed 7 of
    # these 1000 rows; rounded scores, pool-order windows and per-row draws change at most 3.
    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(3000)]
    queries = [f"q{i}" for i in range(1000)]
    clustered = unit_rows(rng, 1, 32)[0] + 0.6 * unit_rows(rng, 4000, 32)
    table = dict(zip(words + queries, clustered / np.linalg.norm(clustered, axis=1, keepdims=True)))
    rows = frame([(q, words[i], []) for i, q in enumerate(queries)])
    noisy = {k: v + 1e-6 * rng.standard_normal(v.shape) for k, v in table.items()}
    cfg = MiningConfig(count=3, rank_min=10, rank_max=50, consistency_filter=False, seed=3)
    base = mine_hard_negatives(rows, card(), TableEncoder(table), words[:1000], cfg).frame
    perturbed = mine_hard_negatives(rows, card(), TableEncoder(noisy), words[:1000], cfg).frame
    changed = sum(a != b for a, b in zip(base["negatives"], perturbed["negatives"]))
    assert changed <= 3, f"{changed} of {len(rows)} rows changed under a 1e-6 perturbation"


def test_bans_the_query_text_and_the_synonyms_of_every_word_of_the_row():
    # Word query "bank" -> synonym "depository"; "bank" also has the synonym "shore" (another sense)
    # and sits closest to itself. Neither "bank", "shore" nor "depository" may be mined.
    names = ["bank", "depository", "shore", "riverside", "a", "b", "c", "d"]
    table = {n: v for n, v in zip(names, unit_rows(np.random.default_rng(2), len(names), 16))}
    table["shore"] = table["bank"] * 0.99 + 0.01 * table["a"]
    table["riverside"] = table["bank"] * 0.98 + 0.02 * table["b"]
    rows = pd.DataFrame({"query": ["bank"], "positive": ["depository"], "negatives": [[]], "words": [["bank", "depository"]]})
    related = {"bank": {"depository", "shore"}, "shore": {"bank"}, "depository": {"bank"}}
    cfg = MiningConfig(count=4, rank_min=0, rank_max=4, consistency_filter=False)
    mined = mine_hard_negatives(rows, card(symmetric=True), TableEncoder(table), names, cfg, related).frame
    assert not {"bank", "shore", "depository"} & set(mined["negatives"][0])
    assert "riverside" in mined["negatives"][0]  # the genuinely close, unrelated word is kept
    assert banned_keys("bank", "depository", related_by_key(related)) == {"bank", "depository", "shore"}


def test_spellings_of_the_positive_are_banned_and_given_antonyms_kept():
    # Real builder rows: "hot" -> "warm" with the antonym "cold" in both negatives and words. The
    # antonym must stay the first negative; "Warm" / "war-m" spellings of the positive are banned.
    sources = {
        "oewn_synonyms": pd.DataFrame({"word": ["hot"], "synonym": ["warm"]}),
        "oewn_antonyms": pd.DataFrame({"word": ["hot"], "antonym": ["cold"]}),
    }
    rows = synonym_triples(sources)
    assert rows["words"][0] == ["hot", "warm", "cold"] and rows["negatives"][0] == ["cold"]
    names = ["hot", "warm", "Warm", "war-m", "cold", "tepid", "x1", "x2", "x3"]
    table = dict(zip(names, unit_rows(np.random.default_rng(7), len(names), 16)))
    for spelling in ("Warm", "war-m"):
        table[spelling] = table["hot"] * 0.999 + 0.001 * table["x1"]  # the nearest candidates of "hot"
    cfg = MiningConfig(count=3, rank_min=0, rank_max=2, consistency_filter=False)
    mined = mine_hard_negatives(rows, card(symmetric=True), TableEncoder(table), names, cfg).frame
    negatives = mined["negatives"][0]
    assert negatives[0] == "cold" and len(negatives) == 3
    assert not {"hot", "warm", "Warm", "war-m"} & set(negatives)


def test_consistency_filter_drops_rows_whose_positive_ranks_below_the_window():
    rng = np.random.default_rng(4)
    words = [f"w{i}" for i in range(40)]
    table = dict(zip(words + ["q_good", "q_bad"], unit_rows(rng, 42, 16)))
    table["w0"] = table["q_good"]  # q_good's positive is its nearest word
    far = -table["q_bad"]
    table["w1"] = far / np.linalg.norm(far)  # q_bad's positive is its farthest word
    rows = frame([("q_good", "w0", []), ("q_bad", "w1", [])])
    cfg = MiningConfig(count=2, rank_min=3, rank_max=10)
    result = mine_hard_negatives(rows, card(), TableEncoder(table), words, cfg)
    assert result.frame["query"].tolist() == ["q_good"] and result.dropped_inconsistent == 1
    kept = mine_hard_negatives(rows, card(), TableEncoder(table), words, MiningConfig(2, 3, 10, consistency_filter=False))
    assert kept.frame["query"].tolist() == ["q_good", "q_bad"] and kept.dropped_inconsistent == 0


def test_rows_short_of_negatives_are_padded_not_cut():
    # Six pool words, a window of ranks [1, 3) holds two: a row asking for four gets the two
    # mined ones plus two random ones; the given negative comes first.
    names = ["q", "pos", "given", "x1", "x2", "x3", "x4"]
    table = dict(zip(names, unit_rows(np.random.default_rng(5), len(names), 8)))
    rows = frame([("q", "pos", ["given"])])
    result = mine_hard_negatives(rows, card(), TableEncoder(table), names[1:], MiningConfig(4, 1, 3, consistency_filter=False))
    negatives = result.frame["negatives"][0]
    assert len(negatives) == 4 and len(set(negatives)) == 4 and negatives[0] == "given"
    assert result.padded_rows == 1 and "pos" not in negatives and "q" not in negatives


def test_quality_table_by_hand():
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    position = {"a": 0, "b": 1, "c": 2}
    mined = pd.DataFrame({"negatives": [["a", "c", "a"]]})
    quality = mining_quality(mined, (query, pool, position), seed=0)
    assert quality["slots"] == 3 and quality["distinct_ratio"] == pytest.approx(2 / 3)
    assert quality["top10_share"] == 1.0
    assert quality["mean_cos_negative"] == pytest.approx((1 + 0.6 + 1) / 3)
    draws = np.random.default_rng(0).integers(3, size=3)
    assert quality["mean_cos_random"] == pytest.approx(float(np.mean(pool[draws] @ query[0])))


def test_paired_dots_are_the_same_in_chunks():
    rng = np.random.default_rng(8)
    left, right = unit_rows(rng, 10, 4), unit_rows(rng, 30, 4)
    left_rows, right_rows = rng.integers(10, size=25), rng.integers(30, size=25)
    expected = np.einsum("sd,sd->s", left[left_rows], right[right_rows])
    np.testing.assert_array_equal(paired_dots(left, left_rows, right, right_rows, chunk=4), expected)


def test_pool_is_every_word_not_held_out_with_its_relations():
    sources = {"syn": pd.DataFrame({"word": ["a", "b"], "synonym": ["b", "c"]}), "gloss": pd.DataFrame({"word": ["d"], "gloss": ["x"]})}
    pool = pool_table(sources, held_out_keys=frozenset({"c"}))
    assert pool["text"].tolist() == ["a", "b", "d"]
    assert [list(r) for r in pool["related"]] == [["b"], ["a", "c"], []]


def test_bad_mining_settings_are_named():
    with pytest.raises(ValueError, match="rank_min < rank_max"):
        MiningConfig(count=1, rank_min=5, rank_max=5)
    with pytest.raises(ValueError, match="block_queries=0, block_pool=8"):
        MiningConfig(count=1, rank_min=0, rank_max=5, block_queries=0, block_pool=8)
    with pytest.raises(ValueError, match="not larger than rank_min"):
        mine_hard_negatives(frame([("q", "p", [])]), card(), TableEncoder({}), [], MiningConfig(1, 3, 6))


# --- several processes: each encodes and ranks its shard, every process gets the whole result -------

WORLD = 2


def sharded_case() -> tuple[pd.DataFrame, dict[str, np.ndarray], list[str], MiningConfig]:
    """Rows, embeddings, pool and settings mined by one process and by WORLD processes (odd sizes)."""
    rng = np.random.default_rng(6)
    words, queries = [f"w{i}" for i in range(301)], [f"q{i}" for i in range(77)]
    table = dict(zip(words + queries, unit_rows(rng, len(words) + len(queries), 16)))
    rows = frame([(q, words[i], []) for i, q in enumerate(queries)])
    return rows, table, words, MiningConfig(count=3, rank_min=5, rank_max=20, consistency_filter=False, block_queries=8, block_pool=50)


def _mining_worker(rank: int, store: str, results) -> None:
    with gloo_group(rank, store, WORLD):
        rows, table, words, cfg = sharded_case()
        results.put((rank, mine_hard_negatives(rows, card(), TableEncoder(table), words, cfg).frame))


def test_one_process_shard_is_everything():
    assert shard(7) == slice(0, 7)
    array = np.arange(6).reshape(3, 2)
    assert gather_rows(array) is array


@pytest.mark.slow
def test_two_processes_mine_exactly_like_one(tmp_path):
    frames = run_ranks(_mining_worker, tmp_path / "store", WORLD, timeout=180)
    rows, table, words, cfg = sharded_case()
    single = mine_hard_negatives(rows, card(), TableEncoder(table), words, cfg).frame
    for mined in frames:
        pd.testing.assert_frame_equal(mined, single)


# --- in the series: mining runs after stage 1, on the stage-1 model ----------------------------

def test_mined_sets_are_marked_padded_and_measured(curated_tiny):
    from kalm_lib.curation import load_train_sets
    from kalm_lib.layout import RunLayout
    from kalm_lib.pipeline import open_run

    profile, _ = open_run("tiny", curated_tiny)
    layout = RunLayout(curated_tiny)
    sets = load_train_sets(layout, "finetune")
    mined = {name: (frame, card) for name, (frame, card) in sets.items() if card.task_type != "classification"}
    assert mined and all(card.extra["mined_with"] == "stage1" for _, card in mined.values())
    for frame, card in mined.values():
        assert frame["negatives"].map(len).eq(profile.data.hard_negatives).all(), card.name
        assert card.extra["file"] == str(layout.mined_shard(card.name).relative_to(layout.data))
    quality = pd.read_csv(layout.mining_quality)
    assert set(quality["set"]) == set(mined)
    assert {"distinct_ratio", "top10_share", "mean_cos_negative", "mean_cos_random", "dropped_inconsistent"} <= set(quality)


def test_finetuning_refuses_sets_that_were_not_mined(curated_tiny, tmp_path):
    import shutil

    import yaml

    from kalm_lib.layout import RunLayout
    from kalm_lib.pipeline import open_run, run_finetuning

    run = tmp_path / "run"
    shutil.copytree(RunLayout(curated_tiny).data, RunLayout(run).data)
    card_path = RunLayout(run).card("ft_gloss_retrieval")
    record = yaml.safe_load(card_path.read_text())
    record.pop("mined_with")
    card_path.write_text(yaml.safe_dump(record))
    profile, _ = open_run("tiny", run)
    with pytest.raises(FileNotFoundError, match=r"\['ft_gloss_retrieval'\] have no mined negatives"):
        run_finetuning(profile, run)


def test_mining_ranks_with_the_stage1_checkpoint(curated_tiny, tmp_path, monkeypatch):
    """Notebook 02's mining loads the stage-1 checkpoint and ranks with it, not the base model."""
    import shutil

    import torch

    from kalm_lib import pipeline
    from kalm_lib.encoder import load_encoder
    from kalm_lib.layout import RunLayout
    from kalm_lib.pipeline import open_run, run_mining

    run = tmp_path / "run"
    shutil.copytree(curated_tiny, run)
    profile, _ = open_run("tiny", run)
    stage1 = load_encoder(profile.model)
    with torch.no_grad():
        for parameter in stage1.backbone.parameters():
            parameter.add_(0.01)  # a "trained" stage 1 that differs from the base weights
    stage1.save(RunLayout(run).stage1.final)
    loaded, ranked_with = [], []
    real_load, real_mine = pipeline.encoder_from_checkpoint, pipeline.mine_hard_negatives
    monkeypatch.setattr(pipeline, "encoder_from_checkpoint", lambda path, cfg: loaded.append(path) or real_load(path, cfg))
    monkeypatch.setattr(pipeline, "mine_hard_negatives",
                        lambda frame, card, encoder, *a, **k: ranked_with.append(encoder) or real_mine(frame, card, encoder, *a, **k))
    run_mining(profile, run)
    assert loaded == [RunLayout(run).stage1.final] and ranked_with
    expected = stage1.backbone.state_dict()
    for encoder in ranked_with:
        assert all(torch.equal(value, expected[name]) for name, value in encoder.backbone.state_dict().items())
