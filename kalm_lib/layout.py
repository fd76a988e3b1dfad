"""Every folder and file name of the repository, a run, a grid and a training stage, defined once.

Nothing else in ``kalm_lib`` (or the notebooks) spells a path inside a run folder: everything asks
a :class:`RunLayout`, :class:`GridLayout` or :class:`StageLayout`, and the repository's own folders
are the constants below. A run folder::

    <runs>/<name>/                 (written as <runs>/.incomplete-<name>/ until complete)
      manifest.json                profile, parameters, seed, git, packages, machine, timings, resumes
      series_progress.json         while incomplete: notebooks done, their outputs' SHA-256, resumes
      .runner.lock                 held by the runner writing the folder
      report.html                  the rendered report notebook
      notebooks/NN_*.ipynb         the executed series
      data/                        notebook 00
        pretrain/<set>.parquet     curated shards, one per derived card
        pretrain/<set>/*.parquet   a streamed set's shards (data.stream_hub_sets)
        pretrain/<set>.arrow       ... and their Arrow copy, which training memory-maps
        streaming_work/<set>/      while a streamed set is curated: intermediate shards, datatrove logs
        finetune/<set>.parquet
        mined/<set>.parquet        stage-2 shards with negatives mined by the stage-1 model (notebook 02)
        mining_pool.parquet        candidate words for mining (every word not held out) and their relations
        eval/<file>.json           held-out test payloads
        validation/<file>.json     soup-selection payloads
        cards/<set>.yaml           filled data cards (size, sha256, file)
        curation_summary.csv       rows surviving each step, per set
      checkpoints/                 notebooks 02-04
        stage1/final               (a stage folder: StageLayout; state_<step>/ while it trains)
        stage2_seed<S>/final
        soup_<method>              every model folder loads in sentence-transformers; the final
                                   model's also holds README.md (model card, notebook 05)
      metrics/                     one file per stage
        bidirectional_check.csv  stage1_history.json  stage2_seed<S>_history.json
        mining_quality.csv  mining_samples.csv  soup_trace.csv  mteb_scores.csv
        per_item_scores.csv        per query / pair values of every model (paired bootstrap)
        benchmark_means.csv        Mean(Task), Mean(TaskType), per-type means per mteb benchmark (hub hosts)
      mteb/  mteb_validation/      mteb's own result folders (test / validation)

A grid folder holds one run folder per variant plus ``report.ipynb``, ``report.html`` and
``manifest.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

REPO_ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = REPO_ROOT / "kalm_lib" / "profiles"
GRIDS_DIR = REPO_ROOT / "kalm_lib" / "grids"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
DATA_CARDS_DIR = REPO_ROOT / "data_cards"
RUNS_DIR = REPO_ROOT / "runs"
RESULTS_DIR = REPO_ROOT / "results"

INCOMPLETE_PREFIX = ".incomplete-"
BASE = "base"  # model label of the untrained backbone, scored with the KaLM instructions
BASE_NO_INSTRUCTION = "base_no_instruction"  # the same weights scored on bare texts (as it was trained)
STAGE1 = "stage1"
STAGE2_PREFIX = "stage2_seed"
SOUP_PREFIX = "soup_"
SINGLE_PREFIX = "single:"  # soup-trace rows that score one stage-2 checkpoint on the validation split
MANIFEST = "manifest.json"
REPORT_HTML = "report.html"
REPORT_NOTEBOOK = "report.ipynb"
HISTORY_SUFFIX = "_history.json"
SERIES_PROGRESS = "series_progress.json"
RUNNER_LOCK = ".runner.lock"
MODEL_CARD = "README.md"  # the model card inside a saved model folder (kalm_lib.hub)


def stage2_label(seed: int) -> str:
    """Model label (and checkpoint folder name) of stage-2 seed ``seed``: ``stage2_seed<S>``."""
    return f"{STAGE2_PREFIX}{seed}"


def stage2_seed(label: str) -> int | None:
    """The seed in a single stage-2 label, or None for any other model label."""
    match = re.fullmatch(rf"{STAGE2_PREFIX}(\d+)", label)
    return int(match.group(1)) if match else None


def soup_label(method: str) -> str:
    """Model label (and checkpoint folder name) of a soup: ``soup_<method>``."""
    return f"{SOUP_PREFIX}{method}"


def is_soup_label(label: str) -> bool:
    """True for ``soup_<method>`` labels (not their compressed variants ``soup_x@int8``)."""
    return re.fullmatch(rf"{SOUP_PREFIX}[a-z]+", label) is not None


@dataclass(frozen=True)
class StageLayout:
    """One training stage's folder: ``final/`` (the saved encoder) and ``state_<step>/`` resume points."""

    root: Path
    PROGRESS: ClassVar[str] = "progress.json"  # step counter and loss history inside a state folder

    @property
    def final(self) -> Path:
        """The finished encoder (a sentence-transformers folder)."""
        return self.root / "final"

    def state(self, step: int) -> Path:
        """accelerate ``save_state`` folder after ``step`` steps."""
        return self.root / f"state_{step}"

    def progress(self, step: int) -> Path:
        """Step counter and loss history stored with the state of ``step``."""
        return self.state(step) / self.PROGRESS


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder (see the module docstring for the tree)."""

    root: Path

    # --- top level --------------------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def report_html(self) -> Path:
        return self.root / REPORT_HTML

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def series_progress(self) -> Path:
        """The runner's record of completed notebooks and their outputs (for ``run --resume``)."""
        return self.root / SERIES_PROGRESS

    @property
    def runner_lock(self) -> Path:
        """Lock file the runner holds while it writes the folder (a second runner is refused)."""
        return self.root / RUNNER_LOCK

    # --- data (notebook 00) -----------------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.root / "data"

    def shard(self, stage: str, name: str) -> Path:
        """Curated Parquet shard of training set ``name`` for ``stage`` (pretrain / finetune)."""
        return self.data / stage / f"{name}.parquet"

    def shard_dir(self, stage: str, name: str) -> Path:
        """Folder of Parquet shards of a streamed training set ``name`` (``data.stream_hub_sets``)."""
        return self.data / stage / name

    def arrow_copy(self, stage: str, name: str) -> Path:
        """Arrow copy of streamed set ``name``'s shards, memory-mapped by training (:class:`~kalm_lib.shards.ShardRows`)."""
        return self.data / stage / f"{name}.arrow"

    def streaming_work(self, name: str) -> Path:
        """Intermediate shards, signatures and datatrove logs of streamed set ``name`` (removed once curated)."""
        return self.data / "streaming_work" / name

    def mined_shard(self, name: str) -> Path:
        """Stage-2 shard of set ``name`` after hard-negative mining with the stage-1 model."""
        return self.data / "mined" / f"{name}.parquet"

    @property
    def mining_pool(self) -> Path:
        return self.data / "mining_pool.parquet"

    def eval_payloads(self, split: str) -> Path:
        """Folder of the evaluation payloads of ``split`` (``test`` -> ``eval/``, ``validation``)."""
        return self.data / ("validation" if split == "validation" else "eval")

    @property
    def cards(self) -> Path:
        return self.data / "cards"

    def card(self, name: str) -> Path:
        """Filled data card of set ``name``."""
        return self.cards / f"{name}.yaml"

    @property
    def curation_summary(self) -> Path:
        return self.data / "curation_summary.csv"

    # --- checkpoints (notebooks 02-04) ------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def stage1(self) -> StageLayout:
        return StageLayout(self.checkpoints / STAGE1)

    def stage2(self, seed: int) -> StageLayout:
        return StageLayout(self.checkpoints / stage2_label(seed))

    def stage2_finals(self) -> list[Path]:
        """Final folders of every stage-2 seed present, sorted by folder name."""
        return sorted(self.checkpoints.glob(f"{STAGE2_PREFIX}*/final"))

    def soup(self, method: str) -> Path:
        return self.checkpoints / soup_label(method)

    # --- metrics ----------------------------------------------------------------------------
    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def history(self, label: str) -> Path:
        """Training history of stage ``label`` (``stage1``, ``stage2_seed<S>``)."""
        return self.metrics / f"{label}{HISTORY_SUFFIX}"

    def histories(self) -> dict[str, Path]:
        """Stage label -> history file, for every history present."""
        return {p.name.removesuffix(HISTORY_SUFFIX): p for p in sorted(self.metrics.glob(f"*{HISTORY_SUFFIX}"))}

    @property
    def bidirectional_check(self) -> Path:
        return self.metrics / "bidirectional_check.csv"

    @property
    def mining_quality(self) -> Path:
        return self.metrics / "mining_quality.csv"

    @property
    def mining_samples(self) -> Path:
        return self.metrics / "mining_samples.csv"

    @property
    def soup_trace(self) -> Path:
        return self.metrics / "soup_trace.csv"

    @property
    def mteb_scores(self) -> Path:
        return self.metrics / "mteb_scores.csv"

    @property
    def benchmark_means(self) -> Path:
        """Leaderboard aggregates of every evaluated model per standard benchmark (``evaluation.benchmarks``)."""
        return self.metrics / "benchmark_means.csv"

    @property
    def per_item_scores(self) -> Path:
        """Per-query nDCG@10 and per-pair cosine and label of every evaluated model (test split)."""
        return self.metrics / "per_item_scores.csv"

    @property
    def mteb(self) -> Path:
        """mteb's result folder for the test tasks."""
        return self.root / "mteb"

    @property
    def mteb_validation(self) -> Path:
        """mteb's result folder for soup selection on the validation split."""
        return self.root / "mteb_validation"

    def upstream(self) -> list[Path]:
        """What notebooks 00-02 leave behind (a grid variant that changes only stage 2 reuses it)."""
        return [self.data, self.stage1.root, self.bidirectional_check, self.history(STAGE1), self.mining_quality,
                self.mining_samples]


def incomplete_run(runs_dir: Path, name: str) -> Path:
    """Where run ``name`` is written until it is complete."""
    return runs_dir / f"{INCOMPLETE_PREFIX}{name}"


@dataclass(frozen=True)
class GridLayout:
    """Paths of one ablation-grid folder: a run folder per variant and the grid report."""

    root: Path

    def variant(self, name: str) -> RunLayout:
        return RunLayout(self.root / name)

    def variant_runs(self) -> list[RunLayout]:
        """Every complete variant folder holding evaluation scores, sorted by name (a run still
        being written, under the incomplete prefix, is left out)."""
        runs = (RunLayout(p) for p in sorted(self.root.iterdir()) if p.is_dir() and not p.name.startswith(INCOMPLETE_PREFIX))
        return [run for run in runs if run.mteb_scores.is_file()]

    @property
    def report_notebook(self) -> Path:
        return self.root / REPORT_NOTEBOOK

    @property
    def report_html(self) -> Path:
        return self.root / REPORT_HTML

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST
