"""VOC conversion on a fixture VOCdevkit built here, and the VOC07 metric on hand-computed cases."""

import json
import re

import cv2
import numpy as np
import pytest
import yaml

from sos_detect.detect.metrics import Detections, GroundTruth, voc07_map
from sos_detect.detect.voc import VOC_CLASSES, convert_voc


def xml(filename, w, h, objects):
    objs = "".join(
        f"<object><name>{n}</name><truncated>{t}</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for n, t, d, (x1, y1, x2, y2) in objects
    )
    return (
        f"<annotation><filename>{filename}</filename><size><width>{w}</width><height>{h}</height>"
        f"<depth>3</depth></size>{objs}</annotation>"
    )


def make_devkit(root):
    v7 = root / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (v7 / sub).mkdir(parents=True)
    (root / "VOC2012" / "Annotations").mkdir(parents=True)  # no ImageSets list: an anomaly
    images = {
        "000001": (
            xml(
                "000001.jpg",
                100,
                80,
                [("dog", 0, 0, (11, 21, 50, 60)), ("cat", 1, 1, (1, 1, 100, 80)), ("person", 1, 0, (60, 10, 99, 79))],
            ),
            True,
        ),
        "000002": (
            xml(
                "000002.jpg",
                120,
                90,
                [
                    ("car", 0, 0, (5, 5, 30, 40)),
                    ("unicorn", 0, 0, (1, 1, 9, 9)),
                    ("bus", 0, 0, (50, 50, 40, 60)),
                    ("bird", 0, 0, (100, 70, 130, 95)),
                ],
            ),
            True,
        ),
        "000003": ("<annotation><size><width>10</width>", True),  # malformed XML
        "000004": (xml("000004.jpg", 50, 50, [("dog", 0, 0, (1, 1, 10, 10))]), False),  # image missing
        "000005": (xml("000005.jpg", 64, 48, [("sheep", 0, 0, (2, 3, 40, 30))]), True),
    }
    for stem, (text, has_image) in images.items():
        (v7 / "Annotations" / f"{stem}.xml").write_text(text)
        if has_image:  # the size its XML states (the malformed one: 16x16)
            w, h = (
                (int(v) for v in re.findall(r"<(?:width|height)>(\d+)<", text)[:2]) if "<height>" in text else (16, 16)
            )
            cv2.imwrite(str(v7 / "JPEGImages" / f"{stem}.jpg"), np.full((h, w, 3), 90, np.uint8))
    (v7 / "ImageSets/Main/trainval.txt").write_text("000001\n000002\n000003\n000004\n")
    (v7 / "ImageSets/Main/test.txt").write_text("000005\n")


def yolo_line(cls_name, x1, y1, x2, y2, w, h):
    """Independent conversion: a VOC box covers pixels x1..x2 (1-based), i.e. [x1-1, x2] continuous."""
    left, top = x1 - 1, y1 - 1
    return [VOC_CLASSES.index(cls_name), (left + x2) / 2 / w, (top + y2) / 2 / h, (x2 - left) / w, (y2 - top) / h]


def read_labels(path):
    return [[float(v) for v in line.split()] for line in path.read_text().splitlines()]


def test_conversion_labels_difficult_and_anomalies(tmp_path):
    make_devkit(tmp_path / "VOCdevkit")
    out = tmp_path / "voc"
    summary = convert_voc(tmp_path / "VOCdevkit", out, workers=2)
    assert summary.images == {"train": 2, "val": 1}
    np.testing.assert_allclose(
        read_labels(out / "labels/train/VOC2007_000001.txt"),
        [yolo_line("dog", 11, 21, 50, 60, 100, 80), yolo_line("person", 60, 10, 99, 79, 100, 80)],
        atol=1e-6,
    )  # truncated: kept
    np.testing.assert_allclose(
        read_labels(out / "labels/train/VOC2007_000002.txt"),
        [yolo_line("car", 5, 5, 30, 40, 120, 90), yolo_line("bird", 100, 70, 120, 90, 120, 90)],
        atol=1e-6,
    )  # clipped to 120x90
    np.testing.assert_allclose(
        read_labels(out / "labels/val/VOC2007_000005.txt"), [yolo_line("sheep", 2, 3, 40, 30, 64, 48)], atol=1e-6
    )
    assert json.loads((out / "difficult_train.json").read_text()) == {
        "VOC2007_000001": [[VOC_CLASSES.index("cat"), 0.0, 0.0, 100.0, 80.0]]
    }
    kinds = summary.anomaly_counts()
    assert kinds == {
        "missing ImageSets list": 1,
        "unreadable XML": 1,
        "missing image": 1,
        "unknown class": 1,
        "zero-area box": 1,
        "out-of-image box": 1,
    }
    text = "\n".join(summary.anomalies)
    for needle in (
        "VOC2012/ImageSets/Main/trainval.txt",
        "000003.xml",
        "000004.jpg",
        "'unicorn'",
        "bus",
        "bird (100.0, 70.0, 130.0, 95.0) clipped",
    ):
        assert needle in text
    assert summary.objects["train"] == {"dog": 1, "person": 1, "car": 1, "bird": 1}
    assert summary.difficult["train"] == 1
    yaml_text = (out / "voc.yaml").read_text()
    assert f"path: {out.resolve()}" in yaml_text and "download" not in yaml_text
    assert (out / "images/train/VOC2007_000001.jpg").resolve() == (tmp_path / "VOCdevkit/VOC2007/JPEGImages/000001.jpg")

    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    again = convert_voc(tmp_path / "VOCdevkit", out, workers=1)  # idempotent
    assert again.images == summary.images and again.anomalies == summary.anomalies
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_missing_devkit_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither VOC2007"):
        convert_voc(tmp_path, tmp_path / "out")


def gt(boxes, cls, difficult):
    return GroundTruth(np.array(boxes, float).reshape(-1, 4), np.array(cls), np.array(difficult, bool), 100, 100)


def det(boxes, conf, cls):
    return Detections(np.array(boxes, float).reshape(-1, 4), np.array(conf, float), np.array(cls))


def test_voc07_hand_computed_with_difficult_and_duplicates():
    truths = {
        "a": gt([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0], [False, True]),
        "b": gt([[20, 20, 40, 40]], [0], [False]),
    }
    dets = {
        "a": det(
            [[0, 0, 10, 10], [0, 0, 10, 11], [50, 50, 60, 60], [80, 80, 90, 90]], [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 0]
        ),
        "b": det([[21, 20, 40, 40]], [0.5], [0]),
    }
    # sorted: TP(.9), FP duplicate(.8), ignored difficult(.7), FP(.6), TP(.5); npos = 2
    # recall .5 .5 .5 1; precision 1 .5 .333 .5 → 11-point: t ≤ .5 → 1 (6 points), t ≥ .6 → .5 (5 points)
    mean, aps = voc07_map(dets, truths, nc=2)
    assert aps[0] == pytest.approx((6 * 1.0 + 5 * 0.5) / 11)
    assert np.isnan(aps[1]) and mean == pytest.approx(aps[0])


def test_voc07_perfect_and_missed():
    truths = {"a": gt([[0, 0, 10, 10]], [0], [False]), "b": gt([[0, 0, 10, 10]], [1], [False])}
    dets = {"a": det([[0, 0, 10, 10]], [0.9], [0]), "b": det([[30, 30, 40, 40]], [0.9], [1])}
    mean, aps = voc07_map(dets, truths, nc=2)
    assert aps.tolist() == [1.0, 0.0] and mean == 0.5
    # IoU just under 0.5 does not match: 10x10 vs 10x(10/1.5·…)
    low = {"a": det([[0, 0, 10, 20.5]], [0.9], [0])}  # IoU = 100 / 205 < 0.5
    assert voc07_map(low, {"a": truths["a"]}, nc=1)[0] == 0.0


def test_missing_xml_is_named_as_missing(tmp_path):
    make_devkit(tmp_path / "VOCdevkit")
    xml_file = tmp_path / "VOCdevkit/VOC2007/Annotations/000001.xml"
    xml_file.unlink()
    summary = convert_voc(tmp_path / "VOCdevkit", tmp_path / "voc", workers=1)
    assert f"missing XML: {xml_file}: listed in ImageSets but not on disk" in summary.anomalies
    assert summary.images == {"train": 1, "val": 1}


@pytest.mark.slow  # trains in a real process
def test_mission_command_after_conversion(tmp_path, monkeypatch, capsys):
    """`sos-detect train --cfg yolov5s.yaml --data voc.yaml` finds the converted VOC (tiny settings); before the
    conversion it says in one line what to run (in this process), and `--data configs/voc.yaml` names the real
    missing path."""
    from conftest import cli_error, run_cli, snapshot

    from sos_detect.detect.embedded import REPO_ROOT

    make_devkit(tmp_path / "VOCdevkit")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for name in ("voc.yaml", "VOC.yaml"):
        assert cli_error(capsys, "train", "--cfg", "yolov5s.yaml", "--data", name) == (
            f"sos-detect train: error: --data {name}: no converted PASCAL VOC here (datasets/voc/images/train not "
            "found); run `sos-detect data voc --root /path/to/VOCdevkit --out datasets/voc` first"
        )
    if not (REPO_ROOT / "datasets" / "voc").exists():
        line = cli_error(capsys, "train", "--data", REPO_ROOT / "configs" / "voc.yaml")
        assert f"train: ../datasets/voc/images/train is {REPO_ROOT}/datasets/voc/images/train, which does not" in line
    assert snapshot(work) == {}
    res = run_cli("data", "voc", "--root", tmp_path / "VOCdevkit", "--out", "datasets/voc", "--workers", 1, cwd=work)
    assert res.returncode == 0, res.stderr[-2000:]
    tiny = [
        "--epochs",
        1,
        "--imgsz",
        64,
        "--batch",
        2,
        "--sos-images",
        2,
        "--device",
        "cpu",
        "workers=0",
        "plots=False",
    ]
    res = run_cli("train", "--cfg", "yolov5s.yaml", "--data", "voc.yaml", *tiny, cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    run = work / "runs" / "sos" / "train"
    args = yaml.safe_load((run / "args.yaml").read_text())
    assert args["data"] == str(work / "datasets" / "voc" / "voc.yaml") and args["model"] == "yolov5s.yaml"
    assert (run / "weights" / "last.pt").is_file()
