"""The study's findings as a table: each comparison with its effect, 95% interval and a reading.

A finding compares two models on one task (or the task average) with a paired interval:

* over stage-2 seeds (grid variants against the reference; stage 2 against stage 1): the mean of
  the per-seed differences d_s with the Student-t half-width t_{0.975, n-1} * sd(d) / sqrt(n);
* over queries / pairs within one pair of models (:mod:`kalm_lib.bootstrap`): the percentile
  interval of the paired bootstrap.

The reading says "raises" / "lowers" only when the interval excludes 0, else "no measurable
effect": the interval, not the point estimate, decides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .ablations import mean_ci, replicate_deltas, seed_deltas, truncated_singles
from .bootstrap import paired_comparisons, read_per_item
from .layout import BASE, BASE_NO_INSTRUCTION, SINGLE_PREFIX, STAGE1, RunLayout, soup_label, stage2_seed

FINDING_COLUMNS = ["finding", "task", "effect", "ci_low", "ci_high", "n", "interval", "reading"]


def reading(subject: str, task: str, effect: float, low: float, high: float) -> str:
    """One sentence: the direction and size of ``effect`` if its interval excludes 0, else none."""
    if np.isnan(low) or np.isnan(high):
        return f"{subject}: {effect:+.4f} on {task}, no interval (a single measurement)."
    span = f"95% CI {low:+.4f} to {high:+.4f}"
    if low > 0:
        return f"{subject} raises {task} by {effect:.4f} ({span})."
    if high < 0:
        return f"{subject} lowers {task} by {-effect:.4f} ({span})."
    return f"{subject}: no measurable effect on {task} ({effect:+.4f}, {span})."


def finding_row(finding: str, task: str, effect: float, half_or_bounds: float | tuple[float, float], n: int,
                interval: str) -> dict[str, object]:
    """One row of the findings table from an effect and a half-width (or explicit bounds)."""
    if isinstance(half_or_bounds, tuple):
        low, high = half_or_bounds
    else:
        low, high = effect - half_or_bounds, effect + half_or_bounds
    return {"finding": finding, "task": task, "effect": effect, "ci_low": low, "ci_high": high, "n": n,
            "interval": interval, "reading": reading(finding, task, effect, low, high)}


def grid_findings(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Every variant against the reference, per task and on the task average, paired by seed (and
    replicate, when the grid has replicates); then each replicate's reference against the
    reference; then stage 2 against stage 1 across curations (:func:`stage2_vs_stage1_across_curations`;
    ``table`` as :func:`kalm_lib.ablations.collect` returns it)."""
    deltas = seed_deltas(table, reference)
    rows = variant_rows(deltas[deltas["variant"] != reference], reference)
    rows += [
        finding_row(f"{reference}@{row.replicate} vs {reference}", row.task, row.delta_vs_reference, row.delta_ci95,
                    int(row.units), f"t over {int(row.units)} stage-2 seeds")
        for row in replicate_deltas(table, reference).itertuples()
    ]
    frames = [frame for frame in (pd.DataFrame(rows, columns=FINDING_COLUMNS), stage2_vs_stage1_across_curations(table, reference))
              if len(frame)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=FINDING_COLUMNS)


def variant_rows(deltas: pd.DataFrame, reference: str, label: str = "") -> list[dict[str, object]]:
    """Findings rows ``<variant> vs <reference><label>`` of :func:`~kalm_lib.ablations.seed_deltas`
    rows, with the interval each carries (over stage-2 seeds, or over replicate means)."""
    return [
        finding_row(f"{row.variant} vs {reference}{label}", row.task, row.delta_vs_reference, row.delta_ci95, int(row.units),
                    f"t over {int(row.units)} " + ("replicate means of seed-paired differences" if row.replicates > 1
                                                   else "stage-2 seeds"))
        for row in deltas.itertuples()
    ]


def stage2_vs_stage1_across_curations(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Stage 2 against stage 1 of the reference recipe across its curations (replicates of
    ``table``, :func:`kalm_lib.ablations.collect`): per curation, the mean over its stage-2 seeds of
    d_s = score(stage2_seed_s) - score(stage 1 of that curation); then the t interval over the R
    curation means (R - 1 degrees of freedom), as :func:`~kalm_lib.ablations.seed_deltas` does
    for variants. Per task and on the task average; empty with fewer than two curations."""
    ref = table[table["variant"] == reference]
    stage1 = ref[ref["model"] == STAGE1]
    singles = ref[ref["seed"].notna() & ref["replicate"].isin(set(stage1["replicate"]))]
    if singles["replicate"].nunique() < 2:
        return pd.DataFrame(columns=FINDING_COLUMNS)
    averaged = [singles.groupby(["replicate", "seed"])["score"].mean().reset_index().assign(task="average"),
                stage1.groupby("replicate")["score"].mean().reset_index().assign(task="average")]
    singles = pd.concat([singles[["replicate", "seed", "task", "score"]], averaged[0]], ignore_index=True)
    stage1 = pd.concat([stage1[["replicate", "task", "score"]], averaged[1]], ignore_index=True).set_index(["replicate", "task"])["score"]
    rows = []
    for task, group in singles.groupby("task", sort=False):
        paired = group["score"].to_numpy() - stage1.reindex(pd.MultiIndex.from_arrays([group["replicate"], group["task"]])).to_numpy()
        means = pd.Series(paired, index=group["replicate"].to_numpy()).dropna().groupby(level=0).mean()
        effect, half = mean_ci(means.to_numpy())
        rows.append(finding_row(f"{reference} stage 2 vs stage 1, across curations", task, effect, half, len(means),
                                f"t over {len(means)} curations of mean(stage-2 seeds) - stage 1"))
    return pd.DataFrame(rows, columns=FINDING_COLUMNS)


def matryoshka_findings(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Every variant against the reference with both truncated to each Matryoshka dim D
    (:func:`~kalm_lib.ablations.truncated_singles`), per task and on the task average, paired and
    with intervals exactly as :func:`grid_findings`: where the Matryoshka loss (or any other
    trick) shows at small dims."""
    rows = []
    for dim, group in truncated_singles(table).groupby("dim", sort=False):
        deltas = seed_deltas(group, reference)
        paired = deltas[(deltas["variant"] != reference) & (deltas["units"] > 0)]  # 0: nothing to pair with
        rows += variant_rows(paired, reference, f" @dim{dim}")
    return pd.DataFrame(rows, columns=FINDING_COLUMNS)


def stage2_vs_stage1(scores: pd.DataFrame) -> pd.DataFrame:
    """Single stage-2 checkpoints against the stage-1 model they started from, per task, paired
    by seed (``scores``: main rows of a run's tidy table, columns stage, task, score)."""
    singles = scores[scores["stage"].map(stage2_seed).notna()]
    stage1 = scores[scores["stage"] == STAGE1].set_index("task")["score"]
    rows = []
    for task, group in singles.groupby("task", sort=False):
        if task not in stage1:
            continue
        effect, half = mean_ci(group["score"].to_numpy() - stage1[task])
        rows.append(finding_row("stage 2 vs stage 1", task, effect, half, len(group), f"t over {len(group)} stage-2 seeds"))
    return pd.DataFrame(rows, columns=FINDING_COLUMNS)


def bootstrap_findings(run_dir: Path, pairs: dict[str, tuple[str, str]], n_resamples: int = 2000) -> pd.DataFrame:
    """Named model comparisons of one run (``{finding: (model_a, model_b)}``, effect = b - a) with
    paired-bootstrap intervals over queries / pairs; comparisons whose models are absent are skipped."""
    models = set(read_per_item(run_dir)["model"])
    wanted = {name: pair for name, pair in pairs.items() if set(pair) <= models}
    rows = []
    for name, (model_a, model_b) in wanted.items():
        table = paired_comparisons(run_dir, pairs=[(model_a, model_b)], n_resamples=n_resamples)
        rows += [finding_row(name, row.task, row.delta, (row.ci_low, row.ci_high), int(row.n_items),
                             f"paired bootstrap over {int(row.n_items)} items ({row.statistic})")
                 for row in table.itertuples()]
    return pd.DataFrame(rows, columns=FINDING_COLUMNS)


def best_single_by_validation(layout: RunLayout) -> str:
    """Label of the stage-2 checkpoint with the best validation score in the soup trace ("" when
    the run has no trace)."""
    if not layout.soup_trace.is_file():
        return ""
    trace = pd.read_csv(layout.soup_trace)
    singles = trace[trace["soup"].str.startswith(SINGLE_PREFIX)]
    return "" if singles.empty else singles.loc[singles["validation"].idxmax(), "soup"].removeprefix(SINGLE_PREFIX)


def run_findings(run_dir: Path, n_resamples: int = 2000) -> pd.DataFrame:
    """The findings of one run: stage 1 against the base model (with and without instructions) and
    the soups against the single checkpoint that scored best on the *validation* split (the one a
    user would pick without the test set), paired over queries / pairs; stage 2 against stage 1,
    paired over seeds. Clustering has no per-item scores: it enters the seed-paired rows only."""
    layout = RunLayout(run_dir)
    scores = pd.read_csv(layout.mteb_scores)
    main = scores[scores["is_main"] & ~scores["stage"].str.contains("@")]
    best = best_single_by_validation(layout)
    pairs = {
        "stage 1 vs base (instructed)": (BASE, STAGE1),
        "stage 1 vs base (no instructions)": (BASE_NO_INSTRUCTION, STAGE1),
        f"greedy soup vs best single by validation ({best})": (best, soup_label("greedy")),
        f"uniform soup vs best single by validation ({best})": (best, soup_label("uniform")),
    }
    return pd.concat([bootstrap_findings(run_dir, pairs, n_resamples), stage2_vs_stage1(main)], ignore_index=True)


def findings_markdown(findings: pd.DataFrame, digits: int = 4) -> str:
    """The findings as a Markdown table: finding, task, effect and 95% interval, n, interval kind."""
    lines = ["| finding | task | effect | 95% interval | n | interval |", "| --- | --- | --- | --- | --- | --- |"]
    for row in findings.itertuples():
        span = "–" if np.isnan(row.ci_low) else f"[{row.ci_low:+.{digits}f}, {row.ci_high:+.{digits}f}]"
        measurable = not np.isnan(row.ci_low) and (row.ci_low > 0 or row.ci_high < 0)
        effect = f"**{row.effect:+.{digits}f}**" if measurable else f"{row.effect:+.{digits}f}"
        lines.append(f"| {row.finding} | {row.task} | {effect} | {span} | {row.n} | {row.interval} |")
    return "\n".join(lines) + "\n"


def cells_markdown(table: pd.DataFrame) -> str:
    """A table of text cells as a Markdown table: the index levels' names and values first (e.g.
    :func:`kalm_lib.report.per_curation_table`: variant, curation), then one column per column."""
    names = [str(name) for name in table.index.names]
    lines = ["| " + " | ".join([*names, *map(str, table.columns)]) + " |", "|" + " --- |" * (len(names) + len(table.columns))]
    for key, row in table.iterrows():
        labels = key if isinstance(key, tuple) else (key,)
        lines.append("| " + " | ".join([*map(str, labels), *map(str, row)]) + " |")
    return "\n".join(lines) + "\n"


def scores_markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """A stage x task score table (:func:`kalm_lib.report.main_scores`) as a Markdown table."""
    lines = ["| model | " + " | ".join(table.columns) + " |", "| --- |" + " --- |" * len(table.columns)]
    lines += [f"| {label} | " + " | ".join(f"{value:.{digits}f}" for value in row) + " |" for label, row in table.iterrows()]
    return "\n".join(lines) + "\n"
