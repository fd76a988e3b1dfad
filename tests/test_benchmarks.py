"""The benchmark scripts run end to end in --quick mode and write the documented JSON schema.

Numbers from --quick are not measurements; only shape, positivity and consistency are checked.
"""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

pytestmark = pytest.mark.slow  # papermill, multi-process or benchmark runs: `pytest -m "not slow"` skips them

BENCHMARKS = ("train_throughput", "encode_throughput", "memory", "mfu", "scaling")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """Every benchmark's --quick payload, all written into one folder (one thread: steady under load)."""
    out = tmp_path_factory.mktemp("benchmarks")
    payloads = {}
    for name in BENCHMARKS:
        module = importlib.import_module(f"benchmarks.{name}")
        payloads[name] = module.main(["--quick", "--out", str(out), "--threads", "1"])
    return out, payloads


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("name", BENCHMARKS)
def test_common_schema(quick_results, name):
    out, payloads = quick_results
    payload = payloads[name]
    assert json.loads((out / f"{name}.json").read_text()) == payload
    assert set(payload) == {"benchmark", "machine", "settings", "raw", "summary"}
    machine = payload["machine"]
    for key in ("utc_time", "cpu_count", "usable_cores", "torch_threads", "platform", "python", "git"):
        assert machine[key] is not None, key
    assert machine["torch_threads"] == 1 and payload["settings"]["threads"] == 1
    assert {"torch", "transformers", "sentence-transformers"} <= set(machine["versions"])
    assert payload["settings"]["quick"] is True
    rows = payload["summary"]["rows"]
    assert rows and all(set(r) == {"metric", "value", "goal", "met"} for r in rows)


def test_train_throughput(quick_results):
    payload = quick_results[1]["train_throughput"]
    for case in ("plain", "gradcache"):
        measured = payload["raw"][case]
        for contender in ("kalm", "st"):
            runs = measured["raw"][contender]
            assert len(runs) == payload["settings"]["repeats"]
            for run in runs:
                assert _positive(run["pairs_per_s"]) and _positive(run["real_tokens_per_s"])
                assert run["step_seconds"] and all(map(_positive, run["step_seconds"]))
        assert _positive(measured["ratio_kalm_over_st"])
        assert 0 <= measured["kalm_padding_share"] < 1
    assert [r["goal"] for r in payload["summary"]["rows"]] == [">= 1.2", ">= 1.2"]


def test_encode_throughput(quick_results):
    summary = quick_results[1]["encode_throughput"]["summary"]
    assert _positive(summary["ratio_kalm_over_st"])
    assert all(_positive(summary["median"][c]["texts_per_s"]) for c in ("kalm", "st"))
    assert summary["max_abs_diff"] < 1e-4  # same model, length and pooling: same embeddings


def test_memory(quick_results):
    payload = quick_results[1]["memory"]
    raw, settings = payload["raw"], payload["settings"]
    # CPU: tensor readings with and without GradCache, RSS with glibc's default and the live threshold.
    assert set(raw) == {"gradcache_tensors", "gradcache_rss", "gradcache_rss_live", "plain_tensors", "plain_rss"}
    assert all(r["mmap_threshold"] == 131072 for r in raw["gradcache_rss_live"])
    for mode, rows in raw.items():
        assert [r["batch_size"] for r in rows] == settings["batch_sizes"]
        for row in rows:
            assert "error" not in row, row.get("error")
            assert _positive(row["delta_mib"]) and _positive(row["step_seconds"])
            if row["reading"] == "rss":
                assert row["peak_mib"] >= row["baseline_mib"]
                assert len(row["readings"]) == (settings["rss_repeats"] if mode.startswith("gradcache") else 1)
                assert row["delta_mib"] == sorted(r["delta_mib"] for r in row["readings"])[len(row["readings"]) // 2]
            else:
                assert 0 < row["before_optimizer_mib"] <= row["delta_mib"]
        assert _positive(payload["summary"]["ratios"][mode]["delta_mib"])
    assert [row["goal"] for row in payload["summary"]["rows"]] == ["<= 1.2"] * 4 + [None] * 3
    slowdown = payload["summary"]["live_step_seconds_over_default"]
    assert len(slowdown) == len(settings["batch_sizes"]) and all(map(_positive, slowdown))


def test_profiled_peaks_follow_allocations_and_frees():
    """The CPU tensor reading: running peak of the profiler's allocation events, split at the optimizer step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.memory import profiled_peaks

    mib = 2**20
    param = torch.nn.Parameter(torch.zeros(1))
    param.grad = torch.zeros(1)
    optimizer = torch.optim.SGD([param], lr=0.1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)  # 3 MiB held: the peak before the optimizer
        del a
        c = torch.empty(mib // 2, dtype=torch.uint8)  # 2.5 MiB
        optimizer.step()
        d = torch.empty(4 * mib, dtype=torch.uint8)  # 6.5 MiB: the step's peak
        del b, c, d
    peaks = profiled_peaks(prof)
    assert abs(peaks.before_optimizer - 3 * mib) < 64 * 1024
    assert abs(peaks.step - 6.5 * mib) < 64 * 1024


def test_mining_scale(tmp_path):
    """Not part of run_all (the full grid takes about 30 minutes on one core): its own --quick run."""
    from benchmarks.mining_scale import QUICK_SIZES, main

    payload = main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    assert json.loads((tmp_path / "mining_scale.json").read_text()) == payload
    assert set(payload) == {"benchmark", "machine", "settings", "raw", "summary"}
    assert payload["settings"]["quick"] is True and payload["machine"]["torch_threads"] == 1
    points = payload["raw"]["points"]
    assert [f"{p['rows']}x{p['pool']}" for p in points] == list(QUICK_SIZES) and payload["summary"]["failed"] == []
    for point in points:
        assert point["stage"] == "mining" and _positive(point["seconds"])
        assert point["peak_rss_mib"] >= point["baseline_mib"] > point["embeddings_mib"] > 0
    growth, rate = payload["summary"]["rows"]
    # 16x the pool at 600 rows, blocks of 1024: no growth (the full 600 x 65,536 score matrix alone is 150 MiB)
    assert growth["goal"] == "<= 64" and growth["met"] is True
    assert _positive(rate["value"])


def test_mfu(quick_results):
    summary = quick_results[1]["mfu"]["summary"]
    for key in ("peak_flops_per_s", "counted_flops_per_s", "six_n_flops_per_s", "mfu_counted", "mfu_six_n"):
        assert _positive(summary[key]), key
    assert all(map(_positive, summary["step_flops"]))
    # Counted FLOP (padding and attention included) are close to or above the 6 N rule on real tokens.
    assert sum(summary["step_flops"]) >= 0.9 * 6 * summary["non_embedding_params"] * sum(summary["step_real_tokens"])
    # kalm_lib.capacity's formula on the step's padded chunks counts every backbone matmul; only the
    # loss's (queries x candidates, < 0.01% here) is left out.
    assert 0.999 < summary["formula_over_counted"] <= 1.0


def test_scaling(quick_results):
    summary = quick_results[1]["scaling"]["summary"]
    assert set(summary["exponents"]) == {"max_length", "batch_size"}
    assert all(math.isfinite(v) for v in summary["exponents"].values())
    assert all(map(_positive, summary["median_step_s"].values()))
    assert set(summary["padding_share"].values()) == {0.0}  # every text exactly max_length tokens


def test_run_all_summary(quick_results):
    from benchmarks.run_all import summarise

    out, _ = quick_results
    summary = summarise(out)
    assert {r["benchmark"] for r in summary["rows"]} == set(BENCHMARKS)
    table = (out / "summary.md").read_text()
    assert table.startswith("| benchmark | metric | value | goal | met |")
    assert json.loads((out / "summary.json").read_text()) == summary
    assert "; commit " in table  # one run: one commit


def test_run_all_summary_names_each_commit_after_a_partial_rerun(quick_results, tmp_path):
    from benchmarks.run_all import summarise

    out, payloads = quick_results
    for name, payload in payloads.items():
        if name == "memory":
            payload = {**payload, "machine": {**payload["machine"], "git": {"commit": "f" * 40, "dirty": False}}}
        (tmp_path / f"{name}.json").write_text(json.dumps(payload))
    summary = summarise(tmp_path)
    table = (tmp_path / "summary.md").read_text()
    assert "commits: " in table and "memory ffffffffff" in table
    assert summary["benchmarks"]["memory"]["git"]["commit"] == "f" * 40


def test_repeats_default_quick_and_explicit():
    from benchmarks.common import parser, rounds

    p = parser("demo", repeats=5)
    assert [rounds(p.parse_args(argv)) for argv in ([], ["--quick"], ["--repeats", "2"])] == [5, 1, 2]


def test_data_scale_quick(tmp_path):
    """Its own --quick run (curation only, no model): every point in a fresh process, the documented fields."""
    from benchmarks import data_scale

    payload = data_scale.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    assert json.loads((tmp_path / "data_scale.json").read_text()) == payload
    assert set(payload) == {"benchmark", "machine", "settings", "raw", "summary"} and payload["settings"]["quick"] is True
    summary = payload["summary"]
    points = summary["points"]
    assert [p["rows"] for p in points] == payload["settings"]["sizes"] == sorted(data_scale.QUICK_SIZES)
    for point in points:
        assert point["stage"] == "curation" and point["pool"] is None
        assert _positive(point["seconds"]) and _positive(point["cpu_seconds"]) and point["peak_rss_mib"] >= point["baseline_rss_mib"] > 0
        counts = point["counts"]
        assert counts["built"] == point["rows"] > counts["after_near_dedup_of_pool"] == counts["kept"] > 0.9 * point["rows"]
        assert counts["eval_near_duplicates"] > 0 and counts["after_decontamination"] <= counts["built"]
    assert sum(p["counts"]["built"] - p["counts"]["after_decontamination"] for p in points) > 0  # exact copies of eval texts
    assert summary["rss_ratio"] == points[-1]["peak_rss_mib"] / points[0]["peak_rss_mib"] and summary["complete"] is True
    assert [r["goal"] for r in summary["rows"]] == ["<= 1.5", "<= 1.5"]


def test_data_scale_judges_its_goals_only_with_every_size_measured():
    """A run cut short (1e7 asked for, not measured) keeps its ratios but claims no goal."""
    from benchmarks.data_scale import summarise

    def point(rows: int, peak: float) -> dict:
        return {"rows": rows, "seconds": rows / 1e3, "cpu_seconds": rows / 1e3, "peak_rss_mib": peak, "baseline_rss_mib": 300.0}

    sizes = [100_000, 1_000_000, 10_000_000]
    partial = summarise([point(100_000, 500.0), point(1_000_000, 550.0)], sizes)
    assert partial["rss_ratio"] == 1.1 and partial["complete"] is False
    assert partial["rss_ratio_goal_met"] is None and partial["seconds_linear_goal_met"] is None
    assert [row["met"] for row in partial["rows"]] == [None, None]
    whole = summarise([point(100_000, 500.0), point(1_000_000, 550.0), point(10_000_000, 1_000.0)], sizes)
    assert whole["rss_ratio"] == 2.0 and whole["rss_ratio_goal_met"] is False and whole["seconds_linear_goal_met"] is True
    assert [row["met"] for row in whole["rows"]] == [False, True]


def test_shard_reads(tmp_path):
    """Not part of run_all (a measurement of the streamed path): its own --quick run; both readers
    return the asked rows in the asked order at every size (the child checks each batch and fails)."""
    from benchmarks.shard_reads import QUICK_SIZES, READERS, main

    payload = main(["--quick", "--out", str(tmp_path), "--batches", "2"])
    assert json.loads((tmp_path / "shard_reads.json").read_text()) == payload
    points = payload["raw"]["points"]
    assert payload["summary"]["failed"] == []
    assert [(p["reader"], p["rows"]) for p in points] == [(r, n) for n in QUICK_SIZES for r in READERS]
    for point in points:
        assert point["batch"] == 512 and len(point["seconds"]) == 2 and all(map(_positive, point["seconds"]))
        assert _positive(point["shards_disk_mib"]) and (point["arrow_copy_disk_mib"] is None) == (point["reader"] == "row_groups")
    speedup, growth = payload["summary"]["rows"]
    assert _positive(speedup["value"]) and growth["goal"] == "<= 64"
