"""Table 5 presets of the A/B harness: statistics by hand, the published figures beside the right arms, and the
mini preset end to end with the paper-mode arm."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sos_detect.core.stats import mean_std, paired_differences
from sos_detect.reproduce.ab_report import aggregate
from sos_detect.reproduce.table5 import PRESETS, published


def test_mean_std_and_paired_differences():
    m, s = mean_std([0.80, 0.82, 0.84])
    assert m == pytest.approx(0.82) and s == pytest.approx(0.02)  # sample std: sqrt((4e-4 + 0 + 4e-4) / 2)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))
    assert paired_differences({0: 0.9, 1: 0.7, 2: 0.5}, {0: 0.8, 1: 0.75}) == pytest.approx({0: 0.1, 1: -0.05})


def test_paper_preset_arms_and_published_figures():
    cfg = PRESETS["paper"]
    assert list(cfg.arms) == ["base", "guarded-1e-4", "paper-b32"] and cfg.arms["base"] == {"sos": False}
    assert cfg.arms["paper-b32"] == {"sos_mode": "paper", "sos_rows": 32, "sos_max_change": None, "sos_order": "start"}
    assert published() == {"yolov5s": {"base": 83.4, "paper-b32": 83.7}, "yolov5x": {"base": 87.1, "paper-b32": 87.4}}
    results = [
        {"model": "yolov5s", "seed": s, "arm": arm, "map50": v, "map5095": v / 2, "voc07": math.nan}
        for s, (b, t) in enumerate([(0.80, 0.81), (0.82, 0.85)])
        for arm, v in (("base", b), ("paper-b32", t))
    ]
    rows, md = aggregate(results, ["base", "paper-b32"], cfg.reference)
    base = next(r for r in rows if r["row"] == "base")
    diff = next(r for r in rows if r["row"] == "paper-b32 - base" and r["metric"] == "map50")
    assert base["map50_mean"] == pytest.approx(0.81) and base["map50_std"] == pytest.approx(math.sqrt(2e-4))
    assert diff["mean"] == pytest.approx(0.02) and diff["std"] == pytest.approx(math.sqrt(2e-4))
    assert json.loads(diff["per_seed"]) == pytest.approx({"0": 0.01, "1": 0.03})
    assert base["reference_map50"] == 83.4 and "| paper-b32 | 2 | 83.00 ± 2.83" in md and "s1: +3.00" in md


@pytest.mark.slow  # trainings in a real process
def test_mini_preset_one_seed_two_epochs(tmp_path):
    cmd = [sys.executable, "-m", "sos_detect.cli", "reproduce", "table5", "--preset", "mini", "--seeds", "0"]
    cmd += ["--epochs", "2", "--arms", "base,paper-b32", "--out", str(tmp_path)]  # order start: a shift before epoch 2
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-2000:]
    for name in ("table5.md", "table5.csv", "table5_effect.png", "table5_curves_yolov5n.png"):
        assert (tmp_path / name).is_file()
    rows = list(csv.DictReader(Path(tmp_path / "table5.csv").read_text().splitlines()))
    assert [r["row"] for r in rows[:2]] == ["base", "paper-b32"]
    done = {
        arm: json.loads((tmp_path / "runs" / f"yolov5n_s0_{arm}" / "done.json").read_text())
        for arm in ("base", "paper-b32")
    }
    assert float(rows[0]["map50_mean"]) == pytest.approx(done["base"]["map50"])
    diff = next(r for r in rows if r["row"] == "paper-b32 - base" and r["metric"] == "map50")
    assert float(diff["mean"]) == pytest.approx(done["paper-b32"]["map50"] - done["base"]["map50"])
    assert done["paper-b32"]["settings"]["pretrained"].endswith("yolov5n-trees.pt")
    log = [
        json.loads(x) for x in (tmp_path / "runs" / "yolov5n_s0_paper-b32" / "sos_log.jsonl").read_text().splitlines()
    ]
    assert [(e["epoch"], e["order"]) for e in log] == [(2, "start"), (2, "start")]  # model and EMA, Algorithm 1
    assert all(layer["rows"] == 32 for e in log for layer in e["layers"])
    assert not (tmp_path / "runs" / "yolov5n_s0_base" / "sos_log.jsonl").exists()


def test_jobs_beyond_the_cores_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    import os

    from conftest import cli_error

    monkeypatch.chdir(tmp_path)
    cores = len(os.sched_getaffinity(0))
    line = cli_error(capsys, "reproduce", "table5", "--jobs", cores + 1, "--out", tmp_path / "t5")
    assert line.endswith(f"error: --jobs {cores + 1}: must be between 1 and the {cores} cores this process may use")
    assert list(tmp_path.iterdir()) == []
