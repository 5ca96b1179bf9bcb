"""PASCAL VOC annotation XML: parsing and conversion of boxes to YOLO's normalised xywh."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VocObject:
    name: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    difficult: bool = False
    truncated: bool = False


@dataclass(frozen=True)
class VocAnnotation:
    filename: str
    width: int
    height: int
    objects: tuple[VocObject, ...]


class VocXmlError(ValueError):
    """An annotation file that cannot be read; the message names the file."""


def _flag(obj: ET.Element, tag: str) -> bool:
    text = obj.findtext(tag)
    return bool(text) and text.strip() not in {"0", ""}


def parse_voc_xml(path: str | Path) -> VocAnnotation:
    """Read one VOC XML file; box coordinates stay in VOC's 1-based pixel convention."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
        size = root.find("size")
        width, height = int(float(size.findtext("width"))), int(float(size.findtext("height")))
        objects = []
        for obj in root.iter("object"):
            box = obj.find("bndbox")
            objects.append(
                VocObject(
                    name=obj.findtext("name").strip(),
                    xmin=float(box.findtext("xmin")),
                    ymin=float(box.findtext("ymin")),
                    xmax=float(box.findtext("xmax")),
                    ymax=float(box.findtext("ymax")),
                    difficult=_flag(obj, "difficult"),
                    truncated=_flag(obj, "truncated"),
                )
            )
    except (ET.ParseError, AttributeError, TypeError, ValueError) as err:
        raise VocXmlError(f"{path}: unreadable VOC annotation ({err})") from err
    return VocAnnotation(root.findtext("filename") or path.stem, width, height, tuple(objects))


def voc_to_yolo(xmin: float, ymin: float, xmax: float, ymax: float, width: int, height: int) -> tuple[float, ...]:
    """VOC 1-based inclusive pixel box → YOLO (xc, yc, w, h) normalised to [0, 1].

    Pixel i covers [i−1, i] in continuous coordinates, so the box spans [xmin−1, xmax].
    """
    x0, y0 = xmin - 1.0, ymin - 1.0
    return ((x0 + xmax) / 2 / width, (y0 + ymax) / 2 / height, (xmax - x0) / width, (ymax - y0) / height)
