"""Tables and matplotlib figures for the report notebook, read from a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from .config import Profile
from .curation import load_train_sets
from .layout import RunLayout
from .mteb_tasks import LOCAL_TASKS, read_eval_file


def parameters_table(profile: Profile) -> pd.DataFrame:
    """The run's parameters as a readable table: one row per ``section.key`` and its value."""
    rows = []
    for section, value in profile.to_dict().items():
        if isinstance(value, dict):
            rows += [{"parameter": f"{section}.{key}", "value": _short(item)} for key, item in value.items()]
        else:
            rows.append({"parameter": section, "value": _short(value)})
    return pd.DataFrame(rows).set_index("parameter")


def _short(value: object) -> str:
    """A parameter value as text (lists and dicts inline)."""
    return str(value) if not isinstance(value, str) else value or '""'


def main_scores(run_dir: Path) -> pd.DataFrame:
    """Stage x task table of mteb main scores, with the task average as the last column."""
    scores = pd.read_csv(RunLayout(run_dir).mteb_scores)
    table = scores[scores["is_main"]].pivot_table(index="stage", columns="task", values="score", sort=False)
    table["average"] = table.mean(axis=1)
    return table


def loss_curves(run_dir: Path) -> dict[str, pd.DataFrame]:
    """Training history per stage label (``stage1``, one per stage-2 seed)."""
    curves = {}
    for label, path in RunLayout(run_dir).histories().items():
        history = json.loads(path.read_text())
        if history:
            curves[label] = pd.DataFrame(history)
    return curves


def curation_summary(run_dir: Path) -> pd.DataFrame:
    """Rows surviving each curation step, per derived set (notebook 00)."""
    return pd.read_csv(RunLayout(run_dir).curation_summary)


def curated_samples(run_dir: Path, stage: str, rows: int = 3) -> dict[str, pd.DataFrame]:
    """The first ``rows`` curated examples (query, positive, negatives) of every set of ``stage``."""
    return {name: frame.head(rows)[["query", "positive", "negatives"]]
            for name, (frame, _) in load_train_sets(RunLayout(run_dir), stage).items()}


def mining_quality(run_dir: Path) -> pd.DataFrame:
    """Per stage-2 set: rows kept, dropped and padded by mining, and the mined negatives' quality."""
    return pd.read_csv(RunLayout(run_dir).mining_quality)


def mining_samples(run_dir: Path) -> pd.DataFrame:
    """A few mined rows per set (query, positive, negatives)."""
    return pd.read_csv(RunLayout(run_dir).mining_samples)


def evaluation_samples(run_dir: Path, rows: int = 6) -> dict[str, pd.DataFrame]:
    """The first ``rows`` items of every held-out test task of the run, as the models see them
    (before instructions): retrieval queries with their answer, labelled pairs, clustered words."""
    folder = RunLayout(run_dir).eval_payloads("test")
    samples = {}
    for name, task in LOCAL_TASKS.items():
        path = folder / task.filename
        if not path.is_file():
            continue
        payload = read_eval_file(path)
        if "queries" in payload:
            answers = {qid: ", ".join(payload["corpus"][doc] for doc in docs) for qid, docs in payload["qrels"].items()}
            frame = pd.DataFrame({"query": payload["queries"].values(), "answer": [answers[q] for q in payload["queries"]]})
        elif "sentence1" in payload:
            frame = pd.DataFrame({k: payload[k] for k in ("sentence1", "sentence2", "labels")})
        else:
            frame = pd.DataFrame({"sentence": payload["sentences"], "cluster": payload["labels"]})
        samples[name] = frame.head(rows)
    return samples


def bidirectional_check(run_dir: Path) -> pd.DataFrame:
    """First-token sensitivity with causal and bidirectional attention (notebook 01)."""
    return pd.read_csv(RunLayout(run_dir).bidirectional_check)


def soup_trace(run_dir: Path) -> pd.DataFrame:
    """The soup selection trace on the validation split (notebook 04)."""
    return pd.read_csv(RunLayout(run_dir).soup_trace)


def plot_loss_curves(curves: dict[str, pd.DataFrame], window: int = 10) -> plt.Figure:
    """Running-mean training loss against step, one line per stage/seed."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for name, frame in curves.items():
        axis = axes[0] if name.startswith("stage1") else axes[1]
        axis.plot(frame["step"], frame["loss"].rolling(window, min_periods=1).mean(), label=name)
    for axis, title in zip(axes, ("stage 1: pre-training", "stage 2: fine-tuning")):
        axis.set(title=title, xlabel="step", ylabel=f"loss (running mean, {window})")
        if axis.lines:
            axis.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_scores(table: pd.DataFrame) -> plt.Figure:
    """Grouped bars of main score per task for every stage."""
    fig, axis = plt.subplots(figsize=(11, 4))
    table.T.plot.bar(ax=axis, width=0.85)
    axis.set(ylabel="main score", xlabel="")
    axis.legend(fontsize=7, ncol=3)
    axis.tick_params(axis="x", rotation=15)
    fig.tight_layout()
    return fig


def plot_curation(summary: pd.DataFrame) -> plt.Figure:
    """Rows surviving each curation step, per derived set (the batch-size flags stay in the table)."""
    steps = [c for c in summary.columns if c not in ("set", "stage", "batch_size", "below_one_batch")]
    fig, axis = plt.subplots(figsize=(11, 3.5))
    summary.set_index("set")[steps].plot.bar(ax=axis, logy=True, width=0.85)
    axis.set(ylabel="rows (log)", xlabel="")
    axis.tick_params(axis="x", rotation=15)
    axis.legend(fontsize=7)
    fig.tight_layout()
    return fig


def compressed_scores(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of the main-score table for compressed embeddings (``model@dimN``, ``model@int8``...)
    next to the full-precision row of the same model, with the change against it."""
    compressed = table[table.index.str.contains("@")]
    if compressed.empty:
        return compressed
    full = table.loc[compressed.index.str.split("@").str[0]]
    return pd.concat({"score": compressed, "change_vs_full": compressed - full.to_numpy()}, axis=1)


def plot_deltas(deltas: pd.DataFrame, reference: str) -> plt.Figure:
    """Paired change of the average main score against the reference, with 95% CIs over seeds."""
    average = deltas[(deltas["task"] == "average") & (deltas["variant"] != reference)].sort_values("delta_vs_reference")
    fig, axis = plt.subplots(figsize=(8, 1.5 + 0.45 * max(len(average), 1)))
    if average.empty:  # a grid with only its reference so far
        axis.text(0.5, 0.5, "no variant runs yet", ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
        return fig
    axis.barh(average["variant"], average["delta_vs_reference"], xerr=average["delta_ci95"].fillna(0), color="tab:blue", capsize=3)
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set(xlabel=f"change of average main score vs {reference} (single checkpoints, 95% CI over seeds)")
    fig.tight_layout()
    return fig


def per_curation_table(deltas: pd.DataFrame, reference: str) -> pd.DataFrame:
    """:func:`~kalm_lib.ablations.per_replicate_deltas` as text, one row per variant and curation
    ("base" for the grid's own runs), one column per task: ``delta [low, high]`` (t over seeds)."""
    rows = deltas[deltas["variant"] != reference].assign(
        curation=lambda d: d["replicate"].replace("", "base"),
        cell=lambda d: [f"{m:+.4f} [{m - h:+.4f}, {m + h:+.4f}]" for m, h in zip(d["delta_vs_reference"], d["delta_ci95"])],
    )
    return rows.pivot(index=["variant", "curation"], columns="task", values="cell")
