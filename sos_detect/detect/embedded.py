"""The embedded real dataset: NEON aerial tree crowns from the deepforest 2.1.0 wheel, tiled to YOLO format.

Source images (MIT, weecology/DeepForest) carry PASCAL VOC XML boxes of class `Tree`. Large images are cut
into a grid of ~`tile` px tiles; boxes are clipped to each tile and dropped when less than `min_keep` of
their area remains (slivers). Every fifth tile (sorted by name) goes to val: deterministic.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

import cv2
import numpy as np

from sos_detect.detect.voc_xml import parse_voc_xml

SOURCES = (
    "OSBS_029",
    "2019_YELL_2_541000_4977000_image_crop",
    "2019_YELL_2_528000_4978000_image_crop2",
)
REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_YAML = REPO_ROOT / "configs" / "deepforest.yaml"


def _extract(src: Path, work: Path) -> Path:
    """The folder holding deepforest's data files, from an unpacked folder or the wheel itself."""
    if src.is_dir():
        for cand in (src, src / "deepforest" / "data", src / "data"):
            if (cand / f"{SOURCES[0]}.xml").exists():
                return cand
        raise FileNotFoundError(f"{src}: no {SOURCES[0]}.xml found (expected deepforest's data folder)")
    if not zipfile.is_zipfile(src):
        raise FileNotFoundError(f"{src}: not a deepforest wheel or data folder")
    with zipfile.ZipFile(src) as zf:
        for name in SOURCES:
            for ext in (".png", ".xml"):
                zf.extract(f"deepforest/data/{name}{ext}", work)
    return work / "deepforest" / "data"


def _grid(size: int, tile: int) -> list[tuple[int, int]]:
    n = max(1, round(size / tile))
    edges = np.linspace(0, size, n + 1).round().astype(int)
    return list(zip(edges[:-1], edges[1:], strict=True))


def tile_boxes(boxes: np.ndarray, x0: int, y0: int, x1: int, y1: int, min_keep: float) -> np.ndarray:
    """Boxes (k, 4) in continuous pixel xyxy clipped to the tile, in tile coordinates; slivers dropped."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4)
    clipped = np.stack(
        [boxes[:, 0].clip(x0, x1), boxes[:, 1].clip(y0, y1), boxes[:, 2].clip(x0, x1), boxes[:, 3].clip(y0, y1)], 1
    )
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept_area = (clipped[:, 2] - clipped[:, 0]).clip(0) * (clipped[:, 3] - clipped[:, 1]).clip(0)
    keep = kept_area >= min_keep * area
    return clipped[keep] - np.array([x0, y0, x0, y0], dtype=float)


def build_embedded(src: str | Path, out: str | Path, *, tile: int = 400, min_keep: float = 0.4) -> dict[str, int]:
    """Write images/{train,val}/*.jpg and labels/{train,val}/*.txt under `out`; return counts."""
    src, out = Path(src), Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = _extract(src, Path(tmp))
        tiles = []
        for name in SOURCES:
            ann = parse_voc_xml(data_dir / f"{name}.xml")
            image = cv2.imread(str(data_dir / f"{name}.png"), cv2.IMREAD_COLOR)
            if image is None:
                raise FileNotFoundError(f"{data_dir / name}.png: missing or unreadable image")
            boxes = np.array([[o.xmin, o.ymin, o.xmax, o.ymax] for o in ann.objects], dtype=float).reshape(-1, 4)
            h, w = image.shape[:2]
            for r, (y0, y1) in enumerate(_grid(h, tile)):
                for c, (x0, x1) in enumerate(_grid(w, tile)):
                    tb = tile_boxes(boxes, x0, y0, x1, y1, min_keep)
                    tiles.append((f"{name}_r{r}c{c}", image[y0:y1, x0:x1], tb))
    for sub in ("images", "labels"):  # a rebuild replaces the previous one whole
        shutil.rmtree(out / sub, ignore_errors=True)
    counts = {"train_images": 0, "val_images": 0, "train_boxes": 0, "val_boxes": 0}
    for i, (stem, img, boxes) in enumerate(sorted(tiles, key=lambda t: t[0])):
        split = "val" if i % 5 == 2 else "train"
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / "images" / split / f"{stem}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        h, w = img.shape[:2]
        lines = [
            f"0 {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} {(b[2] - b[0]) / w:.6f} {(b[3] - b[1]) / h:.6f}"
            for b in boxes
        ]
        (out / "labels" / split / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
        counts[f"{split}_images"] += 1
        counts[f"{split}_boxes"] += len(lines)
    return counts


def task_labels(line: str, task: str, points: int = 12) -> str:
    """One embedded `cls xc yc w h` box as a label of another Ultralytics task: segment, the ellipse inscribed in the
    box as a `points`-gon; pose, the box with one keypoint at its centre (visible); obb, the box's four corners."""
    cls, xc, yc, w, h = line.split()
    x, y, bw, bh = (float(v) for v in (xc, yc, w, h))
    if task == "segment":
        angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
        xy = np.stack([x + bw / 2 * np.cos(angles), y + bh / 2 * np.sin(angles)], 1).clip(0, 1)
        return f"{cls} " + " ".join(f"{v:.6f}" for v in xy.ravel())
    if task == "pose":
        return f"{cls} {xc} {yc} {w} {h} {xc} {yc} 2"
    if task == "obb":
        x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in (x - bw / 2, y - bh / 2, x + bw / 2, y + bh / 2))
        return f"{cls} " + " ".join(f"{v:.6f}" for v in (x0, y0, x1, y0, x1, y1, x0, y1))
    raise ValueError(f"task {task!r}: one of segment, pose, obb")


def build_task_data(task: str, out: str | Path) -> Path:
    """The embedded tree dataset as a `task` dataset under `out` (images copied, labels from `task_labels`); returns
    its data YAML. Small real data for trying (and testing) SOS on segment, pose and OBB models."""
    out = Path(out)
    root = REPO_ROOT / "data" / "deepforest"
    for split in ("train", "val"):
        shutil.copytree(root / "images" / split, out / "images" / split, dirs_exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for label in sorted((root / "labels" / split).glob("*.txt")):
            lines = [task_labels(line, task) for line in label.read_text().splitlines() if line.strip()]
            (out / "labels" / split / label.name).write_text("".join(f"{line}\n" for line in lines))
    extra = "kpt_shape: [1, 3]\nflip_idx: [0]\n" if task == "pose" else ""
    yaml_path = out / f"trees-{task}.yaml"
    yaml_path.write_text(f"path: {out.resolve()}\ntrain: images/train\nval: images/val\n{extra}names:\n  0: Tree\n")
    return yaml_path
