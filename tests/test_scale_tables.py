"""The README's data-at-scale tables are computed from the benchmark JSON, cost per million rows included."""

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.scale_tables import tables  # noqa: E402

MACHINE = {"git": {"commit": "abcdef0123456789", "dirty": False}, "processor": "CPU X", "usable_cores": 2, "cuda_device": None,
           "utc_time": "2026-01-01T00:00:00+00:00"}


def curation_point(rows: int, seconds: float, cpu: float, peak: float) -> dict:
    return {"stage": "curation", "rows": rows, "pool": None, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": peak,
            "baseline_rss_mib": 360.0, "counts": {"kept": rows - 7}}


def test_tables_compute_cost_per_million_rows_and_rates(tmp_path):
    points = [curation_point(200_000, 150.0, 100.0, 500.0), curation_point(4_000_000, 2_400.0, 2_000.0, 600.0)]
    data = {"machine": MACHINE, "settings": {"threads": 1, "sizes": [200_000, 4_000_000]},
            "summary": {"points": points, "rows": [{"metric": "peak RSS ratio", "value": 1.2, "goal": "<= 1.5", "met": True}]}}
    mining = {"machine": {**MACHINE, "git": {"commit": "0123456", "dirty": True}}, "settings": {"threads": 2},
              "raw": {"points": [{"rows": 1_000, "pool": 50_000, "seconds": 2.0, "peak_rss_mib": 900.0, "embeddings_mib": 74.7,
                                  "extra_mib": 180.2},
                                 {"rows": 10_000, "pool": 50_000, "error": "exit -9: killed\nmore"}]},
              "summary": {"rows": [{"metric": "growth", "value": None, "goal": "<= 64", "met": None}]}}
    (tmp_path / "data_scale.json").write_text(json.dumps(data))
    (tmp_path / "mining_scale.json").write_text(json.dumps(mining))
    text = tables(tmp_path)
    # 1e6 x 150 / 2e5 = 750 wall s and 1e6 x 100 / 2e5 = 500 CPU s per million rows; 1e6 x 2.4e3 / 4e6 = 600 and 1e6 x 2e3 / 4e6 = 500
    assert "| 200,000 | 150 | 100 | 500 | 360 | 750 | 500 | 199,993 |" in text
    assert "| 4,000,000 | 2,400 | 2,000 | 600 | 360 | 600 | 500 | 3,999,993 |" in text
    assert "- peak RSS ratio: 1.2 (goal <= 1.5, met: yes)" in text
    # 1e3 x 5e4 / 2 s = 25e6 scores per second
    assert "| 1,000 | 50,000 | 2.0 | 25 | 900 | 75 | 180 |" in text
    assert "| 10,000 | 50,000 | failed: exit -9: killed |" in text
    assert "Commit `abcdef0` (clean)" in text and "Commit `0123456` with uncommitted changes" in text


def test_tables_say_which_json_is_missing(tmp_path):
    text = tables(tmp_path)
    assert "run `python -m benchmarks.data_scale`" in text and "run `python -m benchmarks.mining_scale`" in text


def test_curation_table_names_sizes_asked_for_but_not_measured(tmp_path):
    points = [curation_point(100_000, 70.0, 70.0, 580.0), curation_point(1_000_000, 700.0, 700.0, 600.0)]
    data = {"machine": MACHINE, "settings": {"threads": 1, "sizes": [100_000, 1_000_000, 10_000_000]},
            "summary": {"points": points, "rows": [{"metric": "peak RSS ratio", "value": 1.03, "goal": "<= 1.5", "met": None}]}}
    (tmp_path / "data_scale.json").write_text(json.dumps(data))
    text = tables(tmp_path)
    assert "Not measured (asked for): 10,000,000 rows" in text and "(goal <= 1.5, met: –)" in text
