"""Head discovery on real Ultralytics architectures and checkpoints; the embedded data's tiling."""

import numpy as np
import pytest
import torch
from ultralytics import YOLO
from ultralytics.nn.tasks import ClassificationModel, DetectionModel

from sos_detect.detect.embedded import EMBEDDED_YAML, REPO_ROOT, tile_boxes
from sos_detect.detect.heads import detect_head_layers

# (out, in) of the 1×1 output convs at nc = 80, from each YAML's channel widths and Detect's
# c2 = max(16, ch0 // 4, 4·reg_max), c3 = max(ch0, min(nc, 100)).
EXPECTED = {
    "yolov5n.yaml": ({"box": (64, 64), "cls": (80, 80)}, False),
    "yolov8n.yaml": ({"box": (64, 64), "cls": (80, 80)}, False),
    "yolo11n.yaml": ({"box": (64, 64), "cls": (80, 80)}, False),
    "yolo26n.yaml": ({"box": (4, 16), "cls": (80, 80)}, True),  # reg_max = 1, end-to-end one2one copies
}


@pytest.mark.parametrize("cfg", list(EXPECTED))
def test_head_layers_from_yaml(cfg):
    shapes, end2end = EXPECTED[cfg]
    layers = detect_head_layers(YOLO(cfg))
    prefixes = ["box", "cls"] + (["one2one_box", "one2one_cls"] if end2end else [])
    assert list(layers) == [f"{p}.{i}" for p in prefixes for i in range(3)]
    for name, conv in layers.items():
        out_c, in_c = shapes[name.split(".")[0].removeprefix("one2one_")]
        assert tuple(conv.weight.shape) == (out_c, in_c, 1, 1)
    assert list(detect_head_layers(YOLO(cfg), which="cls")) == [n for n in layers if "cls" in n]


def test_yolov5s_widths_at_voc_classes():
    layers = detect_head_layers(DetectionModel("yolov5s.yaml", nc=20, verbose=False))
    assert [c.in_channels for c in layers.values()] == [64, 64, 64, 128, 128, 128]
    assert [c.out_channels for c in layers.values()] == [64, 64, 64, 20, 20, 20]


def test_head_layers_of_a_loaded_checkpoint(tmp_path):
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    torch.save({"model": model.half()}, tmp_path / "m.pt")
    layers = detect_head_layers(YOLO(str(tmp_path / "m.pt")))
    assert len(layers) == 6 and layers["cls.2"].out_channels == 3


def test_model_without_detect_head_is_refused():
    with pytest.raises(TypeError, match="no Ultralytics Detect head"):
        detect_head_layers(ClassificationModel("yolov8n-cls.yaml", nc=2, verbose=False))
    with pytest.raises(ValueError, match="sos_heads"):
        detect_head_layers(YOLO("yolov5n.yaml"), which="box,obj")


def test_tile_boxes_clips_and_drops_slivers():
    boxes = np.array([[10, 10, 50, 50], [90, 10, 130, 50], [95, 60, 140, 90], [0, 0, 5, 5.0]])
    got = tile_boxes(boxes, 0, 0, 100, 100, min_keep=0.4)
    # box 2 keeps 10/40 of its width (< 40 %): dropped; box 3 keeps 5/45: dropped
    np.testing.assert_allclose(got, [[10, 10, 50, 50], [0, 0, 5, 5]])
    shifted = tile_boxes(boxes, 80, 0, 200, 100, min_keep=0.4)
    np.testing.assert_allclose(shifted, [[10, 10, 50, 50], [15, 60, 60, 90]])


def test_embedded_dataset_is_complete():
    root = REPO_ROOT / "data" / "deepforest"
    assert EMBEDDED_YAML.is_file() and (root / "NOTICE").is_file()
    for split, n_images, n_boxes in (("train", 37, 706), ("val", 9, 231)):
        images = sorted((root / "images" / split).glob("*.jpg"))
        labels = [root / "labels" / split / f"{p.stem}.txt" for p in images]
        assert len(images) == n_images
        assert sum(len(p.read_text().splitlines()) for p in labels) == n_boxes


def test_build_embedded_from_a_data_folder(tmp_path):
    """The builder on a stand-in deepforest data folder: tiles, clipped labels, deterministic split, rebuild."""
    import cv2

    from sos_detect.detect.embedded import SOURCES, build_embedded

    src = tmp_path / "deepforest" / "data"
    src.mkdir(parents=True)
    sizes = {SOURCES[0]: (400, 400), SOURCES[1]: (800, 410), SOURCES[2]: (1200, 820)}
    for name, (w, h) in sizes.items():
        cv2.imwrite(str(src / f"{name}.png"), np.full((h, w, 3), 90, np.uint8))
        objs = "".join(
            f"<object><name>Tree</name><difficult>0</difficult><bndbox><xmin>{x}</xmin><ymin>10</ymin>"
            f"<xmax>{x + 30}</xmax><ymax>40</ymax></bndbox></object>"
            for x in (50, 385)
        )
        (src / f"{name}.xml").write_text(
            f"<annotation><size><width>{w}</width><height>{h}</height></size>{objs}</annotation>"
        )
    counts = build_embedded(tmp_path, tmp_path / "out")
    # tiles: 1×1 + 1×2 + 2×3 = 9, every fifth (i % 5 == 2 in name order) is val
    assert counts["train_images"] + counts["val_images"] == 9 and counts["val_images"] == 2
    label = (tmp_path / "out/labels/train" / f"{SOURCES[0]}_r0c0.txt").read_text().split()
    # OSBS tile = whole 400×400 image; box (385, 10, 415, 40) clipped to x ≤ 400 keeps 15/30 ≥ 40 %
    assert [float(v) for v in label[5:]] == pytest.approx([0, 392.5 / 400, 25 / 400, 15 / 400, 30 / 400], abs=1e-6)
    before = sorted(p.name for p in (tmp_path / "out").rglob("*.txt"))
    assert build_embedded(tmp_path, tmp_path / "out") == counts
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.txt")) == before
