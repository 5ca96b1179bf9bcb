"""fashion-det builder: bit-for-bit rebuilds, exact boxes recovered from the pixels, valid YOLO data.

Fashion-MNIST's Debian package is not on CI machines: these tests write a few IDX records of scikit-learn's real
digits (upscaled to 28×28) and build from them; the builder reads them exactly as it reads Fashion-MNIST.
"""

import cv2
import numpy as np
import pytest
from conftest import cli_main

from sos_detect.detect.synthetic import (
    BOX_ALPHA,
    SynthSpec,
    build_fashion_det,
    dataset_digest,
    item_patch,
    paste,
    yolo_lines,
)

TINY = SynthSpec(train=6, val=3, min_size=64, max_size=96, seed=1)


def write_idx(path, array: np.ndarray) -> None:
    """An uncompressed uint8 IDX file (magic 0x0800 | ndim, big-endian dimensions)."""
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def digits_idx(root, per_split: int = 60):
    """Fashion-MNIST-named IDX files holding scikit-learn's digits as 28×28 uint8 images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.stack([cv2.resize(im * 255 / 16, (28, 28), interpolation=cv2.INTER_LINEAR) for im in d.images])
    images = np.pad(images[:, 2:-2, 2:-2], ((0, 0), (2, 2), (2, 2)))  # black border, as Fashion-MNIST's
    root.mkdir(parents=True, exist_ok=True)
    for prefix, sl in (("train", slice(0, per_split)), ("t10k", slice(per_split, 2 * per_split))):
        write_idx(root / f"{prefix}-images-idx3-ubyte", np.clip(images[sl], 0, 255))
        write_idx(root / f"{prefix}-labels-idx1-ubyte", d.target[sl])
    return root


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory):
    return digits_idx(tmp_path_factory.mktemp("idx"))


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_builds_are_identical_and_seed_matters(tmp_path, idx_root):
    counts = build_fashion_det(tmp_path / "a", TINY, idx_root, progress=False)
    build_fashion_det(tmp_path / "b", TINY, idx_root, progress=False)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b and len(a) == 2 * (6 + 3) + 1  # images, labels, the YAML
    assert dataset_digest(tmp_path / "a") == dataset_digest(tmp_path / "b")
    build_fashion_det(tmp_path / "c", SynthSpec(**{**TINY.__dict__, "seed": 2}), idx_root, progress=False)
    assert dataset_digest(tmp_path / "c") != dataset_digest(tmp_path / "a")
    lines = sum(len(v.splitlines()) for k, v in a.items() if k.startswith("labels/train"))
    assert counts == {"train_images": 6, "train_boxes": lines, "val_images": 3, "val_boxes": counts["val_boxes"]}
    assert lines >= 6 * TINY.objects[0] - 2  # items are placed (a crowded image may skip one)


def test_built_data_loads_in_ultralytics(tmp_path, idx_root):
    from sos_detect.detect.data import load_data

    build_fashion_det(tmp_path, TINY, idx_root, progress=False)
    _, data = load_data(tmp_path / "fashion-det.yaml")  # Ultralytics' check and the strict label check
    assert data["nc"] == 10 and data["names"][9] == "Ankle boot"
    for label in (tmp_path / "labels" / "val").glob("*.txt"):
        image = cv2.imread(str(tmp_path / "images" / "val" / f"{label.stem}.jpg"))
        assert 64 <= image.shape[0] <= 96 and 64 <= image.shape[1] <= 96


def test_pasted_box_is_the_tight_box_of_the_item_pixels(idx_root):
    """Black ink on a white canvas: each pixel's opacity is 1 − value/255, so the box can be read off the image."""
    from sos_detect.core.fashion_mnist import read_idx

    items = read_idx(idx_root / "train-images-idx3-ubyte")
    for k, (size, aspect, x, y) in enumerate([(20, 1.0, 5, 7), (33, 0.8, 0, 0), (47, 1.25, 30, 11)]):
        canvas = np.full((80, 100, 3), 255.0)
        alpha, shade = item_patch(items[k], size, aspect)
        box = paste(canvas, alpha, shade, x, y, np.zeros(3))
        opacity = 1 - canvas[..., 0] / 255
        ys, xs = np.nonzero(opacity >= BOX_ALPHA - 1e-9)
        assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert max(box[2] - box[0], box[3] - box[1]) <= size
        (line,) = yolo_lines([(3, box)], 100, 80).splitlines()
        c, xc, yc, w, h = map(float, line.split())
        assert c == 3 and (xc - w / 2) * 100 == pytest.approx(box[0], abs=1e-3)
        assert (yc + h / 2) * 80 == pytest.approx(box[3], abs=1e-3)


def test_cli_missing_root_is_one_line(tmp_path, capsys):
    args = ["data", "fashion-det", "--root", tmp_path / "none", "--out", tmp_path / "out"]
    code, _, err = cli_main(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "none") in err and not (tmp_path / "out").exists()
