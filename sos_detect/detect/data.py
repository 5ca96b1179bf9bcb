"""Dataset YAML resolution and a strict pre-flight check of YOLO label files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sos_detect.detect.embedded import EMBEDDED_YAML


class DataError(ValueError):
    """A dataset problem; the message names the file."""


def image_files(source: str | list[str]) -> list[Path]:
    from ultralytics.data.utils import IMG_FORMATS

    files: list[Path] = []
    for entry in source if isinstance(source, list) else [source]:
        p = Path(entry)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix[1:].lower() in IMG_FORMATS)
        elif p.is_file() and p.suffix == ".txt":
            parent = p.parent
            for line in p.read_text().splitlines():
                line = line.strip()
                if line:
                    files.append((parent / line).resolve() if line.startswith("./") else Path(line))
        else:
            raise DataError(f"{p}: image folder or list not found")
    return files


def check_labels(data: dict[str, Any], splits: tuple[str, ...] = ("train", "val")) -> int:
    """Every label line must be `cls xc yc w h` with a known class and coordinates in [0, 1]; returns #labels.

    Ultralytics would silently drop such files as 'corrupt'; here they are an error naming file and line.
    """
    from ultralytics.data.utils import img2label_paths

    nc, checked = int(data["nc"]), 0
    for split in splits:
        if not data.get(split):
            continue
        images = image_files(data[split])
        if not images:
            raise DataError(f"{data[split]}: no images for split '{split}'")
        for label in map(Path, img2label_paths([str(f) for f in images])):
            if not label.exists():
                continue  # an image without labels is a background image
            for n, line in enumerate(label.read_text().splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    cls, *coords = (float(x) for x in parts)
                except ValueError:
                    raise DataError(f"{label}:{n}: non-numeric label line {line!r}") from None
                if len(coords) != 4:
                    raise DataError(f"{label}:{n}: expected 'class xc yc w h', got {len(parts)} values")
                if cls != int(cls) or not 0 <= cls < nc:
                    raise DataError(f"{label}:{n}: class {parts[0]} outside 0..{nc - 1}")
                if not all(0.0 <= c <= 1.0 for c in coords):
                    raise DataError(f"{label}:{n}: coordinates {coords} not normalised to [0, 1]")
                checked += 1
    return checked


def load_data(path: str | Path | None) -> tuple[str, dict[str, Any]]:
    """(yaml path, Ultralytics data dict) for `path` (default: the embedded tree dataset), checked."""
    from ultralytics.data.utils import check_det_dataset

    yaml_path = Path(path) if path else EMBEDDED_YAML
    if not yaml_path.is_file():
        hint = "" if path else " (the embedded dataset lives in the source checkout; pass --data)"
        raise DataError(f"{yaml_path}: data YAML not found{hint}")
    try:
        data = check_det_dataset(str(yaml_path), autodownload=False)
    except (FileNotFoundError, SyntaxError, KeyError, ValueError) as err:
        raise DataError(f"{yaml_path}: {str(err).splitlines()[0]}") from err
    check_labels(data)
    return str(yaml_path), data
