"""Command line: ``python -m kalm_lib run --profile cpu`` runs the whole notebook series."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from papermill.exceptions import PapermillExecutionError

from .config import REPO_ROOT, ConfigError
from .data_cards import DataCardError
from .runner import run_series


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """``key.sub=value`` strings to a dict; values parsed as YAML scalars."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m kalm_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebook series with papermill")
    run.add_argument("--profile", default="cpu", help="profile name (kalm_lib/profiles) or YAML path")
    run.add_argument("--runs-dir", type=Path, default=REPO_ROOT / "runs")
    run.add_argument("--name", default=None, help="run folder name (default: profile + UTC time)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a profile parameter, e.g. --set finetune.focal_gamma=0")
    args = parser.parse_args(argv)
    try:
        folder = run_series(args.profile, args.runs_dir, args.name, parse_overrides(args.overrides))
    except (ConfigError, DataCardError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PapermillExecutionError as exc:
        print(f"error in notebook cell {exc.exec_count}: {exc.ename}: {exc.evalue}", file=sys.stderr)
        return 1
    print(f"run complete: {folder}")
    print(f"report: {folder / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
