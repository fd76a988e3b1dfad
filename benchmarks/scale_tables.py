"""The README's data-at-scale tables, printed from ``data_scale.json`` and ``mining_scale.json``.

    python -m benchmarks.scale_tables [--out DIR]

Curation: one row per size with wall and CPU seconds, peak RSS, the RSS after imports and the
cost per million rows (1e6 x seconds / rows); then the goals (peak RSS and seconds per row at the
largest size over the smallest). Mining: one row per (queries, pool) point with the seconds, the
scores ranked per second (queries x pool / seconds), the peak RSS, the embeddings' share and what
the ranking held beside them; then the pool-growth goal. Each table ends with the commit, machine
and threads its JSON records. Nothing is measured here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import BENCHMARK_RESULTS_DIR
from .run_all import _cell


def _provenance(payload: dict[str, Any]) -> str:
    """One line: commit (clean or not), processor, cores, threads, device, time."""
    machine, settings = payload["machine"], payload["settings"]
    git = machine["git"]
    return (f"Commit `{git['commit'][:7]}`{' with uncommitted changes' if git['dirty'] else ' (clean)'}, {machine['processor']}, "
            f"{machine['usable_cores']} usable core(s), {settings['threads']} thread(s), {machine['cuda_device'] or 'no GPU'}, "
            f"{machine['utc_time']} UTC.")


def _goals(rows: list[dict[str, Any]]) -> list[str]:
    """The summary's headline rows as bullet lines: value, goal, met."""
    return [f"- {r['metric']}: {_cell(r['value'])} (goal {r['goal'] or '–'}, met: {_cell(r['met'])})" for r in rows]


def curation_table(payload: dict[str, Any]) -> str:
    """Markdown table of ``data_scale.json``'s points, its goals and provenance."""
    lines = ["| rows | seconds (wall) | CPU seconds | peak RSS MiB | RSS after imports MiB | wall s / 1M rows | CPU s / 1M rows "
             "| rows kept |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in payload["summary"]["points"]:
        per_million = 1e6 / p["rows"]
        cells = [f"{p['rows']:,}", f"{p['seconds']:,.0f}", f"{p['cpu_seconds']:,.0f}", f"{p['peak_rss_mib']:,.0f}",
                 f"{p['baseline_rss_mib']:,.0f}", f"{p['seconds'] * per_million:,.0f}", f"{p['cpu_seconds'] * per_million:,.0f}",
                 f"{p['counts']['kept']:,}"]
        lines.append(f"| {' | '.join(cells)} |")
    missing = sorted(set(payload["settings"]["sizes"]) - {p["rows"] for p in payload["summary"]["points"]})
    if missing:
        lines += ["", f"Not measured (asked for): {', '.join(f'{rows:,}' for rows in missing)} rows; the goals are judged with every size."]
    return "\n".join([*lines, "", *_goals(payload["summary"]["rows"]), "", _provenance(payload)]) + "\n"


def mining_table(payload: dict[str, Any]) -> str:
    """Markdown table of ``mining_scale.json``'s points (failed ones named), its goals and provenance."""
    lines = ["| queries | pool | seconds | scores / s (1e6) | peak RSS MiB | embeddings MiB | ranking beside them MiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in payload["raw"]["points"]:
        if "error" in p:
            lines.append(f"| {p['rows']:,} | {p['pool']:,} | failed: {p['error'].splitlines()[0]} | | | | |")
            continue
        rate = p["rows"] * p["pool"] / p["seconds"] / 1e6
        lines.append(f"| {p['rows']:,} | {p['pool']:,} | {p['seconds']:,.1f} | {rate:,.0f} | {p['peak_rss_mib']:,.0f} | "
                     f"{p['embeddings_mib']:,.0f} | {p['extra_mib']:,.0f} |")
    return "\n".join([*lines, "", *_goals(payload["summary"]["rows"]), "", _provenance(payload)]) + "\n"


def tables(folder: Path) -> str:
    """Both tables, each under a heading naming its JSON (a missing JSON is said so)."""
    parts = []
    for name, render in (("data_scale", curation_table), ("mining_scale", mining_table)):
        path = folder / f"{name}.json"
        body = render(json.loads(path.read_text())) if path.is_file() else f"No `{path}`: run `python -m benchmarks.{name}`.\n"
        parts.append(f"#### `{name}.json`\n\n{body}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> str:
    """Print :func:`tables` of ``--out`` (default ``results/benchmarks``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=BENCHMARK_RESULTS_DIR, help="folder holding the two JSON files")
    text = tables(p.parse_args(argv).out)
    print(text)
    return text


if __name__ == "__main__":
    main()
