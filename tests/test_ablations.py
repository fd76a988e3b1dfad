"""Ablation grid: parsing, result collection and the paired statistics, checked by hand."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kalm_lib.ablations import (
    collect,
    load_grid,
    mean_ci,
    needs_own_upstream,
    per_replicate_deltas,
    plan_runs,
    replicate_deltas,
    seed_deltas,
    select_runs,
    soup_vs_best_single,
)
from kalm_lib.config import ConfigError
from kalm_lib.findings import cells_markdown
from kalm_lib.layout import GRIDS_DIR, RunLayout
from kalm_lib.outputs import write_output
from kalm_lib.report import per_curation_table, plot_deltas


def test_shipped_grids_validate():
    grid = load_grid(GRIDS_DIR / "cpu-findings.yaml")
    assert grid.reference == "full_recipe" and grid.variants["full_recipe"] == {}
    assert {"gamma_0", "gamma_1", "gamma_2", "no_mixing", "no_matryoshka", "no_stage1", "last_token_pooling"} <= set(grid.variants)
    assert grid.replicates["curation_seed_2"].overrides == {"data.sample_seed": 2}
    assert grid.overrides == {"threads": 1}  # two grid processes side by side on the 2 cores
    assert "causal_attention" in load_grid(GRIDS_DIR / "gpu-ablations.yaml").variants
    for path in sorted((GRIDS_DIR).glob("*.yaml")):  # every override names a real field
        shipped = load_grid(path)
        assert shipped.variants[shipped.reference] == {}, path.name


def test_bad_grids_are_rejected(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("profile: tiny\nreference: full\nvariants: {full: {}, bad: {finetune.gama: 1}}\n")
    with pytest.raises(ConfigError, match="gama"):
        load_grid(path)
    path.write_text("profile: tiny\nreference: missing\nvariants: {full: {}}\n")
    with pytest.raises(ConfigError, match="'reference'"):
        load_grid(path)
    with pytest.raises(ConfigError, match="grid file not found"):
        load_grid(tmp_path / "nope.yaml")


def test_upstream_detection():
    assert not needs_own_upstream({"finetune.focal_gamma": 0.0})
    assert needs_own_upstream({"pretrain.enabled": False})
    assert needs_own_upstream({"model.pooling": "last"})


def test_mean_ci_matches_hand_computation():
    mean, half = mean_ci(np.array([1.0, 2.0, 3.0]))
    # sd = 1, n = 3, t(0.975, 2) = 4.302653
    assert mean == 2.0 and half == pytest.approx(4.302653 / np.sqrt(3), rel=1e-6)
    assert np.isnan(mean_ci(np.array([5.0]))[1])


def write_scores(run: Path, rows):
    frame = pd.DataFrame(rows, columns=["stage", "task", "score"]).assign(is_main=True, metric="m")
    write_output(frame, RunLayout(run).mteb_scores)


@pytest.fixture
def grid_dir(tmp_path):
    write_scores(tmp_path / "full", [
        ("stage2_seed0", "A", 0.50), ("stage2_seed1", "A", 0.60), ("soup_uniform", "A", 0.62), ("base", "A", 0.1),
        ("stage2_seed0", "B", 0.30), ("stage2_seed1", "B", 0.40), ("soup_uniform", "B", 0.35),
    ])
    write_scores(tmp_path / "ablated", [
        ("stage2_seed0", "A", 0.45), ("stage2_seed1", "A", 0.50), ("soup_uniform", "A", 0.49),
        ("stage2_seed0", "B", 0.30), ("stage2_seed1", "B", 0.30), ("soup_uniform", "B", 0.31),
    ])
    return tmp_path


def test_collect_reads_every_variant(grid_dir):
    write_scores(grid_dir / ".incomplete-running", [("stage2_seed0", "A", 0.9)])  # not finished: left out
    table = collect(grid_dir)
    assert set(table["variant"]) == {"full", "ablated"}
    assert table.loc[table["model"] == "stage2_seed1", "seed"].unique().tolist() == [1]
    assert table.loc[table["model"] == "base", "seed"].isna().all()


def test_seed_deltas_are_paired(grid_dir):
    deltas = seed_deltas(collect(grid_dir), "full").set_index(["variant", "task"])
    row = deltas.loc[("ablated", "A")]
    assert row["score"] == pytest.approx(0.475)
    assert row["delta_vs_reference"] == pytest.approx(-0.075)  # paired diffs -0.05, -0.10
    assert row["delta_ci95"] == pytest.approx(12.706205 * 0.0353553 / np.sqrt(2), rel=1e-4)
    avg = deltas.loc[("ablated", "average")]
    assert avg["delta_vs_reference"] == pytest.approx(((0.375 - 0.40) + (0.40 - 0.50)) / 2)
    assert deltas.loc[("full", "B"), "delta_vs_reference"] == 0.0


def test_soup_vs_best_single(grid_dir):
    soups = soup_vs_best_single(collect(grid_dir)).set_index(["variant", "task"])
    assert soups.loc[("full", "A"), "soup_minus_best"] == pytest.approx(0.02)
    assert soups.loc[("full", "B"), "soup_minus_best"] == pytest.approx(-0.05)


def test_collect_without_runs_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="no runs"):
        collect(tmp_path)


# --- replicates (e.g. a second curation seed) --------------------------------------------------

def write_grid(tmp_path, text: str):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return load_grid(path)


def test_replicates_plan_their_own_reference_and_reuse_it(tmp_path):
    grid = write_grid(tmp_path, "profile: tiny\nreference: full\nvariants: {full: {}, g0: {finetune.focal_gamma: 0.0}, "
                                "nos1: {pretrain.enabled: false}}\n"
                                "replicates: {cs2: {overrides: {data.sample_seed: 2}, variants: [full, g0]}}\n")
    plan = [(r.name, r.reuse_from, r.overrides) for r in plan_runs(grid)]
    assert plan == [
        ("full", None, {}), ("g0", "full", {"finetune.focal_gamma": 0.0}), ("nos1", None, {"pretrain.enabled": False}),
        ("full@cs2", None, {"data.sample_seed": 2}), ("g0@cs2", "full@cs2", {"data.sample_seed": 2, "finetune.focal_gamma": 0.0}),
    ]


def test_grid_overrides_apply_to_every_run_and_variants_win(tmp_path):
    grid = write_grid(tmp_path, "profile: tiny\noverrides: {threads: 1, finetune.focal_gamma: 1.0}\nreference: full\n"
                                "variants: {full: {}, g0: {finetune.focal_gamma: 0.0}}\n"
                                "replicates: {cs2: {overrides: {data.sample_seed: 2}, variants: [full]}}\n")
    plan = {r.name: (r.reuse_from, r.overrides) for r in plan_runs(grid)}
    assert plan == {
        "full": (None, {"threads": 1, "finetune.focal_gamma": 1.0}),
        "g0": ("full", {"threads": 1, "finetune.focal_gamma": 0.0}),
        "full@cs2": (None, {"threads": 1, "finetune.focal_gamma": 1.0, "data.sample_seed": 2}),
    }
    with pytest.raises(ConfigError, match="'overrides' must be a mapping"):
        write_grid(tmp_path, "profile: tiny\noverrides: [threads]\nreference: full\nvariants: {full: {}}\n")
    with pytest.raises(ConfigError, match="thread"):
        write_grid(tmp_path, "profile: tiny\noverrides: {thread: 1}\nreference: full\nvariants: {full: {}}\n")


def test_only_runs_the_named_runs_in_order_after_their_upstream(tmp_path):
    grid = write_grid(tmp_path, "profile: tiny\nreference: full\nvariants: {full: {}, g0: {finetune.focal_gamma: 0.0}, "
                                "nos1: {pretrain.enabled: false}}\n"
                                "replicates: {cs2: {overrides: {data.sample_seed: 2}, variants: [full, g0]}}\n")
    assert [r.name for r in select_runs(grid, None, {"full"})] == ["g0", "nos1", "full@cs2", "g0@cs2"]
    assert [r.name for r in select_runs(grid, ["full", "full@cs2", "g0@cs2", "g0"], set())] == ["full", "full@cs2", "g0@cs2", "g0"]
    assert [r.name for r in select_runs(grid, ["full", "g0"], {"full"})] == ["g0"]
    with pytest.raises(ConfigError, match="reuses 'full@cs2'"):
        select_runs(grid, ["g0@cs2", "full@cs2"], {"full"})
    with pytest.raises(ConfigError, match="unknown run"):
        select_runs(grid, ["full", "nope"], set())


@pytest.mark.parametrize("replicates", [
    "{cs2: {overrides: {data.sample_seed: 2}, variants: [g0]}}",      # without the reference
    "{cs2: {overrides: {data.sample_seed: 2}, variants: [nope]}}",    # unknown variant
    "{cs2: {overrides: {data.sample_sed: 2}}}",                       # unknown parameter
    "{cs2: {data.sample_seed: 2}}",                                   # not {overrides, variants}
])
def test_bad_replicates_are_rejected(tmp_path, replicates):
    with pytest.raises(ConfigError):
        write_grid(tmp_path, f"profile: tiny\nreference: full\nvariants: {{full: {{}}, g0: {{}}}}\nreplicates: {replicates}\n")


def test_deltas_pair_within_replicates_and_replicates_against_the_reference(tmp_path):
    rows = {
        "full": [("stage2_seed0", "A", 0.50), ("stage2_seed1", "A", 0.60)],
        "g0": [("stage2_seed0", "A", 0.48), ("stage2_seed1", "A", 0.59)],
        "full@cs2": [("stage2_seed0", "A", 0.40), ("stage2_seed1", "A", 0.70)],
        "g0@cs2": [("stage2_seed0", "A", 0.36), ("stage2_seed1", "A", 0.70)],
    }
    for name, scores in rows.items():
        write_scores(tmp_path / name, scores)
    table = collect(tmp_path)
    assert set(zip(table["variant"], table["replicate"])) == {("full", ""), ("g0", ""), ("full", "cs2"), ("g0", "cs2")}
    deltas = seed_deltas(table, "full").set_index(["variant", "task"])
    # g0 - full within each (replicate, seed): -0.02, -0.01 | -0.04, 0.00 -> replicate means -0.015, -0.02;
    # the interval is over the replicate means (seeds of one curation are not independent).
    expected_mean, expected_half = mean_ci(np.array([-0.015, -0.02]))
    assert deltas.loc[("g0", "A"), "units"] == 2 and deltas.loc[("g0", "A"), "replicates"] == 2
    assert deltas.loc[("g0", "A"), "delta_vs_reference"] == pytest.approx(expected_mean)
    assert deltas.loc[("g0", "A"), "delta_ci95"] == pytest.approx(expected_half)
    within = per_replicate_deltas(table, "full").set_index(["replicate", "variant", "task"])
    for replicate, differences in (("", [-0.02, -0.01]), ("cs2", [-0.04, 0.00])):  # seed-paired, one curation each
        mean, half = mean_ci(np.array(differences))
        assert within.loc[(replicate, "g0", "A"), ["delta_vs_reference", "delta_ci95"]].tolist() == pytest.approx([mean, half])
        assert within.loc[(replicate, "g0", "A"), "units"] == 2 and within.loc[(replicate, "g0", "A"), "replicates"] == 1
    text = per_curation_table(per_replicate_deltas(table, "full"), "full")
    assert text.loc[("g0", "cs2"), "A"] == "-0.0200 [-0.2741, +0.2341]" and list(text.index) == [("g0", "base"), ("g0", "cs2")]
    # base: -0.02, -0.01 -> -0.015 +- 12.706 * 0.00707 / sqrt(2) = 0.0635; one task, so the average is the same
    assert cells_markdown(text).splitlines() == [
        "| variant | curation | A | average |", "| --- | --- | --- | --- |",
        "| g0 | base | -0.0150 [-0.0785, +0.0485] | -0.0150 [-0.0785, +0.0485] |",
        "| g0 | cs2 | -0.0200 [-0.2741, +0.2341] | -0.0200 [-0.2741, +0.2341] |",
    ]
    assert per_replicate_deltas(table[table["variant"] != "full"], "full").empty  # no reference: nothing to pair, no error
    curation = replicate_deltas(table, "full").set_index(["replicate", "task"])
    assert curation.loc[("cs2", "A"), "delta_vs_reference"] == pytest.approx(0.0)  # (-0.10 + 0.10) / 2
    assert curation.loc[("cs2", "A"), "units"] == 2


def test_report_only_needs_the_reference_run(tmp_path):
    from kalm_lib.ablations import run_grid

    grid = write_grid(tmp_path, "profile: tiny\nreference: full\nvariants: {full: {}, g0: {finetune.focal_gamma: 0.0}}\n")
    with pytest.raises(FileNotFoundError, match="reference run 'full' is not there yet"):
        run_grid(grid, tmp_path / "runs", "partial", report_only=True)


def test_grid_resumes_only_runs_that_started(tmp_path, monkeypatch):
    """A variant folder killed before its progress record is started again (run_series clears it),
    not resumed: resuming it would fail on the missing record and block the grid."""
    from kalm_lib import ablations
    from kalm_lib.layout import GridLayout, RunLayout, incomplete_run

    calls = []

    def record(*args, resume, **kwargs):
        calls.append((args[2], resume))
        if len(calls) == 2:
            raise InterruptedError  # stop before the grid report

    monkeypatch.setattr(ablations, "run_series", record)
    grid = load_grid(GRIDS_DIR / "cpu-findings.yaml")
    root = GridLayout(tmp_path / "g").root
    RunLayout(incomplete_run(root, "full_recipe")).notebooks.mkdir(parents=True)  # killed before its record
    RunLayout(incomplete_run(root, "no_mixing")).series_progress.parent.mkdir(parents=True)
    RunLayout(incomplete_run(root, "no_mixing")).series_progress.write_text("{}")  # started: resume it
    with pytest.raises(InterruptedError):
        ablations.run_grid(grid, tmp_path, "g", only=["full_recipe", "no_mixing"])
    assert calls == [("full_recipe", False), ("no_mixing", True)]


def test_runs_on_different_test_sets_are_not_paired(grid_dir):
    for name, queries in (("full", {"q0": "a text"}), ("ablated", {"q0": "another text"})):
        payloads = RunLayout(grid_dir / name).eval_payloads("test")
        payloads.mkdir(parents=True)
        (payloads / "definition_retrieval.json").write_text(json.dumps({"queries": queries}))
    with pytest.raises(ValueError, match="different test sets"):
        collect(grid_dir)
    same = json.dumps({"queries": {"q0": "a text"}})
    (RunLayout(grid_dir / "ablated").eval_payloads("test") / "definition_retrieval.json").write_text(same)
    assert set(collect(grid_dir)["variant"]) == {"full", "ablated"}


def test_deltas_plot_of_a_grid_with_only_its_reference_warns_nothing(recwarn):
    import matplotlib.pyplot as plt

    reference_only = pd.DataFrame({"variant": ["full"], "task": ["average"], "delta_vs_reference": [0.0], "delta_ci95": [0.0]})
    plt.close(plot_deltas(reference_only, "full"))
    assert not [str(w.message) for w in recwarn.list]
