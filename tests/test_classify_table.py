"""Classification table harness: `reproduce classify` end to end on digits and on a CIFAR-100 python folder, the
paper's shipped figures beside matching rows, resumability."""

import csv
import fnmatch
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from sos_detect.classify.data import read_cifar
from sos_detect.reproduce.classify import PRESETS, published_figures, read_paper_figures
from sos_detect.reproduce.paper import PAPER_DIR, posthoc_lines, table5_map50

REPO = Path(__file__).resolve().parents[1]


def shipped(table: str, **match) -> list[dict]:
    """Rows of a shipped paper CSV, read here with the csv module alone."""
    with open(PAPER_DIR / table, newline="") as f:
        return [r for r in csv.DictReader(f) if all(r[k] == v for k, v in match.items())]


def reproduce(out, *args):
    cmd = [sys.executable, "-m", "sos_detect.cli", "reproduce", "classify", "--preset", "mini"]
    cmd += ["--model", "mlp", "--data", "digits", "--batch", "64", "--schemes", "sgd,sgd+sos", "--out", str(out)]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # trainings in a real process
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
    diff = rows["sgd+sos - sgd"]
    assert float(diff["top1_mean"]) == pytest.approx((d0 + d1) / 2)
    # the A/B harness's paired summary: 95 % t-interval and MDE at 80 % power (1 df), recomputed with scipy
    sd = abs(d0 - d1) / math.sqrt(2)
    half = stats.t.ppf(0.975, 1) * sd / math.sqrt(2)
    assert (float(diff["top1_ci_low"]), float(diff["top1_ci_high"])) == pytest.approx(
        ((d0 + d1) / 2 - half, (d0 + d1) / 2 + half), abs=1e-12
    )
    mde = (stats.t.ppf(0.975, 1) + stats.t.ppf(0.8, 1)) * sd / math.sqrt(2)
    assert float(diff["top1_mde80"]) == pytest.approx(mde, abs=1e-12)
    assert all(0 < float(rows[r]["train_acc_mean"]) <= 1 for r in ("sgd", "sgd+sos"))
    assert float(rows["sgd"]["paper_top1"]) == 90.0 and float(rows["sgd+sos"]["paper_top1"]) == 91.5
    ours = 100 * (done[("sgd", 0)]["top1"] + done[("sgd", 1)]["top1"]) / 2
    md = (tmp_path / "t" / "classify.md").read_text()
    assert f"90.00 / {ours - 90:+.2f}" in md and f"Paper top-1 from {paper}" in md

    # a rerun reads the finished runs back: nothing is retrained
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "t" / "runs").glob("*/model.pt")}
    again = reproduce(tmp_path / "t", "--epochs", 2, "--seeds", "0,1")
    assert (
        again.returncode == 0 and "have no row for model mlp on digits" in (tmp_path / "t" / "classify.md").read_text()
    )
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # other settings in the same folder are refused instead of being mixed into the table
    other = reproduce(tmp_path / "t", "--epochs", 3, "--seeds", "0")
    assert other.returncode == 2 and "done.json" in other.stderr and "epochs 2 → 3" in other.stderr
    assert other.stderr.startswith(f"sos-detect reproduce classify: error: {tmp_path}")  # the message, not its repr
    assert len(other.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # trainings
def test_terminal_preset_plan_and_a_tiny_slice(tmp_path, capsys):
    from sos_detect.classify.models import build_model, final_linear
    from sos_detect.cli import main
    from sos_detect.reproduce.classify import PLANS

    cfg, plan = PRESETS["terminal"], PLANS["terminal"]
    width = final_linear(build_model(cfg.model, 10, 1))[1].in_features  # m of the shifted layer: 64
    assert (cfg.data, cfg.sos_mode, cfg.epochs) == ("digits", "paper", 200) and len(plan["seeds"]) >= 8
    assert plan["schemes"] == ("sgd", "sgd+sos") and plan["sos_batches"][0] == 10  # b from the number of classes
    assert plan["sos_batches"][-1] == round(0.6 * width) and list(plan["sos_batches"]) == sorted(plan["sos_batches"])
    # a tiny slice with the preset's sweep: one seed (no interval to print), 2 epochs on 200 training images
    args = ["reproduce", "classify", "--preset", "terminal", "--train-subset", "200"]
    assert main([*args, "--epochs", "2", "--seeds", "0", "--out", str(tmp_path / "t")]) == 0
    rows = {r["row"]: r for r in csv.DictReader((tmp_path / "t" / "classify.csv").read_text().splitlines())}
    sweep = [f"sgd+sos b={b}" for b in plan["sos_batches"]]
    assert list(rows) == ["sgd", *sweep, *(f"{r} - sgd" for r in sweep)]
    for b in plan["sos_batches"]:
        done = json.loads((tmp_path / "t" / "runs" / f"sgd_sos_b{b}_s0" / "done.json").read_text())
        assert (done["config"]["sos_batch"], done["config"]["epochs"], done["config"]["model"]) == (b, 2, "mlp")
        assert float(rows[f"sgd+sos b={b}"]["train_acc_mean"]) == pytest.approx(done["train_acc"])
    md = (tmp_path / "t" / "classify.md").read_text()
    assert "n = 1: no interval" in md and "± 0.00" not in md and "train acc (%)" in md
    # without --seeds the preset's 8 seeds run
    assert main([*args, "--schemes", "sgd", "--epochs", "1", "--out", str(tmp_path / "s")]) == 0
    assert sorted(p.name for p in (tmp_path / "s" / "runs").iterdir()) == [f"sgd_s{s}" for s in plan["seeds"]]
    capsys.readouterr()


@pytest.mark.slow  # trainings in worker processes
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--jobs 2 needs two cores to pin")
def test_jobs_side_by_side_give_the_sequential_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per run both ways
    args = ["--preset", "terminal", "--epochs", "2", "--train-subset", "200", "--seeds", "0,1", "--sos-batch", "10"]
    for jobs in (1, 2):
        cmd = [sys.executable, "-m", "sos_detect.cli", "reproduce", "classify", *args, "--jobs", str(jobs)]
        res = subprocess.run([*cmd, "--out", str(tmp_path / f"j{jobs}")], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "j2" / "classify.csv").read_text() == (tmp_path / "j1" / "classify.csv").read_text()
    logs = sorted(p.name for p in (tmp_path / "j2" / "logs").glob("*.log"))
    assert logs == sorted(f"{run}_s{s}.log" for run in ("sgd", "sgd_sos_b10") for s in (0, 1))
    assert not (tmp_path / "j1" / "logs").exists()  # one after another: in this process, as before


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


def write_cifar(root: Path, name: str, n_train: int, n_test: int, seed: int = 0) -> dict:
    """A tiny CIFAR folder in the python pickle layout torchvision reads (random pixels, labels in turn)."""
    folder, files, test, key, classes = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels", 10),
        "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", 100),
    }[name]
    rng = np.random.default_rng(seed)
    (root / folder).mkdir(parents=True)
    written = {}
    for file, n in [(f, n_train // len(files)) for f in files] + [(test, n_test)]:
        data, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), [i % classes for i in range(n)]
        entry = {"batch_label": file, "data": data, key: labels, "filenames": [f"{file}_{i}.png" for i in range(n)]}
        if name == "cifar100":
            entry["coarse_labels"] = [c // 5 for c in labels]
        (root / folder / file).write_bytes(pickle.dumps(entry))
        written[file] = (data, labels)
    meta = ("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    if name == "cifar100":
        meta = (
            "meta",
            {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]},
        )
    (root / folder / meta[0]).write_bytes(pickle.dumps(meta[1]))
    return written


def test_read_cifar_python_layout(tmp_path):
    written = write_cifar(tmp_path, "cifar10", n_train=50, n_test=7)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the folder holding it, or the folder itself
        (x, y), (xt, yt) = read_cifar(root, "cifar10")
        assert x.shape == (50, 3, 32, 32) and xt.shape == (7, 3, 32, 32)
        np.testing.assert_array_equal(x[10:20].reshape(10, -1), written["data_batch_2"][0])  # batches in order
        assert y.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
        # row 0 of an image is its first 32 red values, as the CIFAR page documents
        np.testing.assert_array_equal(xt[3, 0, 0], written["test_batch"][0][3, :32])
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        read_cifar(tmp_path, "cifar10")


@pytest.mark.slow  # trainings in real processes
def test_paper_preset_on_a_cifar100_python_folder(tmp_path):
    """The path a CIFAR user takes: `--preset paper --root` on a cifar-100-python folder (written here, tiny) with the
    preset's model and SOS settings (ResNet-18 CIFAR stem, paper mode, step LR); the paper's Table 3 figure beside
    SGD and, in an SOS-batch sweep, Table 4's beside SGD+SOS. Then `classify shift` on the SGD model, Table 1 beside."""
    write_cifar(tmp_path / "data", "cifar100", n_train=64, n_test=32)
    cmd = [sys.executable, "-m", "sos_detect.cli", "reproduce", "classify", "--preset", "paper"]
    cmd += ["--root", str(tmp_path / "data"), "--device", "cpu", "--epochs", "1", "--seeds", "0"]
    cmd += ["--schemes", "sgd,sgd+sos", "--sos-batch", "200", "--out", str(tmp_path / "t")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    runs = tmp_path / "t" / "runs"
    config = json.loads((runs / "sgd_sos_b200_s0" / "done.json").read_text())["config"]
    assert (config["model"], config["data"], config["imgsz"], config["sos_mode"]) == (
        "resnet18",
        "cifar100",
        32,
        "paper",
    )
    assert (config["sos_batch"], config["batch_size"], config["weight_decay"]) == (200, 64, 1e-4)
    (entry,) = [json.loads(x) for x in (runs / "sgd_sos_b200_s0" / "sos_log.jsonl").read_text().splitlines()]
    layer = entry["layers"][0]
    assert entry["applied"] and layer["rows"] == 64 and layer["rank"] <= 64  # b = 200 asked, all 64 images taken
    assert layer["norm_after"] < layer["norm_before"]  # 64 rows cannot span the 512 inputs of fc

    rows = {r["row"]: r for r in csv.DictReader((tmp_path / "t" / "classify.csv").read_text().splitlines())}
    assert list(rows) == ["sgd", "sgd+sos b=200", "sgd+sos b=200 - sgd"]
    (t3,) = shipped(
        "table3_training_schemes.csv", model="resnet18", data="cifar100", augmentation="basic", scheme="sgd"
    )
    (t4,) = shipped("table4_sos_batch.csv", model="resnet18", sos_batch="200")
    md = (tmp_path / "t" / "classify.md").read_text()
    for row, paper, source in (("sgd", t3, "Table 3"), ("sgd+sos b=200", t4, "Table 4")):
        assert (float(rows[row]["paper_top1"]), float(rows[row]["paper_top1_std"])) == (
            float(paper["top1"]),
            float(paper["top1_std"]),
        )
        assert rows[row]["paper_source"] == source
        ours = 100 * float(rows[row]["top1_mean"]) - float(paper["top1"])
        assert f"{paper['top1']} ± {paper['top1_std']} / {ours:+.2f} ({source})" in md
    assert "arXiv 2405.14111" in md and "Table 4 at b = 300 is not Table 3" in md

    weights = runs / "sgd_s0" / "model.pt"
    cmd = [sys.executable, "-m", "sos_detect.cli", "classify", "shift", "--model", "resnet18", "--data", "cifar100"]
    cmd += ["--root", str(tmp_path / "data"), "--weights", str(weights), "--device", "cpu", "--sos-batch", "32"]
    shift = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert shift.returncode == 0, shift.stderr[-2000:]
    for aug in ("basic", "mixup"):
        before, after = (
            shipped("table1_posthoc_cifar.csv", model="resnet18", data="cifar100", augmentation=aug, when=w)[0]
            for w in ("before", "after")
        )
        line = (
            f"paper, Table 1 (resnet18, cifar100, {aug} augmentation): top-1 {before['top1']} ± {before['top1_std']} → "
            f"{after['top1']} ± {after['top1_std']} %"
        )
        assert line in shift.stdout
    assert "ours: top-1" in shift.stdout


def test_published_figures_match_on_model_data_augmentation_scheme_and_b():
    base = PRESETS["paper"]  # resnet18, cifar100, no Mixup
    labels = {"sam+sos": ("sam+sos", None), "sgd+sos b=400": ("sgd+sos", 400), "nso": ("nso", None)}
    labels |= {"sgd+sos b=100": ("sgd+sos", 100), "sam+sos b=200": ("sam+sos", 200)}
    found = published_figures(base, labels)
    (sam_sos,) = shipped(
        "table3_training_schemes.csv", model="resnet18", data="cifar100", augmentation="basic", scheme="sam+sos"
    )
    (b400,) = shipped("table4_sos_batch.csv", model="resnet18", sos_batch="400")
    assert found == {
        "sam+sos": ((float(sam_sos["top1"]), float(sam_sos["top1_std"])), "Table 3"),
        "sgd+sos b=400": ((float(b400["top1"]), float(b400["top1_std"])), "Table 4"),
    }  # NSO is not in the paper; Table 4 has b = 200, 300, 400 for SGD + SOS only
    from dataclasses import replace

    (mix,) = shipped(
        "table3_training_schemes.csv", model="vgg16_bn", data="cifar10", augmentation="mixup", scheme="sgd"
    )
    found = published_figures(replace(base, model="vgg16_bn", data="cifar10", mixup=1.0), {"sgd": ("sgd", None)})
    assert found == {"sgd": ((float(mix["top1"]), float(mix["top1_std"])), "Table 3")}
    assert published_figures(replace(base, data="cifar10"), {"sgd+sos b=200": ("sgd+sos", 200)}) == {}  # T4: CIFAR-100


def test_posthoc_and_detection_figures_come_from_the_shipped_tables():
    (b,), (a,) = (shipped("table2_posthoc_imagenet.csv", model="resnet50", when=w) for w in ("before", "after"))
    (line, cite) = posthoc_lines("resnet50_imagenet", "imagefolder", 1000)
    assert (
        f"top-1 {b['top1']} → {a['top1']} ± {a['top1_std']} %, top-5 {b['top5']} → {a['top5']} ± {a['top5_std']} %"
        in line
    )
    assert "arXiv 2405.14111" in cite and "README.md" in cite
    assert posthoc_lines("resnet50_imagenet", "imagefolder", 10) == []  # not ImageNet
    # Table 2's ShuffleNet is torchvision's x2_0: its "before" figures are that model's published ImageNet accuracy
    import torchvision

    (shuffle,) = shipped("table2_posthoc_imagenet.csv", when="before", model="shufflenet_v2_x2_0")
    meta = torchvision.models.get_model_weights("shufflenet_v2_x2_0").DEFAULT.meta["_metrics"]["ImageNet-1K"]
    assert abs(float(shuffle["top1"]) - meta["acc@1"]) < 0.01 and abs(float(shuffle["top5"]) - meta["acc@5"]) < 0.01
    assert "76.23" in posthoc_lines("shufflenet_v2_x2_0", "imagefolder", 1000)[0]
    assert posthoc_lines("shufflenet_v2_x1_0", "imagefolder", 1000) == []  # 69.36 / 88.32: not in the paper
    assert posthoc_lines("smallcnn", "cifar10", 10) == []
    rows = shipped("table5_voc_detection.csv")
    assert table5_map50() == {
        m: tuple(float(r["map50"]) for arm in ("baseline", "sos") for r in rows if (r["model"], r["arm"]) == (m, arm))
        for m in ("yolov5s", "yolov5x")
    }


def test_paper_tables_ship_as_package_data():
    """Every file of the paper folder is matched by pyproject's package-data patterns (so a wheel carries it)."""
    from setuptools.config.pyprojecttoml import read_configuration

    patterns = read_configuration(REPO / "pyproject.toml")["tool"]["setuptools"]["package-data"]["sos_detect.reproduce"]
    files = sorted(p.relative_to(PAPER_DIR.parent).as_posix() for p in PAPER_DIR.iterdir())
    assert len(files) == 6 and "paper/README.md" in files
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files)
