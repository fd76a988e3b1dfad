"""Task-homogeneous batch plans and the texts of one (sharded) batch."""

import logging
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from kalm_lib.batching import batch_plan, make_batch, negatives_per_query
from kalm_lib.data_cards import DataCard
from kalm_lib.instructions import format_instructed


def card(
    name: str = "set", instruction: str = "Retrieve the gloss of the word", symmetric: bool = False, in_batch: bool = True
) -> DataCard:
    return DataCard(
        name=name, kind="derived", description="test set", license="CC0", fields=["query", "positive", "negatives"],
        path=f"{name}.yaml", task_type="retrieval", stage="finetune", builder="x", inputs=["src"],
        instruction=instruction, symmetric=symmetric, in_batch_negatives=in_batch,
    )


def frame(rows: int = 8, negatives: int = 3) -> pd.DataFrame:
    return pd.DataFrame({
        "query": [f"q{i}" for i in range(rows)],
        "positive": [f"p{i}" for i in range(rows)],
        "negatives": [[f"n{i}_{k}" for k in range(negatives)] for i in range(rows)],
    })


# --- batch_plan --------------------------------------------------------------------------------

def test_plan_is_a_pure_function_of_its_arguments() -> None:
    sizes = {"a": 50, "b": 30, "c": 12}
    first, again = batch_plan(sizes, 4, 40, seed=3), batch_plan(dict(reversed(sizes.items())), 4, 40, seed=3)
    assert [name for name, _ in first] == [name for name, _ in again]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(first, again))
    other = batch_plan(sizes, 4, 40, seed=4)
    assert [n for n, _ in first] != [n for n, _ in other] or any(not np.array_equal(x, y) for (_, x), (_, y) in zip(first, other))


def test_every_step_draws_distinct_rows_of_one_set() -> None:
    sizes = {"a": 50, "b": 30, "c": 12}
    plan = batch_plan(sizes, 4, 60, seed=0)
    assert len(plan) == 60
    for name, rows in plan:
        assert len(rows) == 4 and len(set(rows.tolist())) == 4
        assert rows.min() >= 0 and rows.max() < sizes[name]


def test_sets_are_drawn_in_proportion_to_their_size_and_too_small_sets_never() -> None:
    sizes = {"big": 600, "small": 200, "tiny": 5}
    counts = Counter(name for name, _ in batch_plan(sizes, 10, 1000, seed=1))  # 12.5 epochs of 60 + 20 batches
    assert set(counts) == {"big", "small"}
    assert counts["big"] / 1000 == pytest.approx(0.75, abs=0.02)


def test_a_skipped_set_is_named_in_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kalm_lib.batching"):
        batch_plan({"big": 600, "tiny": 5}, 10, 3, seed=1)
    assert [r.getMessage() for r in caplog.records] == ["set 'tiny' has 5 rows, fewer than one batch (10): skipped"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kalm_lib.batching"):
        batch_plan({"big": 600}, 10, 3, seed=1)
    assert not caplog.records


def test_epochs_cycle_and_reshuffle_when_steps_exceed_the_data() -> None:
    plan = batch_plan({"a": 23}, 5, 12, seed=2)  # 4 full batches per epoch, the 3-row tail is dropped
    epochs = [np.concatenate([rows for _, rows in plan[i : i + 4]]) for i in range(0, 12, 4)]
    for rows in epochs:
        assert len(set(rows.tolist())) == 20  # each epoch: every batch disjoint
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh order per epoch


def test_batch_size_larger_than_every_set_is_an_error() -> None:
    with pytest.raises(ValueError, match="exceeds every training set"):
        batch_plan({"a": 3, "b": 7}, 8, 5, seed=0)


# --- make_batch --------------------------------------------------------------------------------

def test_one_instruction_format() -> None:
    assert format_instructed("Retrieve the gloss", "bank") == "Instruct: Retrieve the gloss \n Query: bank"
    assert format_instructed("", "bank") == "bank"


def test_asymmetric_card_instructs_queries_only() -> None:
    batch = make_batch(frame(), card(), np.array([5, 2]), 2, rank=0, world_size=1)
    prefix = "Instruct: Retrieve the gloss of the word \n Query: "
    assert batch.queries == [prefix + "q5", prefix + "q2"]
    assert batch.positives == ["p5", "p2"]
    assert batch.negatives == ["n5_0", "n5_1", "n2_0", "n2_1"]  # grouped by query, capped at n_neg
    assert (batch.source, batch.negatives_per_query, batch.in_batch_negatives) == ("set", 2, True)


def test_symmetric_card_instructs_documents_too() -> None:
    batch = make_batch(frame(), card(symmetric=True, in_batch=False), np.array([1]), 1, rank=0, world_size=1)
    prefix = "Instruct: Retrieve the gloss of the word \n Query: "
    assert batch.queries == [prefix + "q1"]
    assert batch.positives == [prefix + "p1"]
    assert batch.negatives == [prefix + "n1_0"]
    assert batch.in_batch_negatives is False


def test_card_without_instruction_leaves_texts_unchanged() -> None:
    batch = make_batch(frame(), card(instruction="", symmetric=True), np.array([0]), 0, rank=0, world_size=1)
    assert (batch.queries, batch.positives, batch.negatives) == (["q0"], ["p0"], [])


def test_shards_are_disjoint_contiguous_and_cover_the_global_batch() -> None:
    data, rows, world = frame(16), np.array([9, 3, 14, 0, 7, 11, 2, 5]), 4
    whole = make_batch(data, card(), rows, 2, rank=0, world_size=1)
    shards = [make_batch(data, card(), rows, 2, rank=r, world_size=world) for r in range(world)]
    for rank, shard in enumerate(shards):
        assert shard.queries == whole.queries[2 * rank : 2 * rank + 2]  # contiguous slice of the plan's rows
        assert shard.negatives == whole.negatives[4 * rank : 4 * rank + 4]
    assert sum((s.queries for s in shards), []) == whole.queries
    assert sum((s.positives for s in shards), []) == whole.positives
    assert sum((s.negatives for s in shards), []) == whole.negatives
    assert len({q for s in shards for q in s.queries}) == len(rows)  # disjoint


def test_global_batch_not_divisible_by_processes_is_an_error() -> None:
    with pytest.raises(ValueError, match="not divisible by 3"):
        make_batch(frame(), card(), np.arange(8), 1, rank=0, world_size=3)


def test_negatives_per_query_is_the_smallest_row_capped() -> None:
    data = frame(3)
    data.at[1, "negatives"] = ["only"]
    assert negatives_per_query(data, 5) == 1
    assert negatives_per_query(frame(3), 2) == 2
    assert negatives_per_query(frame(3, negatives=0), 2) == 0
