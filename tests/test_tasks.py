"""SOS on every Ultralytics task whose head is a Detect (segment, pose, OBB) and the models it refuses.

The task data are the embedded tree boxes as polygons, keypoints and corners (`build_task_data`); each run is the
real `sos-detect train` at 64 px for 2 epochs, then `val`, `shift` and `hessian` on its checkpoint.
"""

import csv
import json

import pytest
import torch
from conftest import run_cli
from ultralytics.utils.patches import torch_load

from sos_detect.cli import main
from sos_detect.detect.embedded import build_task_data
from sos_detect.detect.heads import detect_head, detect_head_layers, head_task

MODELS = {"segment": ("yolo11n-seg.yaml", "mask", "(M)"), "pose": ("yolo11n-pose.yaml", "kpt", "(P)"),
          "obb": ("yolov8n-obb.yaml", "angle", "(B)")}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(MODELS))
def task_run(request, tmp_path_factory):
    task = request.param
    cfg, extra, metric = MODELS[task]
    root = tmp_path_factory.mktemp(task)
    data = build_task_data(task, root / "data")
    res = run_cli(
        "train", "--cfg", cfg, "--data", data, "--epochs", 2, "--imgsz", 64, "--sos-start", 0, "--sos-images", 16,
        "--sos-heads", f"box,cls,{extra}", "--sos-ema", "grams", "--project", root / "runs", "workers=0", "plots=False",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return task, data, root / "runs" / "train", res


@pytest.mark.slow  # the task_run fixture trains
def test_task_trains_with_its_own_trainer_and_shifts_its_output_convs(task_run):
    task, _, run, res = task_run
    cfg, extra, metric = MODELS[task]
    ckpt = torch_load(run / "weights" / "last.pt", map_location="cpu")
    net = ckpt["model"]
    assert head_task(detect_head(net)) == task and ckpt["train_args"]["task"] == task
    header = (run / "results.csv").read_text().splitlines()[0]
    assert f"metrics/mAP50{metric}" in header.replace(" ", "")  # the task's own validator
    log = [json.loads(line) for line in (run / "sos_log.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["target"]) for e in log] == [(1, "model"), (1, "ema"), (2, "model"), (2, "ema")]
    expected = sorted(detect_head_layers(net, f"box,cls,{extra}"))
    for e in log:
        assert e["applied"] and sorted(layer["name"] for layer in e["layers"]) == expected
        assert all(layer["out_change"] <= 1e-4 * (1 + 1e-3) for layer in e["layers"])
    # the saved EMA carries the last shift: its head norms are the logged norm_after (fp16 storage)
    norms = {n: float(m.weight.float().norm()) for n, m in detect_head_layers(net, f"box,cls,{extra}").items()}
    for layer in log[-1]["layers"]:
        assert norms[layer["name"]] == pytest.approx(layer["norm_after"], rel=2e-3)
    rows = list(csv.DictReader((run / "results.csv").read_text().splitlines()))
    heldout = [float(r["sos/ema_heldout_change"]) for r in rows]
    assert heldout == pytest.approx([e["heldout_change"] for e in log if e["target"] == "ema"], rel=1e-5)
    printed = [line for line in res.stderr.splitlines() + res.stdout.splitlines() if "on the validation images" in line]
    assert len(printed) == 2 and f"{heldout[-1]:.2e}" in printed[-1]  # the console line shows the held-out change


@pytest.mark.slow  # the task_run fixture trains; real processes
def test_task_checkpoint_works_with_val_shift_and_hessian(task_run, tmp_path):
    task, data, run, _ = task_run
    weights = run / "weights" / "last.pt"
    val = run_cli("val", "--weights", weights)
    assert val.returncode == 0, val.stderr[-2000:]
    extra = MODELS[task][1]
    out = tmp_path / "shifted.pt"
    shift = run_cli("shift", "--weights", weights, "--out", out, "--sos-heads", f"box,cls,{extra}", "--sos-tau", 1e-3)
    assert shift.returncode == 0, shift.stderr[-2000:]
    shifted = torch_load(out, map_location="cpu")["model"]
    before = torch_load(weights, map_location="cpu")["model"]
    for name, conv in detect_head_layers(shifted, f"box,cls,{extra}").items():
        old = detect_head_layers(before, f"box,cls,{extra}")[name]
        assert float(conv.weight.float().norm()) <= float(old.weight.float().norm()) * (1 + 1e-3)
    hessian = run_cli("hessian", "--weights", weights, "--images", 2, "--probes", 4, "--k", 1)
    assert hessian.returncode == 0 and "trace cls" in hessian.stdout, hessian.stderr[-2000:]


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ("rtdetr-l.yaml", "RT-DETR"),
        ("yolov8s-world.yaml", "YOLO-World"),
        ("yoloe-11s.yaml", "YOLOE"),
        ("yolo11n-cls.yaml", "sos-detect classify"),
        ("yolo26n-sem.yaml", "SemanticSegment"),
    ],
)
def test_models_without_a_detect_head_are_refused_before_anything_is_built(cfg, expected, tmp_path, capsys):
    assert main(["train", "--cfg", cfg, "--project", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and f"--cfg {cfg}" in err[0] and "Detect head" in err[0]
    assert not (tmp_path / "runs").exists()


def test_a_task_model_on_the_default_detect_data_and_a_broken_args_yaml_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "--cfg", "yolo11n-pose.yaml", "--project", str(tmp_path / "runs")]) == 2
    assert "a pose model needs pose labels" in capsys.readouterr().err
    for text, expected in (("model:\n", "without its model"), ("model: yolov5n.yaml\nimgsz: 10\n", "--imgsz 10")):
        (tmp_path / "args.yaml").write_text(f"mode: train\n{text}")
        assert main(["train", f"cfg={tmp_path / 'args.yaml'}", "--project", str(tmp_path / "runs")]) == 2
        err = capsys.readouterr().err
        assert f"cfg={tmp_path / 'args.yaml'}: " in err and expected in err
    previous = ["x", "*a", "*b", "*c", "*d", "*e"]
    bomb = "".join(f"{c}: &{c} [{', '.join([p] * 9)}]\n" for p, c in zip(previous, "abcdef", strict=True))
    (tmp_path / "bomb.yaml").write_text(bomb + "backbone: []\nhead: [*f]\n")  # 9⁶ values once expanded
    assert main(["train", "--cfg", str(tmp_path / "bomb.yaml"), "--project", str(tmp_path / "runs")]) == 2
    assert "over 100,000 values once its aliases are expanded" in capsys.readouterr().err  # model YAMLs bounded too
    assert not (tmp_path / "runs").exists()


def test_a_data_yaml_as_model_and_a_contradicting_task_are_one_line_errors(tmp_path, capsys):
    data = build_task_data("segment", tmp_path / "data")
    assert main(["train", "--cfg", str(data), "--project", str(tmp_path / "runs")]) == 2
    assert "a data YAML; pass it as --data" in capsys.readouterr().err
    assert main(["train", "--cfg", "yolo11n.yaml", "task=segment", "--project", str(tmp_path / "runs")]) == 2
    assert "task=segment: --cfg yolo11n.yaml is a detect model" in capsys.readouterr().err
    assert main(["train", "--cfg", "yolo11n-seg.yaml", "--data", str(data), "--sos-heads", "box,kpt"]) == 2
    assert "--sos-heads box,kpt: a segment head has no kpt convs (it has box, cls, mask)" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_detection_trainer_refuses_a_model_of_another_task(tmp_path):
    from ultralytics import YOLO

    from sos_detect.detect import SOSDetectionTrainer, sos_trainer

    data = build_task_data("segment", tmp_path / "data")
    with pytest.raises(TypeError, match="SOSSegmentationTrainer"):
        YOLO("yolo11n-seg.yaml").train(trainer=SOSDetectionTrainer, data=str(data), epochs=1, imgsz=64,
                                       device="cpu", project=str(tmp_path / "r"))  # fmt: skip
    assert sos_trainer("segment").__name__ == "SOSSegmentationTrainer"
    with pytest.raises(TypeError, match="task=classify"):
        sos_trainer("classify")


def test_task_labels_are_checked_in_their_own_layout(tmp_path, capsys):
    data = build_task_data("pose", tmp_path / "data")
    label = next((tmp_path / "data" / "labels" / "train").glob("*r0c1.txt"))
    label.write_text(label.read_text() + "0 0.5 0.5 0.1 0.1 0.5\n")  # one value short of 1 keypoint × 3
    assert main(["train", "--cfg", "yolo11n-pose.yaml", "--data", str(data), "--project", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{label}:" in err and "1×3 keypoint values" in err
    assert not (tmp_path / "r").exists()


def test_extra_head_convs_are_a_choice_only_where_the_head_has_them():
    from ultralytics import YOLO

    seg = YOLO("yolo11n-seg.yaml").model
    assert sorted({n.split(".")[0] for n in detect_head_layers(seg, "box,cls,mask")}) == ["box", "cls", "mask"]
    with pytest.raises(ValueError, match="a segment head has no kpt convs"):
        detect_head_layers(seg, "kpt")
    pose26 = YOLO("yolo26n-pose.yaml").model
    kpt = detect_head_layers(pose26, "kpt")
    assert set(kpt) == {"kpt.0", "kpt.1", "kpt.2", "one2one_kpt.0", "one2one_kpt.1", "one2one_kpt.2"}
    assert all(isinstance(c, torch.nn.Conv2d) and c.out_channels == 51 for c in kpt.values())  # 17 × 3
