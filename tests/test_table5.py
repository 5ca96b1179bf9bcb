"""Table 5 harness: aggregation statistics by hand, and a reduced mini preset end to end."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sos_detect.reproduce.stats import mean_std, paired_differences
from sos_detect.reproduce.table5 import aggregate


def test_mean_std_and_paired_differences():
    m, s = mean_std([0.80, 0.82, 0.84])
    assert m == pytest.approx(0.82) and s == pytest.approx(0.02)  # sample std: sqrt((4e-4 + 0 + 4e-4) / 2)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))
    assert paired_differences({0: 0.9, 1: 0.7, 2: 0.5}, {0: 0.8, 1: 0.75}) == pytest.approx({0: 0.1, 1: -0.05})


def test_aggregate_rows():
    results = [
        {"model": "yolov5s", "seed": s, "arm": arm, "map50": v, "map5095": v / 2, "voc07": float("nan")}
        for s, (b, t) in enumerate([(0.80, 0.81), (0.82, 0.85)])
        for arm, v in (("base", b), ("sos", t))
    ]
    rows, md = aggregate(results)
    base = next(r for r in rows if r["row"] == "base")
    diff = next(r for r in rows if r["row"] == "sos-base map50")
    assert base["map50_mean"] == pytest.approx(0.81) and base["map50_std"] == pytest.approx(math.sqrt(2e-4))
    assert diff["map50_mean"] == pytest.approx(0.02) and diff["map50_std"] == pytest.approx(math.sqrt(2e-4))
    assert json.loads(diff["per_seed"]) == {"0": 0.01, "1": 0.03}
    assert base["paper_map50"] == 83.4 and "+0.3" in md and "s1: +3.00" in md
    assert not any(r["row"] == "sos-base voc07" for r in rows)  # not measured: no row


def test_mini_preset_one_seed_one_epoch(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "sos_detect.cli",
        "reproduce",
        "table5",
        "--preset",
        "mini",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--out",
        str(tmp_path),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    for name in ("table5.md", "table5.csv", "table5.png"):
        assert (tmp_path / name).is_file()
    rows = list(csv.DictReader(Path(tmp_path / "table5.csv").read_text().splitlines()))
    assert [r["row"] for r in rows] == ["base", "sos", "sos-base map50", "sos-base map5095"]
    done = {
        arm: json.loads((tmp_path / "runs" / f"yolov5n_s0_{arm}" / "done.json").read_text()) for arm in ("base", "sos")
    }
    assert float(rows[0]["map50_mean"]) == pytest.approx(done["base"]["map50"])
    assert float(rows[2]["map50_mean"]) == pytest.approx(done["sos"]["map50"] - done["base"]["map50"])
    assert (tmp_path / "runs" / "yolov5n_s0_sos" / "sos_log.jsonl").is_file()
    assert not (tmp_path / "runs" / "yolov5n_s0_base" / "sos_log.jsonl").exists()
    # a rerun trains nothing: finished arms are read back
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Starting training" not in again.stdout + again.stderr
