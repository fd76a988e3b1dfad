"""Ablation grid: run recipe variants through the notebook series and compare them across seeds.

A grid YAML names a base profile and variants as dotted overrides::

    profile: cpu
    reference: full_recipe
    variants:
      full_recipe: {}
      no_focal: {finetune.focal_gamma: 0.0}

Each variant is a real papermill run of the series. A variant that changes nothing upstream of
stage 2 (no ``data.*``, ``model.*`` or ``pretrain.*`` key) reuses the reference run's curated data
and stage-1 checkpoint, so the comparison isolates the stage-2 trick and costs only stage 2.
Seeds are the profile's ``finetune.seeds``: every variant trains the same seeds, so deltas are paired.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from .config import ConfigError, load_profile
from .layout import NOTEBOOKS_DIR, REPO_ROOT, GridLayout, RunLayout, is_soup_label, stage2_seed
from .manifest import git_state, machine_info, package_versions
from .outputs import write_output
from .runner import REPORT_NOTEBOOK, execute, render_report, run_series

UPSTREAM_SECTIONS = ("data.", "model.", "pretrain.", "seed")


@dataclass(frozen=True)
class Grid:
    """A parsed ablation grid."""

    profile: str
    reference: str
    variants: dict[str, dict[str, Any]]


def load_grid(path: Path) -> Grid:
    """Read and validate a grid YAML (every variant's overrides are checked against the profile)."""
    if not path.is_file():
        raise ConfigError(f"grid file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(raw) - {"profile", "reference", "variants"})
    if unknown:
        raise ConfigError(f"{path}: unknown grid field(s) {unknown}")
    variants = raw.get("variants") or {}
    reference = raw.get("reference", "")
    if reference not in variants:
        raise ConfigError(f"{path}: 'reference' must name one of the variants {sorted(variants)}")
    for overrides in variants.values():
        load_profile(raw.get("profile", "cpu"), overrides or {})
    return Grid(raw.get("profile", "cpu"), reference, {k: dict(v or {}) for k, v in variants.items()})


def needs_own_upstream(overrides: dict[str, Any]) -> bool:
    """True when a variant changes curation, the model or stage 1."""
    return any(key.startswith(UPSTREAM_SECTIONS) for key in overrides)


def variant_eval_overrides(reused: bool) -> dict[str, Any]:
    """Variants skip the quantised scores, and base/stage 1 when those are reused; they keep the
    Matryoshka-truncated scores (the Matryoshka-loss ablation is read from them)."""
    return {"evaluation.quantizations": [], "evaluation.skip_upstream_models": reused}


def run_grid(grid: Grid, runs_dir: Path, name: str) -> Path:
    """Run every variant (reference first) into ``runs_dir/name/<variant>``; return the grid folder."""
    layout = GridLayout(runs_dir / name)
    layout.root.mkdir(parents=True, exist_ok=True)
    reference = layout.variant(grid.reference).root
    if not reference.exists():
        run_series(grid.profile, layout.root, grid.reference, grid.variants[grid.reference])
    for variant, overrides in grid.variants.items():
        if variant == grid.reference or layout.variant(variant).root.exists():
            continue
        reuse = None if needs_own_upstream(overrides) else reference
        run_series(grid.profile, layout.root, variant, {**overrides, **variant_eval_overrides(reuse is not None)}, reuse_from=reuse)
    parameters = {"profile": grid.profile, "run_dir": str(reference.resolve()), "overrides": grid.variants[grid.reference],
                  "grid_dir": str(layout.root.resolve()), "grid_reference": grid.reference}
    seconds = execute(NOTEBOOKS_DIR / REPORT_NOTEBOOK, layout.report_notebook, parameters)
    render_report(layout.report_notebook, layout.report_html)
    manifest = {
        "grid": {"profile": grid.profile, "reference": grid.reference, "variants": grid.variants},
        "runs": {variant: str(layout.variant(variant).manifest.relative_to(layout.root)) for variant in grid.variants},
        "git": git_state(REPO_ROOT), "packages": package_versions(), "machine": machine_info(),
        "report_seconds": seconds, "finished_utc": datetime.now(UTC).isoformat(),
    }
    write_output(manifest, layout.manifest)
    return layout.root


def run_scores(run_dir: Path, variant: str) -> pd.DataFrame:
    """Main scores of one run: columns variant, model, seed (stage-2 seed or <NA>), task, score."""
    scores = pd.read_csv(RunLayout(run_dir).mteb_scores)
    table = scores[scores["is_main"]][["stage", "task", "score"]].rename(columns={"stage": "model"}).assign(variant=variant)
    table["seed"] = pd.array([stage2_seed(model) for model in table["model"]], dtype="Int64")
    return table.reset_index(drop=True)


def collect(grid_dir: Path) -> pd.DataFrame:
    """Main scores of every variant run under ``grid_dir``."""
    runs = GridLayout(grid_dir).variant_runs()
    if not runs:
        raise FileNotFoundError(f"no runs with evaluation scores under {grid_dir}")
    return pd.concat([run_scores(run.root, run.root.name) for run in runs], ignore_index=True)


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t confidence interval (nan half-width for n < 2)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(half)


def seed_deltas(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Per variant and task: mean single-checkpoint score and its paired delta vs the reference."""
    singles = table.dropna(subset=["seed"])
    averaged = singles.groupby(["variant", "seed"])["score"].mean().reset_index().assign(task="average")
    singles = pd.concat([singles[["variant", "seed", "task", "score"]], averaged], ignore_index=True)
    base = singles[singles["variant"] == reference].set_index(["task", "seed"])["score"]
    rows = []
    for (variant, task), group in singles.groupby(["variant", "task"]):
        paired = group.set_index("seed")["score"] - base.loc[task].reindex(group["seed"]).to_numpy()
        mean, half = mean_ci(group["score"].to_numpy())
        delta, delta_half = mean_ci(paired.to_numpy())
        rows.append({"variant": variant, "task": task, "seeds": len(group), "score": mean, "ci95": half,
                     "delta_vs_reference": delta, "delta_ci95": delta_half})
    return pd.DataFrame(rows)


def soup_vs_best_single(table: pd.DataFrame) -> pd.DataFrame:
    """Per variant and task: each soup's score against the best single stage-2 checkpoint."""
    rows = []
    for (variant, task), group in table.groupby(["variant", "task"]):
        singles = group[group["seed"].notna()]["score"]
        for _, soup in group[group["model"].map(is_soup_label)].iterrows():
            rows.append({"variant": variant, "task": task, "soup": soup["model"], "soup_score": soup["score"],
                         "best_single": singles.max(), "mean_single": singles.mean(),
                         "soup_minus_best": soup["score"] - singles.max()})
    return pd.DataFrame(rows)
