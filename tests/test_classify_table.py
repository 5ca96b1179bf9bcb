"""Classification table harness: `reproduce classify` end to end on digits, paper figures beside, resumability."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sos_detect.reproduce.classify import read_paper_figures


def reproduce(out, *args):
    cmd = [sys.executable, "-m", "sos_detect.cli", "reproduce", "classify", "--preset", "mini"]
    cmd += ["--model", "mlp", "--data", "digits", "--batch", "64", "--schemes", "sgd,sgd+sos", "--out", str(out)]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=600)


def test_mini_harness_on_digits_with_paper_figures(tmp_path):
    # Stand-in figures written by this test, not the paper's: they exercise the side-by-side columns.
    paper = tmp_path / "paper.csv"
    paper.write_text("scheme,top1\nsgd,90.00\nsgd+sos,91.50\n")
    res = reproduce(tmp_path / "t", "--epochs", 2, "--seeds", "0,1", "--paper-figures", paper)
    assert res.returncode == 0, res.stderr[-2000:]

    done = {
        (scheme, seed): json.loads((tmp_path / "t" / "runs" / f"{scheme}_s{seed}" / "done.json").read_text())
        for scheme in ("sgd", "sgd_sos")
        for seed in (0, 1)
    }
    assert all(d["config"]["epochs"] == 2 and d["config"]["data"] == "digits" for d in done.values())
    rows = {r["row"]: r for r in csv.DictReader((tmp_path / "t" / "classify.csv").read_text().splitlines())}
    assert list(rows) == ["sgd", "sgd+sos", "sgd+sos - sgd"]
    # mean ± sample std and the paired difference, recomputed from the runs' own records
    for scheme, key in (("sgd", "sgd"), ("sgd+sos", "sgd_sos")):
        a, b = done[(key, 0)]["top1"], done[(key, 1)]["top1"]
        assert float(rows[scheme]["top1_mean"]) == pytest.approx((a + b) / 2)
        assert float(rows[scheme]["top1_std"]) == pytest.approx(abs(a - b) / math.sqrt(2))
    d0, d1 = (done[("sgd_sos", s)]["top1"] - done[("sgd", s)]["top1"] for s in (0, 1))
    assert float(rows["sgd+sos - sgd"]["top1_mean"]) == pytest.approx((d0 + d1) / 2)
    assert float(rows["sgd"]["paper_top1"]) == 90.0 and float(rows["sgd+sos"]["paper_top1"]) == 91.5
    ours = 100 * (done[("sgd", 0)]["top1"] + done[("sgd", 1)]["top1"]) / 2
    md = (tmp_path / "t" / "classify.md").read_text()
    assert f"90.00 / {ours - 90:+.2f}" in md and f"Paper top-1 from {paper}" in md

    # a rerun reads the finished runs back: nothing is retrained
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "t" / "runs").glob("*/model.pt")}
    again = reproduce(tmp_path / "t", "--epochs", 2, "--seeds", "0,1")
    assert again.returncode == 0 and "not bundled" in (tmp_path / "t" / "classify.md").read_text()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # other settings in the same folder are refused instead of being mixed into the table
    other = reproduce(tmp_path / "t", "--epochs", 3, "--seeds", "0")
    assert other.returncode == 2 and "done.json" in other.stderr and "epochs 2 → 3" in other.stderr
    assert other.stderr.startswith(f"sos-detect reproduce classify: error: {tmp_path}")  # the message, not its repr
    assert len(other.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "text,error",
    [
        ("scheme,acc\nsgd,90\n", "columns scheme,top1"),
        ("scheme,top1\nadam,90\n", ":2: unknown scheme 'adam'"),
        ("scheme,top1\nsgd,90\nsam,ninety\n", ":3: top1 must be a number"),
        ("scheme,top1\nsgd,0.9\nsam,120\n", ":3: top1 is in percent"),
    ],
)
def test_paper_figures_file_errors_name_file_and_line(tmp_path, text, error):
    path = tmp_path / "paper.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=error) as err:
        read_paper_figures(path)
    assert str(path) in str(err.value)


def test_paper_figures_read_back(tmp_path):
    path = tmp_path / "paper.csv"
    path.write_text("scheme,top1\nsgd,76.5\nsam+sos,78.25\n")
    assert read_paper_figures(path) == {"sgd": 76.5, "sam+sos": 78.25}
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_paper_figures(tmp_path / "missing.csv")
    assert not Path(tmp_path / "missing.csv").exists()


def test_paper_preset_runs_offline_with_digits_in_place_of_cifar(tmp_path):
    """The paper preset's model and SOS settings (ResNet-18 CIFAR stem, paper mode b = 300 < 512, step LR, SAM
    ρ = 0.1) end to end on CPU; only the data (digits, shipped by scikit-learn) and the length differ."""
    cmd = [sys.executable, "-m", "sos_detect.cli", "reproduce", "classify", "--preset", "paper", "--data", "digits"]
    cmd += ["--device", "cpu", "--epochs", "1", "--seeds", "0", "--schemes", "sam+sos", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "runs" / "sam_sos_s0"
    config = json.loads((run / "done.json").read_text())["config"]
    assert (config["model"], config["sos_mode"], config["sos_batch"], config["rho"]) == ("resnet18", "paper", 300, 0.1)
    (entry,) = [json.loads(x) for x in (run / "sos_log.jsonl").read_text().splitlines()]
    layer = entry["layers"][0]
    assert entry["applied"] and layer["rows"] == 300 and layer["rank"] <= 300
    assert layer["norm_after"] < layer["norm_before"]  # 300 rows cannot span the 512 inputs of fc
