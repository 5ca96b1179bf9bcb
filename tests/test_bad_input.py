"""Bad input never costs a model (issue #17): every case is one line naming the file or option as typed,
exit code 2, no input changed and nothing written. Real files; in this process where the error comes before anything
runs (`cli_error`), real processes where the process itself is tested (signals, kills, environment read at import)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_error, cli_main, snapshot
from ultralytics.nn.tasks import ClassificationModel
from ultralytics.utils.patches import torch_load

from sos_detect.detect.embedded import REPO_ROOT

CKPT = REPO_ROOT / "data" / "checkpoints" / "yolov5n-trees.pt"
TREES = REPO_ROOT / "data" / "deepforest"


def _read_only_dir(root):
    """A folder nobody may write in: chmod 555, or /sys where the tests run as root (which ignores chmod)."""
    ro = root / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        tempfile.TemporaryDirectory(dir=ro).cleanup()
    except OSError:
        return ro
    ro.chmod(0o755)
    ro.rmdir()
    try:
        tempfile.TemporaryDirectory(dir="/sys").cleanup()
    except OSError:
        return "/sys"
    pytest.skip("no read-only folder available")


def _yaml(path, root, train="images/train", names="  0: Tree\n"):
    path.write_text(f"path: {root}\ntrain: {train}\nval: images/val\nnames:\n{names}")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad checkpoints and datasets, each made from the shipped detector and the embedded tree data."""
    d = tmp_path_factory.mktemp("inputs")
    ckpt = torch_load(CKPT, map_location="cpu")
    net = ckpt["model"]
    torch.save(net, d / "pickle.pt")  # a whole-model pickle
    torch.save(net.state_dict(), d / "state.pt")
    torch.save({"model": ClassificationModel("yolov8n-cls.yaml", nc=2, verbose=False).half()}, d / "cls.pt")
    (d / "random.pt").write_bytes(os.urandom(4096))
    (d / "folder.pt").mkdir()
    bad = net.model[-1].cv3[0][2].weight  # one NaN in the first class conv
    with torch.no_grad():
        bad[0, 0, 0, 0] = float("nan")
    nan_name = next(k for k, v in net.state_dict().items() if v.data_ptr() == bad.data_ptr())
    torch.save(ckpt, d / "nan.pt")
    corrupt = d / "corrupt"
    shutil.copytree(TREES, corrupt, ignore=shutil.ignore_patterns("*.cache"))
    for img in (corrupt / "images" / "train").iterdir():
        img.write_bytes(os.urandom(2000))  # random bytes named .jpg
    _yaml(d / "corrupt.yaml", corrupt)
    one = sorted((TREES / "images" / "train").iterdir())[0]
    _yaml(d / "file.yaml", TREES, train=f"images/train/{one.name}")
    _yaml(d / "two.yaml", TREES, names="  0: Tree\n  1: Shrub\n")
    (d / "a-file").write_text("not a folder")
    return {"dir": d, "nan_name": nan_name, "first_corrupt": sorted((corrupt / "images" / "train").iterdir())[0]}


def cases(d, nan_name, first_corrupt, ro):
    """(command line, the expected error line after 'sos-detect <command>: error: ') for every #17 case."""
    nan = f"--weights {d / 'nan.pt'}: non-finite weights (NaN or inf) in model tensor {nan_name}"
    need = "a YOLO detection checkpoint (Ultralytics' last.pt/best.pt) is needed"
    unreadable = f"{first_corrupt}: not a readable image (no known image format) (37 of 37 'train' images"
    out = ["--weights", CKPT, "--out"]
    return [
        (["val", "--weights", d / "nan.pt"], nan),
        (["hessian", "--weights", d / "nan.pt"], nan),
        (["train", "--weights", d / "nan.pt"], nan),
        (
            ["train", "--weights", d / "pickle.pt"],
            f"--weights {d / 'pickle.pt'}: a whole-model pickle (torch.save of a DetectionModel), not a checkpoint "
            f"dict; {need}",
        ),
        (
            ["train", "--weights", d / "cls.pt"],
            f"--weights {d / 'cls.pt'}: a YOLO classification checkpoint (ClassificationModel), not a detector "
            f"(classifiers: sos-detect classify); {need}",
        ),
        (["shift", "--weights", d / "state.pt", "--out", "o.pt"], f"--weights {d / 'state.pt'}: a state dict ("),
        (["val", "--weights", d / "random.pt"], f"--weights {d / 'random.pt'}: not a PyTorch checkpoint ("),
        (["shift", "--weights", d / "folder.pt", "--out", "o.pt"], f"--weights {d / 'folder.pt'}: is a folder, not a"),
        (["train", "--data", d / "corrupt.yaml"], unreadable),
        (["shift", *out, "o.pt", "--data", d / "corrupt.yaml"], unreadable),
        (["train", "--data", d / "file.yaml"], "is a file, not an image folder or a .txt list of images"),
        (["train", "--project", ro], f"--project {ro}: cannot write in {ro} ("),
        (["train", "--project", d / "a-file"], f"--project {d / 'a-file'}: {d / 'a-file'} is a file, not a folder"),
        (["shift", *out, d], f"--out {d}: is a folder; give the file to write, e.g. {d / 'shifted.pt'}"),
        (["shift", *out, f"{ro}/o.pt"], f"--out {ro}/o.pt: cannot write in {ro} ("),
        (["shift", *out, d / "a-file" / "o.pt"], f"--out {d / 'a-file' / 'o.pt'}: {d / 'a-file'} is a file, not a"),
        (["shift", *out, CKPT], f"--out {CKPT}: is the input --weights {CKPT}; inputs are never overwritten"),
        (
            ["hessian", "--weights", CKPT, "--data", d / "two.yaml"],
            f"--data {d / 'two.yaml'}: 2 classes, but --weights {CKPT} predicts 1 (Tree); pass the data the "
            "checkpoint was trained on",
        ),
        (["val", "model=" + str(CKPT), "data=" + str(d / "two.yaml")], f"data={d / 'two.yaml'}: 2 classes, but"),
        (
            ["classify", "train", "--model", "smallcnn", "--data", "digits", "--weights", d / "random.pt"],
            f"--weights {d / 'random.pt'}: not a PyTorch checkpoint (",
        ),
        (
            ["classify", "train", "--model", "smallcnn", "--data", "digits", "--weights", CKPT],
            f"--weights {CKPT}: a YOLO detector checkpoint (DetectionModel), not a state dict",
        ),
        (["classify", "train", "--data", "cifar10"], "--data cifar10 needs --root, the dataset folder"),
    ]


CASE_COUNT = 22


@pytest.mark.parametrize("index", range(CASE_COUNT))
def test_bad_input_is_one_line_and_writes_nothing(inputs, tmp_path, monkeypatch, capsys, index):
    ro = _read_only_dir(tmp_path)
    all_cases = cases(inputs["dir"], inputs["nan_name"], inputs["first_corrupt"], ro)
    assert len(all_cases) == CASE_COUNT
    args, expected = all_cases[index]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = snapshot(inputs["dir"], CKPT, TREES)
    line = cli_error(capsys, *args, "--device", "cpu")
    command = " ".join(a for a in map(str, args[:2]) if not a.startswith("-") and "=" not in a and "/" not in a)
    assert line.startswith(f"sos-detect {command}: error: "), line
    assert expected in line, line
    assert snapshot(inputs["dir"], CKPT, TREES) == before  # no input changed
    assert snapshot(work) == {}  # nothing written where the command ran


@pytest.mark.slow  # a real training process and a real SIGINT
def test_an_interrupted_first_epoch_leaves_no_run_folder(tmp_path):
    """The run folder exists only once the run has a checkpoint: Ctrl-C in epoch 1 removes it, so a retry gets
    the same name (no train2, train3, … of empty folders)."""
    cmd = [sys.executable, "-m", "sos_detect.cli", "train", "--epochs", "3", "--device", "cpu", "workers=0"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:  # line-buffered: each line arrives as it is printed
        seen.append(line)
        if "Starting training for" in line:
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=600)
    assert any("Starting training for" in line for line in seen), "".join(seen)[-2000:]
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "sos-detect train: interrupted"
    assert not (tmp_path / "runs" / "sos" / "train").exists()
    assert (tmp_path / "runs" / "sos").is_dir()  # the project folder itself may stay: it holds no run


def test_an_ultralytics_dataset_name_offline_says_what_is_missing(tmp_path, monkeypatch, capsys):
    from ultralytics.utils import DATASETS_DIR

    if (DATASETS_DIR / "coco8").exists():
        pytest.skip("coco8 is installed here")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("YOLO_OFFLINE", "1")  # read when the data is checked (sos_detect.core.runtime.downloads_allowed)
    line = cli_error(capsys, "train", "--data", "coco8.yaml")
    assert line.startswith("sos-detect train: error: --data coco8.yaml (") and "cfg/datasets/coco8.yaml)" in line
    assert f"images not found: train: images/train is {DATASETS_DIR}/coco8/images/train, which does not exist" in line
    assert line.endswith("Ultralytics would download it, but downloads are off (YOLO_OFFLINE=1, see the README)")
    assert snapshot(tmp_path) == {}


# -- round 2 (issue #25): one test per cause ------------------------------------------------------------------------


def _trees(root, name="trees"):
    """A copy of the embedded tree dataset and its data YAML (path: the copy)."""
    folder = root / name
    shutil.copytree(TREES, folder, ignore=shutil.ignore_patterns("*.cache"))
    return folder, _yaml(root / f"{name}.yaml", folder)


def test_1_builders_never_write_into_an_existing_dataset(tmp_path, capsys, monkeypatch):
    """`data fashion-det/voc/deepforest --out D` with D holding a dataset: refused, D untouched; --force builds
    aside and swaps the complete build in, keeping the files the build does not make."""
    from test_synthetic import digits_idx

    from sos_detect.cli import main

    monkeypatch.chdir(tmp_path)
    idx = digits_idx(tmp_path / "idx", per_split=20)
    dataset, _ = _trees(tmp_path)
    (dataset / "mine.txt").write_text("my notes")
    before = snapshot(tmp_path)
    tiny = ["--root", idx, "--train", 2, "--val", 1, "--imgsz", 64]
    for args in (
        ["data", "fashion-det", *tiny, "--out", dataset],
        ["data", "voc", "--root", tmp_path / "VOCdevkit", "--out", dataset],
        ["data", "deepforest", "--src", tmp_path / "x.whl", "--out", dataset],
    ):
        line = cli_error(capsys, *args)
        assert f"error: --out {dataset}: not empty (" in line and "pass --force" in line, line
        assert snapshot(tmp_path) == before
    assert cli_error(capsys, "data", "voc", "--root", tmp_path / "none", "--out", tmp_path / "new" / "voc")
    assert snapshot(tmp_path) == before  # a failed build into a new folder leaves no folder behind
    assert main(["data", "fashion-det", *map(str, tiny), "--out", str(dataset), "--force"]) == 0
    assert (dataset / "mine.txt").read_text() == "my notes" and (dataset / "fashion-det.yaml").is_file()
    assert sorted(p.name for p in (dataset / "images" / "train").iterdir()) == ["train_00000.jpg", "train_00001.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "trees", "trees.yaml"]  # no build folder left


def test_2_untrusted_yaml_is_bounded_before_anything_reads_it(tmp_path, monkeypatch, capsys):
    """Exponential anchors (a billion names), a self-referencing list and a list as a class name: one line each,
    in seconds (the anchors used to hang in Ultralytics' class-name check)."""
    levels = ["a", "b", "c", "d", "e", "f", "g", "h", "i"]
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip(levels, levels[1:], strict=False)
    )
    files = {
        "bomb.yaml": (
            bomb + "train: images/train\nval: images/val\nnames: *i\n",
            "over 100,000 values once its aliases",
        ),
        "self.yaml": ("train: images/train\nval: images/val\nnames: &n [*n]\n", "nested deeper than 64 levels"),
        "list.yaml": ("train: images/train\nval: images/val\nnames: [[a, b]]\n", "names: class 0 is a list, not a"),
    }
    monkeypatch.chdir(tmp_path)
    for file, (text, expected) in files.items():
        (tmp_path / file).write_text(text)
        start = time.monotonic()
        line = cli_error(capsys, "train", "--data", tmp_path / file)
        assert time.monotonic() - start < 120  # in seconds, not a hang
        assert line == f"sos-detect train: error: {tmp_path / file}: " + line.split(": ", 3)[3]
        assert expected in line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)


@pytest.mark.parametrize(
    "line, expected",
    [
        ("nan 0.5 0.5 0.1 0.1", "non-finite value (NaN or inf) in 'nan 0.5 0.5 0.1 0.1'"),
        ("inf 0.5 0.5 0.1 0.1", "non-finite value (NaN or inf) in 'inf 0.5 0.5 0.1 0.1'"),
        ("0 0.5 nan 0.1 0.1", "non-finite value (NaN or inf) in '0 0.5 nan 0.1 0.1'"),
        ("0 0.5 0.5 0 0.1", "zero-size box (width 0, height 0.1)"),
    ],
)
def test_3_label_lines_are_checked_finite_first(tmp_path, capsys, monkeypatch, line, expected):
    monkeypatch.chdir(tmp_path)
    dataset, data = _trees(tmp_path)
    label = sorted((dataset / "labels" / "train").iterdir())[0]
    label.write_text(line + "\n")
    before = snapshot(tmp_path)
    assert cli_error(capsys, "train", "--data", data) == f"sos-detect train: error: {label}:1: {expected}"
    assert snapshot(tmp_path) == before


def test_3_an_orphan_label_file_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dataset, data = _trees(tmp_path)
    orphan = dataset / "labels" / "val" / "no_such_image.txt"
    orphan.write_text("0 0.5 0.5 0.1 0.1\n")
    line = cli_error(capsys, "val", "--weights", CKPT, "--data", data)
    assert (
        line == f"sos-detect val: error: {orphan}: label file without an image (1 in 'val'); Ultralytics would "
        "ignore it: add its image or remove it"
    )


def test_4_images_are_decoded_not_only_their_headers(tmp_path, capsys, monkeypatch):
    """A JPEG cut in half: named in detection data (Ultralytics would drop it, or rewrite it in place) and in an
    ImageFolder for classify (torch's loader failed mid-epoch naming no file)."""
    monkeypatch.chdir(tmp_path)
    dataset, data = _trees(tmp_path)
    cut = sorted((dataset / "images" / "train").iterdir())[3]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    before = snapshot(tmp_path)
    line = cli_error(capsys, "train", "--data", data)
    assert (
        line == f"sos-detect train: error: {cut}: JPEG does not end with its end-of-image marker (cut short, or "
        "bytes after it) (1 of 37 'train' images unreadable)"
    )
    folder = tmp_path / "folder"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (folder / split / cls).mkdir(parents=True)
            for img in sorted((TREES / "images" / split).iterdir())[:2]:
                shutil.copy(img, folder / split / cls / img.name)
    bad = sorted((folder / "val" / "b").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:3000])
    before = snapshot(tmp_path)
    line = cli_error(capsys, "classify", "train", "--model", "smallcnn", "--data", "imagefolder", "--root", folder)
    assert line.startswith(f"sos-detect classify train: error: {bad}: JPEG does not end with"), line
    assert snapshot(tmp_path) == before


def test_5_checkpoint_structure_is_compared(tmp_path, capsys, monkeypatch):
    """A Detect head whose cls conv does not have nc outputs (val/shift ended in a RuntimeError traceback), and a
    last.pt whose optimizer state is NaN (--resume trained on NaN losses)."""
    monkeypatch.chdir(tmp_path)
    ckpt = torch_load(CKPT, map_location="cpu")
    ckpt["model"].model[-1].cv3[1][2] = torch.nn.Conv2d(64, 3, 1)
    torch.save(ckpt, tmp_path / "head.pt")
    ckpt = torch_load(CKPT, map_location="cpu")
    params = list(ckpt["model"].parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    ckpt["optimizer"] = opt.state_dict()
    ckpt["optimizer"]["state"] = {
        i: {"momentum_buffer": torch.full_like(p, float("nan"))} for i, p in enumerate(params)
    }
    ckpt["epoch"] = 0
    (tmp_path / "run" / "weights").mkdir(parents=True)
    torch.save(ckpt, tmp_path / "run" / "weights" / "last.pt")
    before = snapshot(tmp_path)
    head = tmp_path / "head.pt"
    for command, out in (("val", []), ("shift", ["--out", tmp_path / "o.pt"])):
        line = cli_error(capsys, command, "--weights", head, *out)
        assert (
            line == f"sos-detect {command}: error: --weights {head}: model Detect head: cls.1 conv has 3 outputs, "
            "but the head has nc = 1 classes"
        )
    last = tmp_path / "run" / "weights" / "last.pt"
    line = cli_error(capsys, "train", "--resume", last)
    assert line.startswith(f"sos-detect train: error: --resume {last}")
    assert line.endswith(
        ": non-finite optimizer state (NaN or inf): momentum_buffer of parameter 0; it cannot be resumed"
    )
    assert snapshot(tmp_path) == before


def test_6_unchecked_inputs_are_one_line(tmp_path, capsys, monkeypatch):
    """--imgsz far too large (cv2 asked for 28 GB), compare on runs that logged no epoch (ZeroDivisionError), and
    table5's paper preset without the converted VOC (an Ultralytics traceback and a half-made OUT/runs)."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.csv").write_text("epoch,metrics/mAP50(B)\n")
    before = snapshot(tmp_path)
    assert cli_error(capsys, "train", "--imgsz", 100000).endswith("--imgsz 100000: must be an integer in [32, 4096]")
    assert cli_error(capsys, "val", "--weights", CKPT, "imgsz=100000").endswith(": must be an integer in [32, 4096]")
    line = cli_error(capsys, "compare", run)
    assert (
        line == f"sos-detect compare: error: {run / 'results.csv'}: no epoch logged (the run stopped before its "
        "first epoch ended)"
    )
    line = cli_error(capsys, "reproduce", "table5", "--preset", "paper", "--out", tmp_path / "t5")
    assert "images not found: train: ../datasets/voc/images/train" in line and "run `sos-detect data voc" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "--epochs", "0", "epochs=1"], "epochs=1: --epochs 0 was given too; give each option once"),
        (["train", "--epochs", "2", "--epochs", "3"], "--epochs 3: --epochs 2 was given too; give each option once"),
        (["train", "lr0=0.1", "--opt", "lr0=0.2"], "--opt lr0=0.2: lr0=0.1 was given too; give each option once"),
        (["train", "--cfg", "yolov5n.yaml", "model=yolov8n.yaml"], "model=yolov8n.yaml: --cfg yolov5n.yaml was given"),
        (["train", "--sos", "--no-sos"], "--no-sos: --sos was given too; give each option once"),
        (["train", "--no-sos", "--sos-tau", "1e-3"], "--sos-tau 1e-3: has no effect with --no-sos (no shift is made)"),
        (["train", "sos=False", "sos_every=2"], "sos_every=2: has no effect with sos=False (no shift is made)"),
        (["train", "--sos-rows", "8"], "--sos-rows 8: only --sos-mode paper uses it (here: guarded)"),
        (["train", "--sos-mode", "paper", "--sos-rows", "8", "--sos-tau", "0.1"], "--sos-tau 0.1: only --sos-mode "),
        (["hessian", "--weights", CKPT, "--sos-tau", "0.1"], "--sos-tau 0.1: has no effect without --before-after"),
        (["classify", "train", "--sos-batch", "100"], "--sos-batch 100: has no effect without --sos (SOS is off by"),
        (["train", "--name", "../x"], "--name ../x: must be a folder name inside --project (runs/sos), without '..'"),
        (["train", "--name", "/tmp/x"], "--name /tmp/x: must be a folder name inside --project (runs/sos)"),
        (["classify", "train", "--name", "a/../.."], "--name a/../..: must be a folder name inside the project"),
    ],
)
def test_7_conflicting_or_ignored_options_are_refused(tmp_path, capsys, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, *args)
    assert line.split(": error: ", 1)[1].startswith(expected), line
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--arm", "base:sos=False", "--arm", "base:sos_tau=1e-3"],
            "--arm base:sos_tau=1e-3: arm 'base' is given twice",
        ),
        (
            ["--arm", "b:sos=False", "--arm", "g:sos_tau=1e-3,sos_tau=1e-2"],
            "--arm g:sos_tau=1e-3,sos_tau=1e-2: sos_tau ",
        ),
        (["--arm", "../b:sos=False"], "--arm ../b:sos=False: the arm name '../b' may hold only letters"),
        (["--arm", "b:sos=False", "--seeds", "1,1"], "--seeds 1,1: 1 given twice"),
        (["--arm", "b:sos=False", "--seeds="], "--seeds '': must be comma-separated integers"),
        (["--arm", "b:sos=False", "--epochs", "0"], "--epochs 0: must be an integer >= 1"),
        (["--arm", "b:sos=False", "--arm", "g:lr00=3"], "arm 'g': lr00=3: not a training option an arm can set"),
        (["--arm", "b:sos=False", "--arm", "g:lr0=abc"], "arm 'g': 'lr0=abc' is of invalid type str"),
        (["--arm", "b:sos=False", "--opt", "epochs=x"], "--opt: 'epochs=x' is of invalid type str"),
    ],
)
def test_8_reproduce_ab_arguments_are_checked_before_any_arm_trains(tmp_path, capsys, monkeypatch, args, expected):
    from sos_detect.detect.embedded import EMBEDDED_YAML

    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, "reproduce", "ab", "--data", EMBEDDED_YAML, "--out", tmp_path / "ab", *args)
    assert line.split(": error: ", 1)[1].startswith(expected), line
    assert snapshot(tmp_path) == {}


def test_8_a_preset_arm_is_not_replaced(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, "reproduce", "ab", "--preset", "synth-scratch", "--arm", "base:sos_tau=1e-3")
    assert line.endswith(
        "--arm base:sos_tau=1e-3: arm 'base' is already an arm of the preset; give each arm its own name"
    )
    assert snapshot(tmp_path) == {}


def _image_folder(root, classes=("a", "b")):
    for split in ("train", "val"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for img in sorted((TREES / "images" / split).iterdir())[:2]:
                shutil.copy(img, root / split / cls / img.name)
    return root


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
        (["--lr", "0"], "--lr 0.0: must be a finite number > 0"),
        (["--mixup", "-1"], "--mixup -1.0: must be a finite number >= 0"),
        (["--workers", "-1"], "--workers -1: must be an integer >= 0"),
        (["--train-subset", "100000"], "--train-subset 100000: must be an integer in [1, 1347]"),  # 3/4 of 1,797
        (["--imgsz", "100000"], "--imgsz 100000: must be an integer in [1, 4096]"),
    ],
)
def test_9_classify_train_options_are_checked_before_the_run_folder(tmp_path, capsys, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, "classify", "train", "--model", "smallcnn", "--data", "digits", "--epochs", 1, *args)
    assert line.split(": error: ", 1)[1].startswith(expected), line
    assert snapshot(tmp_path) == {}


def test_9_a_one_class_image_folder_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _image_folder(tmp_path / "one", classes=("a",))
    before = snapshot(tmp_path)
    line = cli_error(capsys, "classify", "train", "--model", "smallcnn", "--data", "imagefolder", "--root", folder)
    assert line.endswith(f"{folder / 'train'}: 1 class folder (a); classification needs at least 2")
    assert snapshot(tmp_path) == before


def test_10_sizes_asked_for_are_not_capped(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, "hessian", "--weights", CKPT, "--images", 100000)
    assert line.endswith(f"--images 100000: the training split has only 37 images ({TREES / 'images' / 'train'})")
    assert cli_error(capsys, "data", "fashion-det", "--train", 0).endswith("--train 0: must be an integer >= 1")
    assert snapshot(tmp_path) == {}


def _start_and_kill(cwd):
    """A real `train` process, SIGKILLed once Ultralytics has made its run folder (before its first checkpoint)."""
    cmd = [sys.executable, "-m", "sos_detect.cli", "train", "--epochs", "3", "--imgsz", "64", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Starting training for" in line:
            proc.kill()
            break
    proc.communicate(timeout=60)
    assert any("Starting training for" in line for line in seen), "".join(seen)[-2000:]
    return proc.pid


@pytest.mark.slow  # real training processes, SIGKILLed
def test_11_a_run_killed_before_its_first_checkpoint_is_not_a_run(tmp_path):
    """SIGKILL leaves args.yaml and an empty weights/ (Ultralytics makes them); the next run recognises the folder
    by its marker (a process of this host that is gone), removes it and takes the name again instead of train2."""
    from sos_detect.cli.paths import RUN_MARKER

    first = _start_and_kill(tmp_path)
    run = tmp_path / "runs" / "sos" / "train"
    assert {RUN_MARKER, "args.yaml", "weights"} <= {p.name for p in run.iterdir()}
    assert not any((run / "weights").iterdir()) and (run / RUN_MARKER).read_text().endswith(f" {first}")
    second = _start_and_kill(tmp_path)
    assert sorted(p.name for p in run.parent.iterdir()) == ["train"]  # no train2
    assert (run / RUN_MARKER).read_text().endswith(f" {second}")


def test_12_messages_keep_every_line_and_check_outputs_first(tmp_path, capsys, monkeypatch):
    """A path with a newline is shown whole on one line; compare --out x.csv is refused before any run is read."""
    monkeypatch.chdir(tmp_path)
    odd = tmp_path / "two\nlines.yaml"
    line = cli_error(capsys, "train", "--data", odd)
    assert line == f"sos-detect train: error: --data {tmp_path}/two\\nlines.yaml: data YAML not found"
    line = cli_error(capsys, "compare", tmp_path / "no-run", "--out", "x.csv")
    assert line.startswith("sos-detect compare: error: --out x.csv: .csv is not a figure format; use one of")
    assert snapshot(tmp_path) == {}


def test_an_internal_error_is_one_line_with_the_traceback_in_a_file(tmp_path, capsys, monkeypatch):
    """A bug (here a ZeroDivisionError raised inside compare) is one line saying so, naming the file holding the
    traceback; exit code 1, not 2 (the input was not at fault)."""
    import sos_detect.detect.compare

    def bug(*_, **__):
        return 1 / 0

    monkeypatch.setattr(sos_detect.detect.compare, "compare_runs", bug)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    code, _, err = cli_main(capsys, "compare", tmp_path / "run")
    assert len(err.strip().splitlines()) == 1, err
    line = err.strip()
    prefix = "sos-detect compare: internal error (a bug in sos-detect, please report it): ZeroDivisionError: "
    assert code == 1 and line.startswith(prefix + "division by zero; traceback in "), line
    report = line.rsplit("traceback in ", 1)[1]
    assert report.startswith(str(tmp_path)) and "1 / 0" in Path(report).read_text()


@pytest.mark.slow  # trains an epoch
def test_9_a_diverged_classifier_is_not_saved_as_a_finished_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["classify", "train", "--model", "smallcnn", "--data", "digits", "--epochs", 1, "--lr", 1e30]
    line = cli_error(capsys, *args, "--device", "cpu")
    assert line == "sos-detect classify train: error: --lr 1e+30: training diverged in epoch 1 (loss nan); lower it"
    assert not (tmp_path / "runs" / "classify" / "train").exists()
