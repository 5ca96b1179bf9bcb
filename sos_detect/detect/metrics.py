"""Detection metrics beside Ultralytics': PASCAL VOC2007 11-point AP and COCO AP via pycocotools.

Boxes are continuous pixel xyxy in the original image. Ground truth comes from the YOLO label files plus
the `difficult_{split}.json` sidecar written by the VOC converter (difficult objects are ignored: a
detection matched to one is neither a true nor a false positive, as in the official devkit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class GroundTruth:
    boxes: np.ndarray  # (k, 4) xyxy pixels
    cls: np.ndarray  # (k,) int
    difficult: np.ndarray  # (k,) bool
    width: int
    height: int


@dataclass
class Detections:
    boxes: np.ndarray  # (d, 4) xyxy pixels
    conf: np.ndarray  # (d,)
    cls: np.ndarray  # (d,) int


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of continuous xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod((rb - lt).clip(0), axis=2)
    area = lambda x: np.prod((x[:, 2:] - x[:, :2]).clip(0), axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-12)


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """11-point interpolated AP: mean over t ∈ {0, 0.1, …, 1} of max precision at recall ≥ t."""
    points = [precision[recall >= t].max() if np.any(recall >= t) else 0.0 for t in np.linspace(0, 1, 11)]
    return float(np.mean(points))


def voc07_map(
    detections: dict[str, Detections], truths: dict[str, GroundTruth], nc: int, iou: float = 0.5
) -> tuple[float, np.ndarray]:
    """(mAP over classes with ground truth, per-class AP with NaN where a class has none)."""
    aps = np.full(nc, np.nan)
    for c in range(nc):
        gts = {k: (g.boxes[g.cls == c], g.difficult[g.cls == c]) for k, g in truths.items()}
        npos = sum(int((~d).sum()) for _, d in gts.values())
        if npos == 0:
            continue
        dets = [
            (float(s), k, b)
            for k, d in detections.items()
            for s, b in zip(d.conf[d.cls == c], d.boxes[d.cls == c], strict=True)
        ]
        dets.sort(key=lambda x: -x[0])
        used = {k: np.zeros(len(b), bool) for k, (b, _) in gts.items()}
        tp, fp = [], []
        for _, key, box in dets:
            gt_boxes, difficult = gts.get(key, (np.zeros((0, 4)), np.zeros(0, bool)))
            if len(gt_boxes):
                overlaps = box_iou(box[None], gt_boxes)[0]
                j = int(overlaps.argmax())
                if overlaps[j] >= iou:
                    if difficult[j]:
                        continue  # ignored
                    if not used[key][j]:
                        used[key][j] = True
                        tp.append(1), fp.append(0)
                        continue
            tp.append(0), fp.append(1)  # no match, or a duplicate of a matched object
        tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
        recall = tp_c / npos
        precision = tp_c / np.maximum(tp_c + fp_c, np.finfo(float).eps)
        aps[c] = voc07_ap(recall, precision) if len(dets) else 0.0
    return float(np.nanmean(aps)) if np.any(~np.isnan(aps)) else 0.0, aps


def load_ground_truth(image_files: list[Path], difficult_file: Path | None = None) -> dict[str, GroundTruth]:
    """Ground truth per image stem from YOLO labels (+ difficult sidecar, if it exists)."""
    from PIL import Image
    from ultralytics.data.utils import img2label_paths

    difficult = json.loads(difficult_file.read_text()) if difficult_file and difficult_file.is_file() else {}
    truths = {}
    for img, label in zip(image_files, img2label_paths([str(f) for f in image_files]), strict=True):
        with Image.open(img) as im:
            w, h = im.size
        text = Path(label).read_text() if Path(label).is_file() else ""
        rows = np.array([line.split() for line in text.splitlines() if line.strip()], float).reshape(-1, 5)
        xc, yc, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
        boxes = np.stack([xc - bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2], 1)
        cls = rows[:, 0].astype(int)
        extra = np.array(difficult.get(Path(img).stem, []), dtype=float).reshape(-1, 5)
        truths[Path(img).stem] = GroundTruth(
            boxes=np.concatenate([boxes, extra[:, 1:]]),
            cls=np.concatenate([cls, extra[:, 0].astype(int)]),
            difficult=np.concatenate([np.zeros(len(cls), bool), np.ones(len(extra), bool)]),
            width=w,
            height=h,
        )
    return truths


def predict(
    weights: str | Path,
    image_files: list[Path],
    *,
    imgsz: int,
    batch: int,
    device: str,
    conf: float = 0.001,
    iou: float = 0.7,
    max_det: int = 300,
) -> dict[str, Detections]:
    """Ultralytics predictions (validation thresholds) per image stem, in original pixels."""
    from ultralytics import YOLO

    model = YOLO(str(weights))
    out = {}
    for i in range(0, len(image_files), 256):
        chunk = [str(f) for f in image_files[i : i + 256]]
        for r in model.predict(
            chunk,
            imgsz=imgsz,
            batch=batch,
            device=device,
            conf=conf,
            iou=iou,
            max_det=max_det,
            verbose=False,
            stream=True,
        ):
            b = r.boxes
            out[Path(r.path).stem] = Detections(
                b.xyxy.cpu().numpy().astype(float), b.conf.cpu().numpy(), b.cls.cpu().numpy().astype(int)
            )
    return out


def val_truth(data: dict) -> tuple[list[Path], dict[str, GroundTruth], Path]:
    """(images, ground truth, the difficult-object sidecar path) of data['val']: with `predict`, the inputs of VOC07
    and COCO AP (the sidecar need not exist: then no object is difficult)."""
    from sos_detect.detect.data import image_files
    from sos_detect.detect.voc import difficult_file_for

    files = image_files(data["val"])
    sidecar = difficult_file_for(files)
    return files, load_ground_truth(files, sidecar), sidecar


def coco_eval(
    detections: dict[str, Detections], truths: dict[str, GroundTruth], names: dict[int, str], out_dir: Path
) -> tuple[float, float]:
    """Write COCO-format ground truth and predictions JSON, evaluate with pycocotools: (AP50, AP50-95).

    Difficult objects become `iscrowd` regions, which COCOeval ignores in the same way.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for image_id, (stem, gt) in enumerate(sorted(truths.items()), 1):
        images.append({"id": image_id, "file_name": stem, "width": gt.width, "height": gt.height})
        for box, c, diff in zip(gt.boxes, gt.cls, gt.difficult, strict=True):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(c) + 1,
                    "bbox": [float(box[0]), float(box[1]), w, h],
                    "area": w * h,
                    "iscrowd": int(diff),
                }
            )
        det = detections.get(stem)
        if det is not None:
            for box, s, c in zip(det.boxes, det.conf, det.cls, strict=True):
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": int(c) + 1,
                        "score": float(s),
                        "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                    }
                )
    gt_json = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in names.items()],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gt_coco.json").write_text(json.dumps(gt_json))
    (out_dir / "predictions.json").write_text(json.dumps(results))
    if not results:
        return 0.0, 0.0
    gt = COCO(str(out_dir / "gt_coco.json"))
    ev = COCOeval(gt, gt.loadRes(str(out_dir / "predictions.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return float(ev.stats[1]), float(ev.stats[0])
