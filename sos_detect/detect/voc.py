"""PASCAL VOC (VOCdevkit) → Ultralytics YOLO layout, offline and strict about anomalies.

train = VOC2007 trainval + VOC2012 trainval, val = VOC2007 test (whichever exist). `difficult` objects are
left out of the labels and recorded, per split, in `difficult_{split}.json` for the VOC07 metric.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ultralytics.utils import TQDM

from sos_detect.core.runtime import available_cores
from sos_detect.detect.voc_xml import VocXmlError, parse_voc_xml, voc_to_yolo

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
SPLITS = {"train": (("VOC2007", "trainval"), ("VOC2012", "trainval")), "val": (("VOC2007", "test"),)}


@dataclass
class ConversionSummary:
    images: Counter = field(default_factory=Counter)  # per split
    objects: dict[str, Counter] = field(default_factory=dict)  # split -> class -> count
    difficult: Counter = field(default_factory=Counter)  # per split
    anomalies: list[str] = field(default_factory=list)  # "kind: file: detail"

    def anomaly_counts(self) -> Counter:
        return Counter(a.split(":", 1)[0] for a in self.anomalies)

    def format(self) -> str:
        lines = []
        for split in sorted(self.images):
            per_class = self.objects.get(split, Counter())
            lines.append(
                f"{split}: {self.images[split]} images, {sum(per_class.values())} objects, "
                f"{self.difficult[split]} difficult (kept out of labels)"
            )
            lines.append("  " + ", ".join(f"{c} {per_class[c]}" for c in VOC_CLASSES))
        counts = self.anomaly_counts()
        lines.append("anomalies: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"))
        lines += [f"  {a}" for a in self.anomalies[:50]]
        if len(self.anomalies) > 50:
            lines.append(f"  ... {len(self.anomalies) - 50} more")
        return "\n".join(lines)


def difficult_file(dataset_root: Path, split: str) -> Path:
    """Where the converter records the `difficult` boxes of a split: `<root>/difficult_{split}.json`."""
    return Path(dataset_root) / f"difficult_{split}.json"


def difficult_file_for(image_files: list[Path], split: str = "val") -> Path:
    """The sidecar of a split whose images live in `<root>/images/<split>/` (it may not exist)."""
    return difficult_file(Path(image_files[0]).parent.parent.parent, split)


def _convert_one(task: tuple[str, str, str, str]) -> tuple[str, list[str], list[list[float]], list[str], str | None]:
    """One image: (stem, label lines, difficult boxes [cls, x1, y1, x2, y2] in pixels, anomalies, image path)."""
    xml_path, img_path, stem, _split = task
    anomalies: list[str] = []
    if not Path(img_path).is_file():
        return stem, [], [], [f"missing image: {img_path}: listed in ImageSets but not on disk"], None
    if not Path(xml_path).is_file():
        return stem, [], [], [f"missing XML: {xml_path}: listed in ImageSets but not on disk"], None
    try:
        ann = parse_voc_xml(xml_path)
    except (VocXmlError, OSError) as err:
        return stem, [], [], [f"unreadable XML: {xml_path}: {str(err).split(': ', 1)[-1]}"], None
    w, h = ann.width, ann.height
    if w <= 0 or h <= 0:
        return stem, [], [], [f"unreadable XML: {xml_path}: image size {w}x{h}"], None
    lines, difficult = [], []
    for obj in ann.objects:
        if obj.name not in VOC_CLASSES:
            anomalies.append(f"unknown class: {xml_path}: {obj.name!r}")
            continue
        x1, y1, x2, y2 = obj.xmin, obj.ymin, obj.xmax, obj.ymax
        if x2 < x1 or y2 < y1:  # VOC boxes are inclusive 1-based pixels: x1 == x2 is one pixel wide
            anomalies.append(f"zero-area box: {xml_path}: {obj.name} ({x1}, {y1}, {x2}, {y2}) dropped")
            continue
        if x1 < 1 or y1 < 1 or x2 > w or y2 > h:
            anomalies.append(f"out-of-image box: {xml_path}: {obj.name} ({x1}, {y1}, {x2}, {y2}) clipped to {w}x{h}")
            x1, y1, x2, y2 = max(x1, 1), max(y1, 1), min(x2, w), min(y2, h)
            if x2 < x1 or y2 < y1:
                anomalies.append(f"zero-area box: {xml_path}: {obj.name} empty after clipping, dropped")
                continue
        cls = VOC_CLASSES.index(obj.name)
        if obj.difficult:
            difficult.append([cls, x1 - 1.0, y1 - 1.0, float(x2), float(y2)])
            continue
        xc, yc, bw, bh = voc_to_yolo(x1, y1, x2, y2, w, h)
        lines.append(f"{cls} {xc:.6f} {yc:.6f} {bw:.6f} {bh:.6f}")
    return stem, lines, difficult, anomalies, img_path


def _link(src: str, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        dst.symlink_to(Path(src).resolve())
    except OSError:
        shutil.copy2(src, dst)


def convert_voc(root: str | Path, out: str | Path, workers: int | None = None) -> ConversionSummary:
    """Convert VOCdevkit `root` into `out` (images linked, labels written, data YAML); idempotent."""
    root, out = Path(root), Path(out).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: VOCdevkit folder not found")
    if not any((root / year).is_dir() for year in ("VOC2007", "VOC2012")):
        raise FileNotFoundError(f"{root}: neither VOC2007/ nor VOC2012/ found (pass the VOCdevkit folder)")
    summary = ConversionSummary()
    tasks: dict[str, list[tuple[str, str, str, str]]] = {}
    for split, parts in SPLITS.items():
        tasks[split] = []
        for year, image_set in parts:
            if not (root / year).is_dir():
                continue
            listing = root / year / "ImageSets" / "Main" / f"{image_set}.txt"
            if not listing.is_file():
                summary.anomalies.append(f"missing ImageSets list: {listing}: {year} {image_set} skipped")
                continue
            for image_id in listing.read_text().split():
                tasks[split].append(
                    (
                        str(root / year / "Annotations" / f"{image_id}.xml"),
                        str(root / year / "JPEGImages" / f"{image_id}.jpg"),
                        f"{year}_{image_id}",
                        split,
                    )
                )
    workers = workers or available_cores()
    for split, items in tasks.items():
        if not items:
            continue
        img_dir, lbl_dir = out / "images" / split, out / "labels" / split
        for d in (img_dir, lbl_dir):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        (out / "labels" / f"{split}.cache").unlink(missing_ok=True)
        summary.objects[split] = Counter()
        difficult_map = {}
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = TQDM(pool.map(_convert_one, items, chunksize=64), total=len(items), desc=f"VOC {split}")
            for stem, lines, difficult, anomalies, img_path in results:
                summary.anomalies += anomalies
                if img_path is None:
                    continue
                _link(img_path, img_dir / f"{stem}.jpg")
                (lbl_dir / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
                summary.images[split] += 1
                summary.objects[split].update(VOC_CLASSES[int(line.split()[0])] for line in lines)
                summary.difficult[split] += len(difficult)
                if difficult:
                    difficult_map[stem] = difficult
        difficult_file(out, split).write_text(json.dumps(difficult_map))
    if not summary.images:
        raise FileNotFoundError(f"{root}: no images converted ({len(summary.anomalies)} anomalies)")
    write_voc_yaml(out)
    return summary


def write_voc_yaml(out: Path, root: Path | None = None) -> Path:
    """out/voc.yaml with absolute paths (`root`: where the dataset will be, default `out`) and no download key."""
    lines = [f"path: {root or out}", "train: images/train", "val: images/val", "names:"]
    lines += [f"  {i}: {name}" for i, name in enumerate(VOC_CLASSES)]
    path = out / "voc.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path
