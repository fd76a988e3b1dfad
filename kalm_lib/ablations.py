"""Ablation grid: run recipe variants through the notebook series and compare them across seeds.

A grid YAML names a base profile and variants as dotted overrides::

    profile: cpu
    reference: full_recipe
    variants:
      full_recipe: {}
      no_focal: {finetune.focal_gamma: 0.0}

Optional top-level ``overrides`` apply to every run of the grid (e.g. ``{threads: 1}`` to run two
grid processes side by side on two cores); a variant's own overrides win over them.
Each variant is a real papermill run of the series. A variant that changes nothing upstream of
stage 2 (no ``data.*``, ``model.*`` or ``pretrain.*`` key) reuses the reference run's curated data
and stage-1 checkpoint, so the comparison isolates the stage-2 trick and costs only stage 2.
Seeds are the profile's ``finetune.seeds``: every variant trains the same seeds, so deltas are paired.
Optional ``replicates`` run (some of) the variants again under extra overrides, e.g. a second
curation seed (``data.sample_seed``); each replicate has its own reference run, deltas pair a
variant with the reference of the same replicate and seed, and their intervals then include the
replicate-to-replicate (curation) variance.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from .config import ConfigError, load_profile
from .layout import (
    NOTEBOOKS_DIR,
    REPO_ROOT,
    STAGE2_PREFIX,
    GridLayout,
    RunLayout,
    incomplete_run,
    is_soup_label,
    stage2_seed,
)
from .manifest import git_state, machine_info, package_versions
from .outputs import write_output
from .runner import REPORT_NOTEBOOK, execute, render_report, run_series

UPSTREAM_SECTIONS = ("data.", "model.", "pretrain.", "seed")


REPLICATE_MARK = "@"


@dataclass(frozen=True)
class Replicate:
    """Overrides (e.g. another curation seed) under which some variants of a grid run again."""

    overrides: dict[str, Any]
    variants: list[str]


@dataclass(frozen=True)
class Grid:
    """A parsed ablation grid."""

    profile: str
    reference: str
    variants: dict[str, dict[str, Any]]
    replicates: dict[str, Replicate] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # applied to every run first


@dataclass(frozen=True)
class PlannedRun:
    """One run of a grid: its folder name, variant, replicate ("" for none), the overrides it runs
    with and the run whose curation and stage 1 it hard-links (None: its own series)."""

    name: str
    variant: str
    replicate: str
    overrides: dict[str, Any]
    reuse_from: str | None


def run_name(variant: str, replicate: str) -> str:
    """Folder name of ``variant`` in ``replicate``: ``variant`` or ``variant@replicate``."""
    return f"{variant}{REPLICATE_MARK}{replicate}" if replicate else variant


def load_grid(path: Path) -> Grid:
    """Read and validate a grid YAML (every run's overrides are checked against the profile)::

        profile: cpu
        overrides: {threads: 1}          # optional: applied to every run
        reference: full_recipe
        variants: {full_recipe: {}, gamma_0: {finetune.focal_gamma: 0.0}}
        replicates:                      # optional: the same variants again under other overrides
          curation_seed_2: {overrides: {data.sample_seed: 2}, variants: [full_recipe, gamma_0]}
    """
    if not path.is_file():
        raise ConfigError(f"grid file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(raw) - {"profile", "overrides", "reference", "variants", "replicates"})
    if unknown:
        raise ConfigError(f"{path}: unknown grid field(s) {unknown}")
    variants = {k: dict(v or {}) for k, v in (raw.get("variants") or {}).items()}
    reference = raw.get("reference", "")
    if reference not in variants:
        raise ConfigError(f"{path}: 'reference' must name one of the variants {sorted(variants)}")
    replicates = {name: _replicate(path, name, entry, variants, reference) for name, entry in (raw.get("replicates") or {}).items()}
    shared = raw.get("overrides") or {}
    if not isinstance(shared, dict):
        raise ConfigError(f"{path}: 'overrides' must be a mapping of dotted keys to values, got {shared!r}")
    grid = Grid(raw.get("profile", "cpu"), reference, variants, replicates, dict(shared))
    for run in plan_runs(grid):
        if REPLICATE_MARK in run.variant:
            raise ConfigError(f"{path}: variant name {run.variant!r} must not contain {REPLICATE_MARK!r}")
        load_profile(grid.profile, run.overrides)
    return grid


def _replicate(path: Path, name: str, entry: Any, variants: dict[str, dict[str, Any]], reference: str) -> Replicate:
    """One validated ``replicates`` entry (its variants default to all; the reference must be one)."""
    if REPLICATE_MARK in name or not isinstance(entry, dict) or set(entry) - {"overrides", "variants"}:
        raise ConfigError(f"{path}: replicates.{name} must be a mapping with 'overrides' and optional 'variants'")
    members = list(entry.get("variants") or variants)
    if reference not in members or set(members) - set(variants):
        raise ConfigError(f"{path}: replicates.{name}.variants must include {reference!r} and name only variants {sorted(variants)}")
    return Replicate(dict(entry.get("overrides") or {}), members)


def plan_runs(grid: Grid) -> list[PlannedRun]:
    """Every run of the grid in order: the reference, then the variants; then each replicate's
    reference and variants. A run's overrides are the grid's, then its replicate's, then its
    variant's (later ones win). A variant that changes nothing upstream of stage 2 reuses the
    reference of its own replicate."""
    runs = []
    groups = [("", {}, list(grid.variants))]
    groups += [(name, rep.overrides, rep.variants) for name, rep in grid.replicates.items()]
    for replicate, extra, members in groups:
        for variant in [grid.reference, *(v for v in members if v != grid.reference)]:
            own = variant == grid.reference or needs_own_upstream(grid.variants[variant])
            runs.append(PlannedRun(run_name(variant, replicate), variant, replicate,
                                   {**grid.overrides, **extra, **grid.variants[variant]},
                                   None if own else run_name(grid.reference, replicate)))
    return runs


def needs_own_upstream(overrides: dict[str, Any]) -> bool:
    """True when a variant changes curation, the model or stage 1."""
    return any(key.startswith(UPSTREAM_SECTIONS) for key in overrides)


def variant_eval_overrides(reused: bool) -> dict[str, Any]:
    """Variants skip the quantised scores, and base/stage 1 when those are reused; they keep the
    Matryoshka-truncated scores (the Matryoshka-loss ablation is read from them)."""
    return {"evaluation.quantizations": [], "evaluation.skip_upstream_models": reused}


def select_runs(grid: Grid, only: list[str] | None, done: set[str]) -> list[PlannedRun]:
    """The runs to execute now: every planned run not in ``done`` (plan order), or, with ``only``,
    those named there in that order (e.g. a second curation seed before the other variants when
    time is short). A run whose upstream run is neither done nor earlier in the list is refused."""
    planned = {run.name: run for run in plan_runs(grid)}
    if only is None:
        return [run for run in planned.values() if run.name not in done]
    unknown = [name for name in only if name not in planned]
    if unknown:
        raise ConfigError(f"--only names unknown run(s) {unknown}; the grid plans {list(planned)}")
    selected, ready = [], set(done)
    for name in dict.fromkeys(only):
        run = planned[name]
        if run.reuse_from and run.reuse_from not in ready:
            raise ConfigError(f"--only: {name!r} reuses {run.reuse_from!r}, which is neither done nor listed before it")
        ready.add(name)
        if name not in done:
            selected.append(run)
    return selected


def run_grid(grid: Grid, runs_dir: Path, name: str, report_only: bool = False, only: list[str] | None = None) -> Path:
    """Run the planned runs (:func:`plan_runs`) not yet in ``runs_dir/name`` (with ``only``: those
    named, in that order; :func:`select_runs`), then the grid report; return the grid folder.
    ``report_only`` renders the report from the runs already there (the manifest lists which and
    which are missing), e.g. for a grid stopped part of the way."""
    layout = GridLayout(runs_dir / name)
    layout.root.mkdir(parents=True, exist_ok=True)
    if not layout.variant(grid.reference).root.exists() and report_only:
        raise FileNotFoundError(f"{layout.root}: the reference run {grid.reference!r} is not there yet")
    done = {run.name for run in plan_runs(grid) if layout.variant(run.name).root.exists()}
    for run in [] if report_only else select_runs(grid, only, done):
        reuse = layout.variant(run.reuse_from).root if run.reuse_from else None
        overrides = run.overrides if run.name == grid.reference else {**run.overrides, **variant_eval_overrides(reuse is not None)}
        interrupted = RunLayout(incomplete_run(layout.root, run.name)).series_progress.is_file()  # started: resume it
        run_series(grid.profile, layout.root, run.name, overrides, reuse_from=reuse, resume=interrupted)
    reference = layout.variant(grid.reference).root
    parameters = {"profile": grid.profile, "run_dir": str(reference.resolve()),
                  "overrides": {**grid.overrides, **grid.variants[grid.reference]},
                  "grid_dir": str(layout.root.resolve()), "grid_reference": grid.reference}
    seconds = execute(NOTEBOOKS_DIR / REPORT_NOTEBOOK, layout.report_notebook, parameters)
    render_report(layout.report_notebook, layout.report_html)
    manifest = {
        "grid": {"profile": grid.profile, "overrides": grid.overrides, "reference": grid.reference, "variants": grid.variants,
                 "replicates": {k: dataclasses.asdict(v) for k, v in grid.replicates.items()}},
        "runs": {run.name: str(layout.variant(run.name).manifest.relative_to(layout.root))
                 for run in plan_runs(grid) if layout.variant(run.name).manifest.is_file()},
        "missing_runs": [run.name for run in plan_runs(grid) if not layout.variant(run.name).manifest.is_file()],
        "git": git_state(REPO_ROOT), "packages": package_versions(), "machine": machine_info(),
        "report_seconds": seconds, "finished_utc": datetime.now(UTC).isoformat(),
    }
    write_output(manifest, layout.manifest)
    return layout.root


def run_scores(run_dir: Path, name: str) -> pd.DataFrame:
    """Main scores of one run: columns variant, replicate ("" for none), model, seed (stage-2 seed
    or <NA>), task, score; ``name`` is the run's grid name (``variant`` or ``variant@replicate``)."""
    variant, _, replicate = name.partition(REPLICATE_MARK)
    scores = pd.read_csv(RunLayout(run_dir).mteb_scores)
    table = scores[scores["is_main"]][["stage", "task", "score"]].rename(columns={"stage": "model"})
    table = table.assign(variant=variant, replicate=replicate)
    table["seed"] = pd.array([stage2_seed(model) for model in table["model"]], dtype="Int64")
    return table.reset_index(drop=True)


def test_set_digest(run: RunLayout) -> str | None:
    """SHA-256 over the names and bytes of a run's test payloads (None when it has none)."""
    files = sorted(run.eval_payloads("test").glob("*.json"))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def collect(grid_dir: Path) -> pd.DataFrame:
    """Main scores of every variant run under ``grid_dir``. Runs evaluated on different test sets
    (e.g. built at commits with different data rules) cannot be paired: a ``ValueError`` names them."""
    runs = GridLayout(grid_dir).variant_runs()
    if not runs:
        raise FileNotFoundError(f"no runs with evaluation scores under {grid_dir}")
    digests = {run.root.name: digest for run in runs if (digest := test_set_digest(run)) is not None}
    if len(set(digests.values())) > 1:
        groups: dict[str, list[str]] = {}
        for name, digest in digests.items():
            groups.setdefault(digest[:12], []).append(name)
        raise ValueError(f"{grid_dir}: runs were evaluated on different test sets, so they cannot be paired: {groups}")
    return pd.concat([run_scores(run.root, run.root.name) for run in runs], ignore_index=True)


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t confidence interval (nan half-width for n < 2; both
    nan for no values)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    if len(values) < 2:
        return float(values.mean()), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(half)


def _singles(table: pd.DataFrame) -> pd.DataFrame:
    """Single stage-2 checkpoints (columns variant, replicate, seed, task, score), plus their task
    average as task ``average``."""
    singles = table.dropna(subset=["seed"])
    keys = ["variant", "replicate", "seed"]
    averaged = singles.groupby(keys)["score"].mean().reset_index().assign(task="average")
    return pd.concat([singles[[*keys, "task", "score"]], averaged], ignore_index=True)


def seed_deltas(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Per variant and task: mean single-checkpoint score and its paired delta vs the reference.

    A variant's checkpoint is paired with the reference checkpoint of the same replicate (e.g.
    curation seed) and stage-2 seed. With one replicate the interval is the t interval of the
    per-seed differences (``units`` = seeds). With several, the seeds of one replicate share its
    curation and stage 1, so they are not independent: each replicate's differences are averaged
    first and the interval is the t interval of those means (``units`` = replicates, R - 1 degrees
    of freedom), which carries the curation-to-curation variance.
    """
    singles = _singles(table)
    base = singles[singles["variant"] == reference].set_index(["task", "replicate", "seed"])["score"]
    rows = []
    for (variant, task), group in singles.groupby(["variant", "task"]):
        keys = pd.MultiIndex.from_arrays([[task] * len(group), group["replicate"], group["seed"]])
        paired = pd.Series(group["score"].to_numpy() - base.reindex(keys).to_numpy(), index=group["replicate"].to_numpy()).dropna()
        units = paired.groupby(level=0).mean() if paired.index.nunique() > 1 else paired
        mean, half = mean_ci(group["score"].to_numpy())
        delta, delta_half = mean_ci(units.to_numpy())
        rows.append({"variant": variant, "task": task, "units": len(units), "replicates": paired.index.nunique(),
                     "score": mean, "ci95": half, "delta_vs_reference": delta, "delta_ci95": delta_half})
    return pd.DataFrame(rows)


def per_replicate_deltas(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """:func:`seed_deltas` within each replicate alone (column ``replicate``; "" for the grid's
    own runs): a variant against the reference of the same curation, t interval over its stage-2
    seeds. These intervals leave out the curation-to-curation variance that :func:`seed_deltas`
    carries across replicates; they show whether an effect points the same way in each curation."""
    parts = [seed_deltas(group, reference).assign(replicate=replicate)
             for replicate, group in table.groupby("replicate", sort=True) if (group["variant"] == reference).any()]
    columns = ["replicate", "variant", "task", "units", "replicates", "score", "ci95", "delta_vs_reference", "delta_ci95"]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


def replicate_deltas(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Per replicate and task: the reference recipe under the replicate's overrides against the
    reference itself, paired by stage-2 seed (how much e.g. another curation seed moves a score)."""
    singles = _singles(table)
    ref = singles[singles["variant"] == reference]
    base = ref[ref["replicate"] == ""].set_index(["task", "seed"])["score"]
    rows = []
    for (replicate, task), group in ref[ref["replicate"] != ""].groupby(["replicate", "task"]):
        keys = pd.MultiIndex.from_arrays([[task] * len(group), group["seed"]])
        paired = group["score"].to_numpy() - base.reindex(keys).to_numpy()
        delta, half = mean_ci(paired[~np.isnan(paired)])
        rows.append({"replicate": replicate, "task": task, "units": int((~np.isnan(paired)).sum()),
                     "delta_vs_reference": delta, "delta_ci95": half})
    return pd.DataFrame(rows, columns=["replicate", "task", "units", "delta_vs_reference", "delta_ci95"])


def truncated_singles(table: pd.DataFrame) -> pd.DataFrame:
    """Single stage-2 checkpoints scored at a Matryoshka dim (models ``stage2_seedN@dimD``), as
    :func:`collect` rows of the full-dim checkpoint ``stage2_seedN`` (seed N) plus a column
    ``dim`` = D; :func:`seed_deltas` of the rows of one dim pairs them like full-dim scores."""
    parts = table["model"].str.extract(rf"^(?P<single>{STAGE2_PREFIX}(?P<seed>\d+))@dim(?P<dim>\d+)$")
    rows = table[parts["single"].notna()].assign(model=parts["single"].dropna(), dim=parts["dim"].dropna().astype(int))
    return rows.assign(seed=pd.array(parts["seed"].dropna().astype(int), dtype="Int64")).reset_index(drop=True)


def soup_vs_best_single(table: pd.DataFrame) -> pd.DataFrame:
    """Per variant, replicate and task: each soup's score against the best single stage-2 checkpoint."""
    rows = []
    for (variant, replicate, task), group in table.groupby(["variant", "replicate", "task"]):
        singles = group[group["seed"].notna()]["score"]
        for _, soup in group[group["model"].map(is_soup_label)].iterrows():
            rows.append({"variant": variant, "replicate": replicate, "task": task, "soup": soup["model"], "soup_score": soup["score"],
                         "best_single": singles.max(), "mean_single": singles.mean(),
                         "soup_minus_best": soup["score"] - singles.max()})
    return pd.DataFrame(rows)
