"""Command line.

``python -m kalm_lib run --profile cpu`` runs the whole notebook series;
``python -m kalm_lib run --resume NAME`` continues an interrupted one (killed, preempted, out of
disk) where it stopped, with the profile and overrides it started with.

``python -m kalm_lib train --profile P --run-dir D --stage {pretrain,mine,finetune}`` runs one
stage on a run folder curated by notebook 00 (``pipeline.run_curation``): stage-1 training, mining
stage-2 hard negatives with the stage-1 model (one process), or stage-2 training. It is the entry
point for multi-process and multi-node training, e.g.::

    accelerate launch --multi_gpu --num_processes 8 -m kalm_lib train --profile gpu-qwen2-0.5b --run-dir runs/x --stage pretrain
    accelerate launch --multi_gpu --num_machines 2 --machine_rank R --main_process_ip HOST \\
        --main_process_port 29500 --num_processes 16 -m kalm_lib train ...
    python -m torch.distributed.run --nproc_per_node 2 -m kalm_lib train ...   # CPU processes (gloo)

(``accelerate launch --cpu`` starts a single process unless given an MPI host file.)

``python -m kalm_lib plan --profile gpu-qwen2-0.5b --gpus 8 [--gpu-memory 80] [--peak-tflops 989] [--mfu 0.35]``
prints the capacity plan of both stages (memory per GPU, tokens, FLOPs, wall time;
:mod:`kalm_lib.capacity`) and exits 2 when a stage does not fit the GPU memory.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import yaml

from .config import ConfigError
from .data_cards import DataCardError
from .layout import RUNS_DIR, RunLayout


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """``key.sub=value`` strings to a dict; values parsed as YAML scalars."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def train_command(profile: str, run_dir: Path, stage: str, seed: int | None = None, overrides: dict | None = None) -> Path:
    """Run one stage (``pretrain``, ``mine`` or ``finetune``) on an already curated run folder.

    ``seed`` picks the single stage-2 seed to train (default: every ``finetune.seeds``) or, for
    stage 1, replaces the profile's top-level seed. Works under ``accelerate launch`` /
    ``torch.distributed.run``: every process trains its shard; only the main process writes the
    run-level files (histories, final folders). Mining: every process encodes and ranks its shard,
    the shards are gathered and only the main process writes the mined shards. Returns the
    folder of the (last) final encoder, or the data folder after mining.
    """
    import torch
    from accelerate import PartialState

    from . import pipeline

    overrides = dict(overrides or {})
    if seed is not None and stage == "finetune":
        overrides["finetune.seeds"] = [seed]
    elif seed is not None:
        overrides["seed"] = seed
    layout = RunLayout(Path(run_dir).expanduser().resolve())
    if not layout.data.is_dir():
        raise FileNotFoundError(f"{layout.data} not found: curate first (notebook 00 / pipeline.run_curation)")
    if stage in ("mine", "finetune") and not layout.stage1.final.is_dir():
        raise FileNotFoundError(f"{layout.stage1.final} not found: run --stage pretrain first")
    cfg, run_dir = pipeline.open_run(profile, layout.root, overrides)
    # Initialise the process group (same device choice as training.make_accelerator) before the
    # stage functions ask which process writes the run-level files.
    state = PartialState(cpu=not torch.cuda.is_available())
    if stage == "pretrain":
        final = pipeline.run_pretraining(cfg, run_dir).final_dir
    elif stage == "mine":
        pipeline.run_mining(cfg, run_dir)
        final = RunLayout(run_dir).data
    else:
        final = pipeline.run_finetuning(cfg, run_dir)[-1].final_dir
    state.wait_for_everyone()
    return final


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m kalm_lib", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebook series with papermill")
    run.add_argument("--profile", default=None, help="profile name (kalm_lib/profiles) or YAML path (default: cpu)")
    run.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    run.add_argument("--name", default=None, help="run folder name (default: profile + UTC time)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a profile parameter, e.g. --set finetune.focal_gamma=0")
    run.add_argument("--resume", default=None, metavar="NAME",
                     help="continue the interrupted run NAME (its folder under --runs-dir still has the incomplete prefix) "
                          "with its own profile and overrides")
    train = sub.add_parser("train", help="run one training stage on a curated run folder (accelerate launch entry point)")
    train.add_argument("--profile", required=True, help="profile name (kalm_lib/profiles) or YAML path")
    train.add_argument("--run-dir", type=Path, required=True, help="run folder whose data/ notebook 00 wrote")
    train.add_argument("--stage", choices=("pretrain", "mine", "finetune"), required=True)
    train.add_argument("--seed", type=int, default=None,
                       help="finetune: train only this seed (default: every finetune.seeds); pretrain: the stage-1 seed")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a profile parameter, e.g. --set pretrain.steps=10")
    grid = sub.add_parser("grid", help="run an ablation grid (every variant through the notebook series) and its report")
    grid.add_argument("--grid", type=Path, required=True, help="grid YAML, e.g. kalm_lib/grids/cpu-findings.yaml")
    grid.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    grid.add_argument("--name", required=True, help="grid folder name under --runs-dir (re-running resumes missing variants)")
    grid.add_argument("--report-only", action="store_true", help="render the grid report from the runs already there")
    grid.add_argument("--only", default=None, metavar="RUN[,RUN...]",
                      help="run only these planned runs, in this order (e.g. full_recipe,full_recipe@curation_seed_2); "
                           "the others stay missing until the grid is started again")
    findings = sub.add_parser("findings", help="print a run's (and its grid's) findings as a Markdown table")
    findings.add_argument("--run-dir", type=Path, required=True, help="a complete run folder (a grid's reference run)")
    findings.add_argument("--grid-dir", type=Path, default=None, help="the grid folder, to add every variant against the reference")
    findings.add_argument("--reference", default="full_recipe", help="the grid's reference variant")
    plan = sub.add_parser("plan", help="capacity plan per training stage: memory per GPU, tokens, FLOPs, wall time")
    plan.add_argument("--profile", required=True, help="profile name (kalm_lib/profiles) or YAML path")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs (data-parallel processes) the global batch is split over")
    plan.add_argument("--gpu-memory", type=float, default=None, metavar="GIB", help="memory of one GPU in GiB (default: H100, 80)")
    plan.add_argument("--peak-tflops", type=float, default=None, metavar="T",
                      help="dense bf16 peak of one GPU in TFLOP/s (default: H100 SXM, 989)")
    plan.add_argument("--mfu", type=float, default=None, metavar="M",
                      help="assumed utilisation of the executed FLOPs (default 0.35)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a profile parameter, e.g. --set finetune.mini_batch_size=32")
    args = parser.parse_args(argv)
    if args.command == "plan":
        return _plan(args)
    if args.command == "findings":
        return _findings(args)
    if args.command == "train":
        return _train(args)
    if args.command == "grid":
        return _grid(args)
    return _run(args)


def _notebook_command(label: str, start: Callable[[], Path], resume_hint: str = "") -> int:
    """Run ``start`` (a papermill-driven command), turning errors into messages and exit codes;
    a failed notebook prints ``resume_hint`` (how to continue once the cause is fixed)."""
    from papermill.exceptions import PapermillExecutionError

    from .series_progress import AlteredRunError

    try:
        folder = start()
    except (ConfigError, DataCardError, FileExistsError, FileNotFoundError, AlteredRunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PapermillExecutionError as exc:
        print(f"error in notebook cell {exc.exec_count}: {exc.ename}: {exc.evalue}", file=sys.stderr)
        if resume_hint:
            print(resume_hint, file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a full or read-only disk: the run stays incomplete
        print(f"error: {exc}", file=sys.stderr)
        if resume_hint:
            print(resume_hint, file=sys.stderr)
        return 1
    print(f"{label} complete: {folder}")
    print(f"report: {RunLayout(folder).report_html}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    """``plan`` subcommand: the capacity plan, or a refusal (exit 2) naming the stage that does not fit."""
    from .capacity import CapacityError, Hardware, format_plan
    from .config import load_profile

    try:
        given = {"gpu_memory_gib": args.gpu_memory, "peak_tflops": args.peak_tflops, "mfu": args.mfu}
        hardware = Hardware(args.gpus, **{key: value for key, value in given.items() if value is not None})
        text = format_plan(load_profile(args.profile, parse_overrides(args.overrides)), hardware)
    except (ConfigError, CapacityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


def _findings(args: argparse.Namespace) -> int:
    """``findings`` subcommand: the grid's findings (if any), then the run's, then (with a grid
    whose checkpoints were scored at Matryoshka dims) the variants at truncated dims, then (with a
    grid of several curations) each variant within each curation, then the run's main scores per
    model and task, as Markdown tables separated by blank lines."""
    import pandas as pd

    from .ablations import collect, per_replicate_deltas
    from .findings import cells_markdown, findings_markdown, grid_findings, matryoshka_findings, run_findings, scores_markdown
    from .report import main_scores, per_curation_table

    try:
        table = collect(args.grid_dir) if args.grid_dir else None
        tables = [grid_findings(table, args.reference)] if table is not None else []
        tables.append(run_findings(args.run_dir))
        truncated = matryoshka_findings(table, args.reference) if table is not None else pd.DataFrame()
        replicated = table is not None and table["replicate"].nunique() > 1
        within = per_curation_table(per_replicate_deltas(table, args.reference), args.reference) if replicated else pd.DataFrame()
        scores = main_scores(args.run_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(findings_markdown(pd.concat(tables, ignore_index=True)))
    if len(truncated):
        print(findings_markdown(truncated))
    if len(within):
        print(cells_markdown(within))
    print(scores_markdown(scores), end="")
    return 0


def _grid(args: argparse.Namespace) -> int:
    """``grid`` subcommand."""
    from .ablations import load_grid, run_grid

    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    return _notebook_command("grid", lambda: run_grid(load_grid(args.grid), args.runs_dir, args.name, args.report_only, only),
                             "the grid keeps its runs; the same grid command continues it (an interrupted variant resumes)")


def _run(args: argparse.Namespace) -> int:
    """``run`` subcommand (papermill is imported lazily: ``train`` processes do not need it)."""
    from .runner import resume_series, run_series

    if args.resume:
        if args.profile or args.overrides or args.name:
            print("error: --resume NAME takes the profile, overrides and name the run started with; "
                  "drop --profile/--set/--name", file=sys.stderr)
            return 2
        return _notebook_command("run", lambda: resume_series(args.runs_dir, args.resume), _resume_hint(args.resume, args.runs_dir))
    name = args.name or f"{Path(args.profile or 'cpu').stem}-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    return _notebook_command("run", lambda: run_series(args.profile or "cpu", args.runs_dir, name, parse_overrides(args.overrides)),
                             _resume_hint(name, args.runs_dir))


def _resume_hint(name: str, runs_dir: Path) -> str:
    """What to type to continue run ``name`` after an interruption."""
    where = "" if runs_dir == RUNS_DIR else f" --runs-dir {runs_dir}"
    return f"the run keeps its folder; once the cause is fixed continue it with: python -m kalm_lib run --resume {name}{where}"


def _train(args: argparse.Namespace) -> int:
    """``train`` subcommand: errors as messages and exit codes, one summary line from the main process."""
    try:
        final = train_command(args.profile, args.run_dir, args.stage, args.seed, parse_overrides(args.overrides))
    except (ConfigError, DataCardError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"{args.stage} complete: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
