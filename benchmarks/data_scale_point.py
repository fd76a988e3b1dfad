"""One point of :mod:`benchmarks.data_scale`: the streamed curation of one synthetic hub set, in
this (fresh) process, printing seconds and peak RSS as one JSON line.

    python -m benchmarks.data_scale_point --data DIR --eval-texts FILE --work DIR

Imports only what the curation path imports (no benchmark helpers, no model code), so the peak
RSS is the curation's: ``VmHWM`` of this process (datatrove's local executor runs the tasks in
it), plus the largest child's ``ru_maxrss`` (the executor's manager process) reported apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from pathlib import Path

from kalm_lib.config import load_profile
from kalm_lib.data_cards import load_cards
from kalm_lib.layout import DATA_CARDS_DIR
from kalm_lib.scale import StreamSettings, curate_stream

SOURCE, DERIVED = "hub_s2orc_title_abstract", "pt_hub_s2orc_title_abstract"  # a paper hub card and its set
PROFILE = "gpu-qwen2-0.5b"  # the paper profile: its length filter and near-duplicate thresholds


def status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (steadier than wall
    seconds on a shared host)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> dict:
    """Curate ``--data``'s Parquet files (the source card's hub schema) with the paper profile's filter
    settings, no cap, one worker (every task in this process: its ``VmHWM`` is the peak), and print
    the measurement."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder of Parquet files with the source card's hub columns")
    p.add_argument("--eval-texts", type=Path, required=True, help="JSON list of evaluation texts to decontaminate against")
    p.add_argument("--work", type=Path, required=True, help="folder for intermediate and output shards")
    p.add_argument("--shard-rows", type=int, default=100_000)
    args = p.parse_args(argv)
    cards = load_cards(DATA_CARDS_DIR / "paper")
    eval_texts = frozenset(json.loads(args.eval_texts.read_text()))
    data = load_profile(PROFILE).data
    settings = dataclasses.replace(StreamSettings.from_config(data, cap=0, seed=0), shard_rows=args.shard_rows, workers=1)
    baseline = status_mib("VmRSS")
    began, cpu = time.perf_counter(), cpu_seconds()
    counts = curate_stream(cards[DERIVED], cards[SOURCE], settings, frozenset(), eval_texts, args.work / "out", args.work / "tmp",
                           data_files=sorted(args.data.glob("*.parquet")))
    seconds, cpu = time.perf_counter() - began, cpu_seconds() - cpu
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": status_mib("VmHWM"), "baseline_rss_mib": baseline,
              "children_peak_rss_mib": children, "counts": counts}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
