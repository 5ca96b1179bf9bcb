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
