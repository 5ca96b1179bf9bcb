"""One option table for the trainer, the checks and the CLI; `key=value` arguments as `yolo` users type them;
one-line errors naming the option as typed, nothing written; output that streams through a pipe."""

import os
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import cli_error, cli_main, run_cli, snapshot
from ultralytics.cfg import parse_key_value_pair

from sos_detect.cli import build_parser
from sos_detect.cli.arguments import apply_key_values, parse
from sos_detect.core.options import SOS_DEFAULTS, SOS_OPTIONS
from sos_detect.detect.embedded import REPO_ROOT
from sos_detect.detect.trainer import SOS_DEFAULTS as TRAINER_DEFAULTS

CKPT = REPO_ROOT / "data" / "checkpoints" / "yolov5n-trees.pt"


def parsed(*argv):
    args, extras = parse(build_parser(), list(argv))
    apply_key_values(args, extras)
    return args


def test_every_sos_option_has_a_flag_and_its_default_in_help(capsys):
    assert TRAINER_DEFAULTS is SOS_DEFAULTS  # the trainer reads the table itself
    defaults = parsed("train")
    for o in SOS_OPTIONS:
        assert getattr(defaults, o.key) == o.default, o.key
    code, out, _ = cli_main(capsys, "train", "--help")
    assert code == 0
    text = " ".join(out.split())  # argparse wraps lines
    for o in SOS_OPTIONS:
        assert o.flag in text, o.flag
        if o.default is not None and o.type is not bool:
            assert f"{o.flag} {o.key.upper().split('_')[-1]} " in text
    for stated in ("(default 0.0001)", "(default 64)", "(default guarded)", "(default box,cls)", "(default 32)"):
        assert stated in text
    assert "--batch BATCH batch size; -1 or a fraction" in text and "(on CPU it uses 16) (default 8)" in text  # train's
    assert "--seed SEED random seed (default 0)" in text


def test_key_value_arguments_are_read_as_ultralytics_reads_them():
    tokens = ["model=yolov5s.yaml", "data=voc.yaml", "epochs=1e2", "sos_tau=1e-3", "lr0=0.01", "cos_lr=True"]
    a = parsed("train", *tokens, "--sos-every", "2", "--opt", "momentum=0.9")
    expected = dict(parse_key_value_pair(t) for t in tokens)  # Ultralytics' own reading
    assert (a.cfg, a.data, a.sos_tau, a.sos_every) == ("yolov5s.yaml", "voc.yaml", expected["sos_tau"], 2)
    assert a.epochs == 100 and isinstance(a.epochs, int)  # integral floats are ints, as in `yolo`
    assert a.cli_overrides == {"lr0": expected["lr0"], "cos_lr": True, "momentum": 0.9}
    assert a.cli_names["sos_tau"] == "sos_tau=" and a.cli_names["sos_every"] == "--sos-every"
    v = parsed("val", "model=best.pt", "imgsz=640", "device=0,1")
    assert (v.weights, v.imgsz, v.device) == ("best.pt", 640, "0,1")  # devices verbatim, not a tuple


@pytest.mark.parametrize(
    "args,line",
    [
        (["train", "--opt", "foo=1"], "sos-detect train: error: --opt foo=1: unknown argument"),
        (["train", "foo=1"], "sos-detect train: error: foo=1: unknown argument"),
        (["train", "lr=0.1"], "sos-detect train: error: lr=0.1: unknown argument (similar: lrf, lr0)"),
        (["train", "--sos-taux", "1"], "sos-detect train: error: --sos-taux: unknown argument (similar: --sos-tau"),
        (["train", "--sos-tau", "1"], "sos-detect train: error: --sos-tau 1: must be a number in [0, 1)"),
        (["train", "--opt", "sos_tau=5"], "sos-detect train: error: --opt sos_tau=5: must be a number in [0, 1)"),
        (["train", "sos_tau=-1"], "sos-detect train: error: sos_tau=-1: must be a number in [0, 1)"),
        (["train", "--imgsz", "0"], "sos-detect train: error: --imgsz 0: must be an integer in [32, 4096]"),
        (["train", "--imgsz", "-64"], "sos-detect train: error: --imgsz -64: must be an integer in [32, 4096]"),
        (["train", "epochs=0"], "sos-detect train: error: epochs=0: must be an integer >= 1"),
        (["train", "--sos-every", "0"], "sos-detect train: error: --sos-every 0: must be an integer >= 1"),
        (["train", "sos_hessian_probes=0"], "sos-detect train: error: sos_hessian_probes=0: must be an integer >= 1"),
        (["train", "--sos-heads", "box,foo"], "error: --sos-heads box,foo: must be a comma-separated subset of box"),
        (
            ["train", "sos_mode=paper"],
            "sos-detect train: error: sos_mode=paper: needs sos_rows= (the number b of sampled rows",
        ),
        (["train", "--optimizer", "sgdd"], "sos-detect train: error: --optimizer sgdd: must be one of auto, SGD"),
        (["train", "lr0=abc"], "sos-detect train: error: 'lr0=abc' is of invalid type str."),
        (["train", "sos=maybe"], "sos-detect train: error: sos=maybe: must be True or False"),
        (["shift", "--weights", CKPT, "--out", "o.pt", "--sos-tau", "1"], "error: --sos-tau 1: must be a number in"),
        (["shift", "--weights", CKPT, "--out", "o.pt", "--imgsz", "0"], "error: --imgsz 0: must be an integer in [32,"),
        (["shift", "--weights", CKPT, "--out", "o.pt", "--sos-images", "0"], "error: --sos-images 0: must be an int"),
        (["hessian", "--weights", CKPT, "--images", "0"], "sos-detect hessian: error: --images 0: must be an integer"),
        (["val", "model=x.pt", "--batch", "0"], "sos-detect val: error: --batch 0: must be an integer >= 1"),
        (["shift", "--weights", CKPT], "sos-detect shift: error: the following arguments are required: --out"),
    ],
)
def test_bad_options_are_one_line_naming_the_option_as_typed(tmp_path, monkeypatch, capsys, args, line):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli_main(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, (code, err[-3000:])
    assert line in err.strip()
    assert "Ultralytics 'yolo' commands use the following syntax" not in out + err
    assert snapshot(tmp_path) == {}  # nothing written


@pytest.mark.parametrize("command", ["train", "shift"])
def test_paper_rows_must_be_below_the_layer_width(tmp_path, monkeypatch, capsys, command):
    """Checked once the network is known (from --cfg and the data's class count, or from the checkpoint)."""
    monkeypatch.chdir(tmp_path)
    args = ["--sos-mode", "paper", "--sos-rows", "100000"]
    if command == "shift":
        args += ["--weights", CKPT, "--out", tmp_path / "o.pt"]
    line = cli_error(capsys, command, *args)
    # YOLOv5n on 1 class: every head conv takes 64 inputs (independent: the stored network's own widths)
    net = torch.load(CKPT, map_location="cpu", weights_only=False)["model"]
    width = min(m.in_channels for m in net.model[-1].cv2.modules() if isinstance(m, torch.nn.Conv2d))
    assert f"--sos-rows 100000: must be below the layer width (box.0 of this model takes {width} inputs)" in line
    assert snapshot(tmp_path) == {}


def test_device_cuda_without_a_gpu(tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.chdir(tmp_path)
    assert cli_error(capsys, "train", "--device", "cuda") == (
        "sos-detect train: error: --device cuda: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
        "use --device cpu"
    )
    assert snapshot(tmp_path) == {}


def test_classify_help_says_sos_is_off_there(capsys):
    code, out, _ = cli_main(capsys, "classify", "train", "--help")
    text = " ".join(out.split())
    assert "off by default here" in text and "on by default in sos-detect train" in text


@pytest.mark.slow  # a real process validating for seconds: line buffering is a property of the process's pipe
def test_output_streams_through_a_pipe(tmp_path):
    """`val` prints its settings line first, then works for seconds; under 8 KB in all, so with block buffering
    every line would arrive at exit."""
    cmd = [sys.executable, "-m", "sos_detect.cli", "val", "--weights", str(CKPT), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = proc.stdout.readline()
    arrived = time.monotonic()
    rest = proc.stdout.read()
    proc.wait(timeout=600)
    ended = time.monotonic()
    assert proc.returncode == 0 and first.startswith("val: imgsz 320 (the checkpoint's)")
    assert len((first + rest).encode()) < 8192 and ended - arrived > 1.0, ended - arrived
    assert snapshot(tmp_path) == {}  # Ultralytics' runs/detect/val went to a temporary folder


@pytest.mark.slow  # a real training
def test_train_with_key_value_arguments(tmp_path):
    """`sos-detect train model=… epochs=… sos_tau=…` as a yolo user types it: a real (tiny) run."""
    args = ["model=yolov5n.yaml", "epochs=1", "imgsz=64", "sos_tau=1e-3", "sos_images=2", "plots=False", "workers=0"]
    res = run_cli("train", *args, "--device", "cpu", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "sos" / "train"
    saved = yaml.safe_load((run / "args.yaml").read_text()) | yaml.safe_load((run / "sos_args.yaml").read_text())
    expected = dict(parse_key_value_pair(t) for t in args)
    assert {k: saved[k] for k in expected} == expected
    assert (run / "weights" / "last.pt").is_file() and (run / "sos_log.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
