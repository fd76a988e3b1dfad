"""Old versus new near-duplicate engine on a profile's curation: per-set row counts and time.

Runs :func:`kalm_lib.curation.curate` (what notebook 00's ``run_curation`` runs, without writing)
twice on the profile's cards, once with ``data.dedup_engine=datasketch`` (the in-memory LSH used
before issue #14) and once with ``datatrove`` (the default), and reports every summary column per
set for both, their differences, and each run's wall and CPU seconds (CPU seconds are steadier on a
shared host).

    python -m benchmarks.curation_engines [--profile cpu] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from kalm_lib.config import load_profile
from kalm_lib.curation import curate
from kalm_lib.layout import REPO_ROOT, RESULTS_DIR

ENGINES = ("datasketch", "datatrove")
COLUMNS = ["built", "after_length", "after_exact_dedup", "after_decontamination", "eval_near_duplicates",
           "after_near_dedup_of_pool", "kept"]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(profile: str, engine: str) -> dict[str, Any]:
    """Curate ``profile`` with ``engine``: its summary rows, wall and CPU seconds."""
    cfg = load_profile(profile)
    data = replace(cfg.data, dedup_engine=engine)
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = curate(data, cfg.seed, REPO_ROOT / data.cards_dir)
    return {"engine": engine, "wall_seconds": time.perf_counter() - wall, "cpu_seconds": cpu_seconds() - cpu,
            "summary": result.summary}


def table(runs: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per set: each engine's rows after near-dedup and kept, and the differences."""
    frames = {r["engine"]: pd.DataFrame(r["summary"]).set_index("set")[COLUMNS] for r in runs}
    old, new = frames["datasketch"], frames["datatrove"]
    return pd.DataFrame({
        "after_near_dedup_old": old["after_near_dedup_of_pool"],
        "after_near_dedup_new": new["after_near_dedup_of_pool"],
        "difference": new["after_near_dedup_of_pool"] - old["after_near_dedup_of_pool"],
        "kept_old": old["kept"],
        "kept_new": new["kept"],
        "earlier_steps_equal": (old[COLUMNS[:5]] == new[COLUMNS[:5]]).all(axis=1),
    })


def markdown(frame: pd.DataFrame) -> str:
    """The comparison as a markdown table (set names first)."""
    lines = [f"| set | {' | '.join(frame.columns)} |", "|" + " --- |" * (len(frame.columns) + 1)]
    lines += [f"| {name} | {' | '.join(str(v) for v in row)} |" for name, row in zip(frame.index, frame.itertuples(index=False))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both engines and write ``curation_engines.json``; print the comparison table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "benchmarks")
    args = p.parse_args(argv)
    runs = [run(args.profile, engine) for engine in ENGINES]
    compared = table(runs)
    payload = {"profile": args.profile, "runs": runs, "table": compared.reset_index().to_dict("records")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curation_engines.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(markdown(compared))
    for r in runs:
        print(f"{r['engine']}: {r['wall_seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU")
    return payload


if __name__ == "__main__":
    main()
