"""The `sos-detect` CLI as a user runs it: real processes, the shipped trained checkpoint, bad input (in this process:
the errors come before anything runs)."""

import hashlib
import json
import re
import shutil

import pytest
import torch
from conftest import cli_error, run_cli, snapshot
from ultralytics import YOLO
from ultralytics.nn.tasks import ClassificationModel
from ultralytics.utils.patches import torch_load

from sos_detect.detect.embedded import EMBEDDED_YAML, REPO_ROOT
from sos_detect.detect.heads import detect_head_layers

CKPT = REPO_ROOT / "data" / "checkpoints" / "yolov5n-trees.pt"


def cli(*args, timeout=600, cwd=None):
    return run_cli(*args, timeout=timeout, cwd=cwd)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def map50(text: str, label: str) -> float:
    return float(re.search(rf"{label}\s*mAP50 ([0-9.]+)", text).group(1))


@pytest.mark.slow  # validation in real processes
def test_val_reproduces_the_checkpoints_own_metrics(tmp_path):
    """No --imgsz, --batch, --data: the checkpoint's own (320 px, the tree data) and twice its batch 8, as its
    training validated, said on the first line; no numpy warning, no runs/detect/val folder in the working folder."""
    res = cli("val", "--weights", CKPT, "--device", "cpu", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    first = res.stdout.splitlines()[0]
    assert first.startswith(
        "val: imgsz 320 (the checkpoint's), batch 16 (2 × the checkpoint's 8, as its training validated), data "
    )
    assert first.endswith("(the checkpoint's: the embedded tree dataset)")
    printed = float(re.search(r"mAP50 ([0-9.]+)", res.stdout).group(1))
    stored = torch_load(CKPT, map_location="cpu")["train_metrics"]["metrics/mAP50(B)"]
    assert stored > 0.02  # a real, if small, detector
    assert printed == pytest.approx(stored, abs=0.01)
    assert "Warning" not in res.stderr and snapshot(tmp_path) == {}


@pytest.mark.slow  # shift and validation in real processes
def test_shift_writes_a_loadable_checkpoint_and_keeps_map(tmp_path):
    before_hash = sha(CKPT)
    out = tmp_path / "shifted.pt"
    res = cli("shift", "--weights", CKPT, "--out", out, "--device", "cpu", "--sos-tau", "1e-4", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sha(CKPT) == before_hash  # input untouched
    assert sorted(snapshot(tmp_path)) == [str(out)]  # no stray runs/detect/val*
    assert "box.0" in res.stdout and "cls.2" in res.stdout
    assert res.stdout.index("before:") < res.stdout.index("box.0") < res.stdout.index("after:")  # in the order done
    before, after = map50(res.stdout, "before:"), map50(res.stdout, "after:")
    assert abs(after - before) <= 0.01
    # independent: the written file loads, validates to the printed figure, and its heads are smaller
    metrics = YOLO(str(out)).val(data=str(EMBEDDED_YAML), imgsz=320, batch=8, device="cpu", plots=False, verbose=False)
    assert float(metrics.box.map50) == pytest.approx(after, abs=1e-4)

    def norm(path):
        ckpt = torch_load(path, map_location="cpu")
        model = ckpt.get("ema") or ckpt["model"]
        return sum(float(m.weight.float().norm()) ** 2 for m in detect_head_layers(model).values())

    assert norm(out) < norm(CKPT)


@pytest.mark.slow  # validations in real processes
def test_val_uses_the_checkpoints_own_settings(tmp_path):
    """imgsz, data and twice the batch from the checkpoint's train args (here 160 px, batch 4, a copy of the tree
    data YAML)."""
    ckpt = torch_load(CKPT, map_location="cpu")
    data = tmp_path / "trees.yaml"
    data.write_text(
        f"path: {REPO_ROOT / 'data' / 'deepforest'}\ntrain: images/train\nval: images/val\nnames:\n  0: Tree\n"
    )
    ckpt["train_args"].update(imgsz=160, batch=4, data=str(data))
    torch.save(ckpt, tmp_path / "ck.pt")
    work = tmp_path / "work"
    work.mkdir()
    res = cli("val", "--weights", tmp_path / "ck.pt", "--device", "cpu", cwd=work)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines()[0] == (
        f"val: imgsz 160 (the checkpoint's), batch 8 (2 × the checkpoint's 4, as its training validated), "
        f"data {data} (the checkpoint's)"
    )
    metrics = YOLO(str(tmp_path / "ck.pt")).val(
        data=str(data), imgsz=160, batch=8, device="cpu", plots=False, verbose=False, project=str(tmp_path / "v")
    )
    assert map50(res.stdout, f"{tmp_path / 'ck.pt'}:") == pytest.approx(float(metrics.box.map50), abs=1e-4)
    assert snapshot(work) == {}


@pytest.mark.slow  # trains
def test_val_of_best_pt_prints_the_runs_final_validation(tmp_path):
    """One mAP per checkpoint: `val --weights best.pt` gives the figures the run's final validation printed (both
    validate the fp16-stored EMA at twice the training batch); results.csv's row of that epoch is the EMA's before the
    fp16 save."""
    res = cli("train", "--weights", CKPT, "--epochs", "2", "--imgsz", "160", "--project", tmp_path, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    final = re.search(r"Final validation \((.+best\.pt)\): mAP50 ([0-9.]+)  mAP50-95 ([0-9.]+)", res.stdout)
    assert final and float(final.group(2)) > 0.02, res.stdout[-2000:]
    val = cli("val", "--weights", final.group(1), "--device", "cpu", cwd=tmp_path)
    assert val.returncode == 0, val.stderr[-2000:]
    printed = re.search(r"best\.pt: mAP50 ([0-9.]+)  mAP50-95 ([0-9.]+)", val.stdout)
    assert printed.groups() == final.groups()[1:]


def one_line_error(capsys, args, *needles):
    line = cli_error(capsys, *args)
    for needle in needles:
        assert needle in line, line


def test_missing_data_yaml(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    one_line_error(
        capsys,
        ["train", "--data", tmp_path / "nope.yaml", "--project", tmp_path, "--epochs", 1],
        "nope.yaml",
        "not found",
    )
    assert not any(tmp_path.rglob("*.pt"))


def test_data_yaml_with_missing_images(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    yaml = tmp_path / "d.yaml"
    yaml.write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames:\n  0: Tree\n")
    one_line_error(capsys, ["train", "--data", yaml, "--project", tmp_path, "--epochs", 1], "d.yaml", "images")
    assert not (tmp_path / "train").exists()


def test_corrupt_label_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "trees"
    shutil.copytree(REPO_ROOT / "data" / "deepforest", root, ignore=shutil.ignore_patterns("*.cache"))
    label = sorted((root / "labels" / "train").glob("*.txt"))[3]
    label.write_text(label.read_text() + "0 0.5 0.5 oops 0.1\n")
    yaml = tmp_path / "d.yaml"
    yaml.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: Tree\n")
    one_line_error(
        capsys, ["train", "--data", yaml, "--project", tmp_path / "runs", "--epochs", 1], label.name, "non-numeric"
    )
    assert not (tmp_path / "runs").exists()


def test_checkpoint_without_detect_head(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "cls.pt"
    torch.save({"model": ClassificationModel("yolov8n-cls.yaml", nc=2, verbose=False).half()}, bad)
    before = sha(bad)
    one_line_error(
        capsys,
        ["shift", "--weights", bad, "--out", tmp_path / "out.pt"],
        "--weights",
        "cls.pt",
        "a YOLO classification checkpoint",
    )
    assert not (tmp_path / "out.pt").exists() and sha(bad) == before


@pytest.mark.slow  # validation in a real process
def test_val_voc07_and_pycocotools_agree_with_ultralytics(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    res = cli("val", "--weights", CKPT, "--device", "cpu", "--voc07", "--coco", "--out", tmp_path, cwd=work)
    assert res.returncode == 0, res.stderr
    assert snapshot(work) == {} and "Warning" not in res.stderr  # no stray folder, no numpy warning
    ultra = float(re.search(r"mAP50 ([0-9.]+)\s+mAP50-95", res.stdout).group(1))
    coco = float(re.search(r"pycocotools AP50 ([0-9.]+)", res.stdout).group(1))
    voc07 = float(re.search(r"VOC07 11-point mAP50 ([0-9.]+)", res.stdout).group(1))
    assert coco == pytest.approx(ultra, abs=0.02)  # both 101-point AP at IoU 0.5; predictions made separately
    assert 0 < voc07 <= 1
    gt = json.loads((tmp_path / "gt_coco.json").read_text())
    assert len(gt["images"]) == 9 and len(gt["annotations"]) == 231
    assert json.loads((tmp_path / "predictions.json").read_text())


@pytest.mark.slow  # shifts in real processes
def test_shift_that_changes_outputs_is_refused_unless_asked(tmp_path):
    """The paper's SOS on b = 8 of 64 rows changes the head's outputs on the other captured rows by far more than
    --sos-max-change (5 %): refused in one line, nothing written; with sos_max_change=None it is applied as asked.
    The reported change is recomputed from the head convs' inputs on the same 64 capture images."""
    from sos_detect.detect.checkpoints import load_detector
    from sos_detect.detect.data import load_data
    from sos_detect.detect.posthoc import capture_set_for, working_copy

    out = tmp_path / "paper.pt"
    args = ("shift", "--weights", CKPT, "--out", out, "--device", "cpu", "--sos-mode", "paper", "--sos-rows", "8")
    refused = cli(*args, cwd=tmp_path)
    assert refused.returncode == 1 and "max_change 0.05" in refused.stdout + refused.stderr
    assert snapshot(tmp_path) == {}
    applied = cli(*args, "sos_max_change=None", cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr
    reported = torch_load(out, map_location="cpu")["sos_shift"]["model"]["layers"]  # the stored network
    worst = max(layer["out_change_all"] for layer in reported)
    assert worst > 0.05
    # independent: ‖A(W'−W)ᵀ‖ / ‖AWᵀ‖ per head conv, A = the conv's inputs on the 64 capture images
    before = working_copy(load_detector(CKPT)["model"], torch.device("cpu"), imgsz=320, batch=8)
    after = load_detector(out)["model"].float()
    inputs: dict[str, list] = {}
    heads = detect_head_layers(before)
    hooks = [
        m.register_forward_hook(lambda m, a, o, k=k: inputs.setdefault(k, []).append(a[0])) for k, m in heads.items()
    ]
    with torch.no_grad():
        for batch in capture_set_for(before, load_data(None)[1]).sample(64, 0):
            before(batch["img"].float() / 255)
    for h in hooks:
        h.remove()
    new = detect_head_layers(after)
    for layer in reported:
        w, w_new = heads[layer["name"]].weight, new[layer["name"]].weight
        num = sum(float(torch.nn.functional.conv2d(x, w_new - w).square().sum()) for x in inputs[layer["name"]])
        den = sum(float(torch.nn.functional.conv2d(x, w).square().sum()) for x in inputs[layer["name"]])
        assert (num / den) ** 0.5 == pytest.approx(layer["out_change_all"], rel=1e-2, abs=1e-4)
