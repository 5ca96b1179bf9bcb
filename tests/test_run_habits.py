"""Ultralytics users' habits, in real runs: `--weights X.pt` fine-tunes X, a run folder reused with exist_ok starts
its SOS log afresh, args.yaml replays a run (plain `yolo` too), plots=False, AutoBatch values, frozen head convs,
plain Ultralytics resume, the shift order of Algorithm 1 and the EMA policies."""

import csv
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, run_cli, tiny_train
from ultralytics import YOLO
from ultralytics.utils import LOGGER
from ultralytics.utils.patches import torch_load

from sos_detect.cli import main
from sos_detect.detect import SOSDetectionTrainer
from sos_detect.detect.embedded import REPO_ROOT
from sos_detect.detect.heads import detect_head_layers

pytestmark = pytest.mark.slow  # every test trains

SHIPPED = REPO_ROOT / "data" / "checkpoints" / "yolov5n-trees.pt"


def tiny_cli(epochs: int = 1, imgsz: int = 64) -> list:
    return ["--epochs", epochs, "--imgsz", imgsz, "--sos-start", 0, "--sos-images", 8, "workers=0", "plots=False"]


def log_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "sos_log.jsonl").read_text().splitlines()]


def floats(ckpt: Path) -> dict[str, torch.Tensor]:
    c = torch_load(ckpt, map_location="cpu")
    return {k: v.float() for k, v in (c.get("ema") or c["model"]).state_dict().items() if v.is_floating_point()}


def test_weights_alone_fine_tunes_the_checkpoints_own_architecture(tmp_path):
    """--weights X.pt alone trains X's architecture from X's tensors (as `yolo train model=X.pt`): after one epoch at
    a small learning rate every tensor is still close to X's, where the default YAML would start from scratch."""
    res = run_cli("train", "--weights", SHIPPED, *tiny_cli(imgsz=160), "--optimizer", "SGD", "lr0=1e-4",
                  "--project", tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    start, end = floats(SHIPPED), floats(tmp_path / "train" / "weights" / "last.pt")
    assert start.keys() == end.keys() and all(start[k].shape == end[k].shape for k in start)
    convs = [k for k in start if k.endswith("conv.weight")]
    change = max(float((end[k] - start[k]).norm() / start[k].norm()) for k in convs)
    assert change < 0.05, change


def test_a_yaml_with_weights_that_do_not_fit_is_refused_unless_asked(tmp_path, capsys):
    args = ["train", "--cfg", "yolov8n.yaml", "--weights", str(SHIPPED), "--project", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only 115/355 tensors transfer" in err[0] and "--allow-partial" in err[0]
    assert not (tmp_path / "r").exists()
    res = run_cli(*args, "--allow-partial", *tiny_cli())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Transferred 115/355 items" in res.stdout + res.stderr  # Ultralytics' own count agrees
    same = run_cli("train", "--cfg", "yolov5n.yaml", "--weights", SHIPPED, *tiny_cli(), "--project", tmp_path / "s")
    assert same.returncode == 0 and "Transferred 427/427 items" in same.stdout + same.stderr
    ab = ["reproduce", "ab", "--data", str(TINY["data"]), "--arm", "base:sos=False", "--weights", str(SHIPPED)]
    assert main([*ab, "--models", "yolov8n", "--out", str(tmp_path / "ab")]) == 2  # the harness: the same rule
    err = capsys.readouterr().err
    assert "only 115/355 tensors transfer" in err and "--models" in err and not (tmp_path / "ab").exists()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("habits")
    res = run_cli("train", *tiny_cli(epochs=2), "--sos-tau", 2e-4, "--project", root, "--name", "r")
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "r"


def test_args_yaml_replays_the_run_with_sos_and_plainly_with_yolo(cli_run):
    args = yaml.safe_load((cli_run / "args.yaml").read_text())
    sos = yaml.safe_load((cli_run / "sos_args.yaml").read_text())
    assert not any(k.startswith("sos") for k in args) and sos["sos_tau"] == 2e-4
    res = run_cli("train", f"cfg={cli_run / 'args.yaml'}")
    assert res.returncode == 0, res.stderr[-3000:]
    replay = cli_run.parent / "r-2"  # a new folder: the finished run is not overwritten
    assert yaml.safe_load((replay / "sos_args.yaml").read_text()) == sos
    again = yaml.safe_load((replay / "args.yaml").read_text())
    differ = {k for k in args if args[k] != again.get(k)}
    assert differ <= {"name", "save_dir"}, differ
    assert [(e["epoch"], e["target"], e["tau"]) for e in log_of(replay)] == [
        (e["epoch"], e["target"], e["tau"]) for e in log_of(cli_run)
    ]
    yolo = Path(sys.executable).parent / "yolo"
    plain = subprocess.run([str(yolo), "train", f"cfg={cli_run / 'args.yaml'}", "epochs=1", "name=plain"],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert not (cli_run.parent / "plain" / "sos_log.jsonl").exists()  # plain Ultralytics: no SOS


def test_exist_ok_starts_the_sos_log_afresh_and_plots_false_is_obeyed(cli_run, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(cli_run, run)
    assert [e["epoch"] for e in log_of(run)] == [1, 1, 2, 2]
    res = run_cli("train", *tiny_cli(), "--project", tmp_path, "--name", "r", "exist_ok=True")
    assert res.returncode == 0, res.stderr[-3000:]
    assert [e["epoch"] for e in log_of(run)] == [1, 1]  # the new run's shifts only, as its results.csv
    assert len((run / "results.csv").read_text().splitlines()) == 2
    assert not list(run.glob("sos_*.png"))  # plots=False


@pytest.mark.parametrize("batch", ["-1", "0.5"])
def test_autobatch_values_pass_through_to_ultralytics(batch, tmp_path, capsys):
    res = run_cli("train", *tiny_cli(), f"batch={batch}", "--project", tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert yaml.safe_load((tmp_path / "train" / "args.yaml").read_text())["batch"] == float(batch)
    assert "batch" in (res.stdout + res.stderr)  # Ultralytics' AutoBatch says what it chose (16 on CPU)
    assert main(["train", "--batch", "1.5", "--project", str(tmp_path / "x")]) == 2
    assert "--batch 1.5: must be a whole number >= 1, -1, or a fraction in (0, 1)" in capsys.readouterr().err


class Said(logging.Handler):
    """The lines Ultralytics' LOGGER says."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class FreezeProbe(SOSDetectionTrainer):
    def _setup_train(self):
        super()._setup_train()  # applies freeze=
        self.start = {n: m.weight.detach().clone() for n, m in detect_head_layers(self.model).items()}


def test_frozen_head_convs_are_not_shifted(tmp_path):
    """freeze=['24.cv3'] freezes the cls branch of YOLOv5n's head: its output convs end bit-identical (never stepped,
    never shifted), the box convs are shifted, every log entry names what was skipped, and the console says it once
    (not at every shift)."""
    model = YOLO("yolov5n.yaml")
    settings = {**TINY, "epochs": 2, "imgsz": 64, "sos_start": 0, "sos_images": 8, "freeze": ["24.cv3"]}
    said = Said()
    LOGGER.addHandler(said)
    try:
        model.train(trainer=FreezeProbe, project=str(tmp_path), name="f", **settings)
    finally:
        LOGGER.removeHandler(said)
    trainer = model.trainer
    log = log_of(tmp_path / "f")
    assert {e["epoch"] for e in log} == {1, 2} and all(e["frozen"] == ["cls.0", "cls.1", "cls.2"] for e in log)
    assert said.lines.count("SOS: cls.0, cls.1, cls.2 not shifted: frozen (freeze=['24.cv3'])") == 1
    assert all(layer["name"].startswith("box.") for e in log for layer in e["layers"])
    end = detect_head_layers(trainer.model)
    assert all(torch.equal(end[n].weight, trainer.start[n]) for n in ("cls.0", "cls.1", "cls.2"))
    assert not torch.equal(end["box.0"].weight, trainer.start["box.0"])


def test_plain_ultralytics_resume_is_visible_in_the_results(tmp_path, capsys):
    from ultralytics.models.yolo.detect import DetectionTrainer

    class Stop(Exception):
        pass

    class StopAfterFirst(SOSDetectionTrainer):
        def save_model(self):
            super().save_model()
            if self.epoch == 0:
                raise Stop

    with pytest.raises(Stop):
        tiny_train(tmp_path, "p", trainer=StopAfterFirst, epochs=2, imgsz=64, sos_start=0, sos_images=8)
    last = tmp_path / "p" / "weights" / "last.pt"
    hint = torch_load(last, map_location="cpu")["ema"].sos_resume
    assert hint.startswith("resume with SOS: sos-detect train --resume LAST_PT, or YOLO(LAST_PT).train(")
    assert hint.endswith("resume=True, trainer=StopAfterFirst)")
    YOLO(str(last)).train(trainer=DetectionTrainer, resume=True)
    rows = list(csv.reader((tmp_path / "p" / "results.csv").read_text().splitlines()))
    header = [c.strip() for c in rows[0]]
    assert "sos/shifted" in header and len(rows[1]) == len(header) and len(rows[2]) < len(header)
    out = tmp_path / "c.png"
    assert main(["compare", str(tmp_path / "p"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'p'}: epochs 2–2 trained without SOS" in printed and out.stat().st_size > 0


class Steps(SOSDetectionTrainer):
    """Counts optimizer steps, and records the count at each shift and at each validation."""

    def run_callbacks(self, event):
        if event == "on_train_batch_end":
            self.steps = getattr(self, "steps", 0) + 1
        super().run_callbacks(event)

    def validate(self):
        self.marks = getattr(self, "marks", []) + [("val", getattr(self, "steps", 0))]
        return super().validate()

    def save_model(self):
        self.marks = getattr(self, "marks", []) + [("save", getattr(self, "steps", 0))]
        return super().save_model()

    def sos_shift(self, epoch, capture=None):
        self.marks = getattr(self, "marks", []) + [("shift", getattr(self, "steps", 0))]
        return super().sos_shift(epoch, capture)


def test_start_order_trains_a_full_epoch_after_the_last_shift(tmp_path):
    model = YOLO("yolov5n.yaml")
    settings = {**TINY, "epochs": 3, "imgsz": 64, "sos_start": 0, "sos_images": 8, "sos_order": "start"}
    model.train(trainer=Steps, project=str(tmp_path), name="s", **settings)
    trainer = model.trainer
    per_epoch = len(trainer.train_loader)
    log = log_of(tmp_path / "s")
    assert [(e["epoch"], e["target"], e["order"]) for e in log] == [
        (e, t, "start") for e in (2, 3) for t in ("model", "ema")
    ]
    shifts = [s for kind, s in trainer.marks if kind == "shift"]
    vals = [s for kind, s in trainer.marks if kind == "val"]
    assert shifts == [per_epoch, 2 * per_epoch]  # at the start of epochs 2 and 3, before they train
    assert vals[-1] - shifts[-1] == per_epoch  # the last validation follows a full epoch of training
    # each shift after the previous epoch's validation and checkpoint (Algorithm 1: shift, then train the epoch)
    assert [k for k, _ in trainer.marks] == ["val", "save", "shift", "val", "save", "shift", "val", "save"]
    end = YOLO("yolov5n.yaml")
    end.train(trainer=Steps, project=str(tmp_path), name="e", **{**settings, "sos_order": "end"})
    marks = end.trainer.marks
    assert [k for k, _ in marks][-4:] == ["save", "shift", "val", "save"]  # order end: validated right after a shift


class EmaMoves(SOSDetectionTrainer):
    """Records, per shift, whether the EMA's head weights changed across sos_shift."""

    moved: dict[str, list[bool]] = {}

    def sos_shift(self, epoch, capture=None):
        before = {n: m.weight.detach().clone() for n, m in detect_head_layers(self.ema.ema).items()}
        reports = super().sos_shift(epoch, capture)
        after = detect_head_layers(self.ema.ema)
        moved = any(not torch.equal(before[n], after[n].weight) for n in before)
        EmaMoves.moved.setdefault(self.args.sos_ema, []).append(moved)
        return reports


def test_ema_policy_changes_only_the_ema(tmp_path):
    """Over two shifts: "follow" leaves the EMA untouched by the shift (it changes only through its update) while
    "own" and "grams" shift it; the model's shifts — hence its training — are the same under every policy."""
    EmaMoves.moved.clear()
    runs = {p: tiny_train(tmp_path, p, trainer=EmaMoves, epochs=2, imgsz=64, sos_start=0, sos_images=8, sos_ema=p)
            for p in ("own", "grams", "follow")}  # fmt: skip
    assert EmaMoves.moved == {"own": [True, True], "grams": [True, True], "follow": [False, False]}
    logs = {p: log_of(r) for p, r in runs.items()}
    assert [(e["epoch"], e["target"]) for e in logs["follow"]] == [(1, "model"), (2, "model")]
    for epoch in (1, 2):
        entries = [next(e for e in logs[p] if e["target"] == "model" and e["epoch"] == epoch) for p in runs]
        assert entries[0]["layers"] == entries[1]["layers"] == entries[2]["layers"]
    own, grams = (next(e for e in logs[p] if e["target"] == "ema" and e["epoch"] == 1) for p in ("own", "grams"))
    assert (own["capture"], own["images"]) == ("eval", 8) and grams["capture"] == "train"
    assert own["layers"] != grams["layers"]
