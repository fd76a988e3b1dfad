"""Run every benchmark (each in its own process) and write ``summary.json`` and ``summary.md``.

    python -m benchmarks.run_all [--quick] [--out DIR] [--threads N]

The markdown table (one row per headline number, with its goal) is what the README includes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from kalm_lib.layout import REPO_ROOT

from .common import out_dir, parser

BENCHMARKS = ("train_throughput", "encode_throughput", "memory", "mfu", "scaling", "data_scale")


def run(name: str, argv: list[str]) -> None:
    """Run ``benchmarks.<name>`` in a fresh interpreter (no state shared between benchmarks)."""
    subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *argv], cwd=REPO_ROOT, check=True)


def _cell(value: Any) -> str:
    """A table cell: numbers to 3 significant digits, booleans as yes/no, missing as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _code(payloads: dict[str, dict[str, Any]]) -> str:
    """The commit the results came from, or each benchmark's where a later run replaced only some."""
    def short(git: dict[str, Any]) -> str:
        return f"{git['commit'][:10]}{' (uncommitted changes)' if git['dirty'] else ''}"

    commits = {name: short(p["machine"]["git"]) for name, p in payloads.items()}
    if len(set(commits.values())) == 1:
        return f"commit {next(iter(commits.values()))}"
    return "commits: " + ", ".join(f"{name} {commit}" for name, commit in commits.items())


def markdown(rows: list[dict[str, Any]], payloads: dict[str, dict[str, Any]]) -> str:
    """The summary table plus one line naming the machine, versions, commit(s) and time."""
    machine = next(iter(payloads.values()))["machine"]
    versions = machine["versions"]
    times = sorted(p["machine"]["utc_time"] for p in payloads.values())
    lines = [
        "| benchmark | metric | value | goal | met |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {r['benchmark']} | {r['metric']} | {_cell(r['value'])} | {_cell(r['goal'])} | {_cell(r['met'])} |" for r in rows),
        "",
        f"{machine['processor']}, {machine['usable_cores']} usable cores, torch threads {machine['torch_threads']}, "
        f"{machine['cuda_device'] or 'no GPU'}; torch {versions['torch']}, transformers {versions['transformers']}, "
        f"sentence-transformers {versions['sentence-transformers']}, Python {machine['python']}; "
        f"{_code(payloads)}; {times[0]}{f' to {times[-1]}' if times[-1] != times[0] else ''} UTC.",
    ]
    return "\n".join(lines) + "\n"


def summarise(out: Path, names: tuple[str, ...] = BENCHMARKS) -> dict[str, Any]:
    """Collect ``out/<name>.json`` of every benchmark present into ``summary.json`` and ``summary.md``."""
    payloads = {name: json.loads((out / f"{name}.json").read_text()) for name in names if (out / f"{name}.json").is_file()}
    if not payloads:
        raise FileNotFoundError(f"no benchmark results in {out}")
    rows = [{"benchmark": name, **row} for name, p in payloads.items() for row in p["summary"]["rows"]]
    machine = next(iter(payloads.values()))["machine"]
    summary = {
        "machine": machine,
        "rows": rows,
        "benchmarks": {
            name: {"settings": p["settings"], "summary": p["summary"], "utc_time": p["machine"]["utc_time"], "git": p["machine"]["git"]}
            for name, p in payloads.items()
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(rows, payloads))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run all benchmarks with the same arguments, then summarise."""
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    out = out_dir(args)
    forwarded = ["--out", str(out), "--threads", str(args.threads), "--seed", str(args.seed), *(["--quick"] if args.quick else [])]
    for name in BENCHMARKS:
        run(name, forwarded)
    summary = summarise(out)
    print((out / "summary.md").read_text())
    return summary


if __name__ == "__main__":
    main()
