"""Bad input never costs a model (issue #17): every case is one line naming the file or option as typed,
exit code 2, no input changed and nothing written. Real files, real processes."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
import torch
from conftest import error_line, run_cli, snapshot
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
            f"--weights {d / 'cls.pt'}: a YOLO classification checkpoint (ClassificationModel), not a detector; {need}",
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
def test_bad_input_is_one_line_and_writes_nothing(inputs, tmp_path, index):
    ro = _read_only_dir(tmp_path)
    all_cases = cases(inputs["dir"], inputs["nan_name"], inputs["first_corrupt"], ro)
    assert len(all_cases) == CASE_COUNT
    args, expected = all_cases[index]
    work = tmp_path / "work"
    work.mkdir()
    before = snapshot(inputs["dir"], CKPT, TREES)
    res = run_cli(*args, "--device", "cpu", cwd=work)
    line = error_line(res)
    command = " ".join(a for a in map(str, args[:2]) if not a.startswith("-") and "=" not in a and "/" not in a)
    assert line.startswith(f"sos-detect {command}: error: "), line
    assert expected in line, line
    assert snapshot(inputs["dir"], CKPT, TREES) == before  # no input changed
    assert snapshot(work) == {}  # nothing written where the command ran


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


def test_an_ultralytics_dataset_name_offline_says_what_is_missing(tmp_path):
    from ultralytics.utils import DATASETS_DIR

    if (DATASETS_DIR / "coco8").exists():
        pytest.skip("coco8 is installed here")
    res = run_cli("train", "--data", "coco8.yaml", cwd=tmp_path, env={"YOLO_OFFLINE": "1"})
    line = error_line(res)
    assert line.startswith("sos-detect train: error: --data coco8.yaml (") and "cfg/datasets/coco8.yaml)" in line
    assert f"images not found: train: images/train is {DATASETS_DIR}/coco8/images/train, which does not exist" in line
    assert line.endswith("Ultralytics would download it, but downloads are off (YOLO_OFFLINE=1, see the README)")
    assert snapshot(tmp_path) == {}


# -- round 2 (issue #25): one test per cause ------------------------------------------------------------------------


def _main(capsys, *args):
    """`sos-detect ARGS` in this process: (exit code, the single stderr line)."""
    from sos_detect.cli import main

    code = main([str(a) for a in args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return code, lines[0]


def _refused(capsys, *args):
    code, line = _main(capsys, *args)
    assert code == 2, line
    return line


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
        line = _refused(capsys, *args)
        assert f"error: --out {dataset}: not empty (" in line and "pass --force" in line, line
        assert snapshot(tmp_path) == before
    assert _refused(capsys, "data", "voc", "--root", tmp_path / "none", "--out", tmp_path / "new" / "voc")
    assert snapshot(tmp_path) == before  # a failed build into a new folder leaves no folder behind
    assert main(["data", "fashion-det", *map(str, tiny), "--out", str(dataset), "--force"]) == 0
    assert (dataset / "mine.txt").read_text() == "my notes" and (dataset / "fashion-det.yaml").is_file()
    assert sorted(p.name for p in (dataset / "images" / "train").iterdir()) == ["train_00000.jpg", "train_00001.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "trees", "trees.yaml"]  # no build folder left


def test_2_untrusted_yaml_is_bounded_before_anything_reads_it(tmp_path):
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
    for file, (text, expected) in files.items():
        (tmp_path / file).write_text(text)
        res = run_cli("train", "--data", tmp_path / file, cwd=tmp_path, timeout=120)
        assert error_line(res) == f"sos-detect train: error: {tmp_path / file}: " + error_line(res).split(": ", 3)[3]
        assert expected in error_line(res)
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
    assert _refused(capsys, "train", "--data", data) == f"sos-detect train: error: {label}:1: {expected}"
    assert snapshot(tmp_path) == before


def test_3_an_orphan_label_file_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dataset, data = _trees(tmp_path)
    orphan = dataset / "labels" / "val" / "no_such_image.txt"
    orphan.write_text("0 0.5 0.5 0.1 0.1\n")
    line = _refused(capsys, "val", "--weights", CKPT, "--data", data)
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
    line = _refused(capsys, "train", "--data", data)
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
    line = _refused(capsys, "classify", "train", "--model", "smallcnn", "--data", "imagefolder", "--root", folder)
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
        line = _refused(capsys, command, "--weights", head, *out)
        assert (
            line == f"sos-detect {command}: error: --weights {head}: model Detect head: cls.1 conv has 3 outputs, "
            "but the head has nc = 1 classes"
        )
    last = tmp_path / "run" / "weights" / "last.pt"
    line = _refused(capsys, "train", "--resume", last)
    assert line.startswith(f"sos-detect train: error: --resume {last}")
    assert line.endswith(
        ": non-finite optimizer state (NaN or inf): momentum_buffer of parameter 0; it cannot be resumed"
    )
    assert snapshot(tmp_path) == before
