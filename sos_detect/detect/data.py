"""Dataset YAML resolution (paths, `voc.yaml`, Ultralytics' dataset names) and a strict pre-flight check of
every image and YOLO label file. Errors are one line naming the file, or the option as typed."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sos_detect.core.images import DataError, check_images
from sos_detect.detect.embedded import EMBEDDED_YAML, REPO_ROOT

VOC_NAMES = ("voc", "voc.yaml", "voc.yml")  # as typed, any case: the converted PASCAL VOC
VOC_CONVERTED = Path("datasets") / "voc"  # `sos-detect data voc`'s default --out, relative to the working folder
VOC_CONFIG = REPO_ROOT / "configs" / "voc.yaml"  # the same layout seen from the source checkout


MAX_YAML_BYTES = 1 << 20  # a data YAML names folders and classes: 1 MiB holds 10,000s of class names
MAX_YAML_NODES = 100_000  # values after alias expansion (exponential anchors expand to billions)
MAX_YAML_DEPTH = 64  # nesting (a self-referencing alias nests without end)


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
        elif p.is_file():
            raise DataError(f"{p}: is a file, not an image folder or a .txt list of images")
        else:
            raise DataError(f"{p}: image folder or list not found")
    return files


Layout = tuple[str, Callable[[int], bool], Callable[[list[float]], list[float]], bool]


def label_layout(task: str, data: dict[str, Any]) -> Layout:
    """(a YOLO label line of `task` in words, a check of its value count, its coordinates — which must lie in
    [0, 1] — from its values, whether it starts with a box `xc yc w h`), Ultralytics' formats; pose keypoints'
    visibility flags are not coordinates."""

    def after_class(values: list[float]) -> list[float]:
        return values[1:]

    if task == "segment":
        return "class x1 y1 x2 y2 x3 y3 … (a polygon)", lambda n: n >= 7 and n % 2 == 1, after_class, False
    if task == "obb":
        return "class x1 y1 x2 y2 x3 y3 x4 y4", lambda n: n == 9, after_class, False
    if task == "pose":
        nkpt, ndim = (list(data.get("kpt_shape") or []) + [0, 0])[:2]

        def box_and_points(values: list[float]) -> list[float]:
            return values[1:5] + [x for k in range(nkpt) for x in values[5 + k * ndim : 7 + k * ndim]]

        return (
            f"class xc yc w h and {nkpt}×{ndim} keypoint values",
            lambda n: n == 5 + nkpt * ndim,
            box_and_points,
            True,
        )
    return "class xc yc w h", lambda n: n == 5, after_class, True


def _check_label_file(label: Path, nc: int, layout: Layout) -> int:
    """The lines of one YOLO label file in `layout` (`label_layout`): finite numbers, as many as the layout takes, a
    known integer class, coordinates inside [0, 1] and boxes (`xc yc w h`) of positive size. Returns the number of
    labels."""
    words, count_ok, coordinates, box = layout
    checked = 0
    for n, line in enumerate(label.read_text(errors="replace").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(x) for x in parts]
        except ValueError:
            raise DataError(f"{label}:{n}: non-numeric label line {line!r}") from None
        if not count_ok(len(values)):
            raise DataError(f"{label}:{n}: expected '{words}', got {len(parts)} values")
        if not all(map(math.isfinite, values)):
            raise DataError(f"{label}:{n}: non-finite value (NaN or inf) in {line.strip()!r}")
        cls, coords = values[0], coordinates(values)
        if cls != int(cls) or not 0 <= cls < nc:
            raise DataError(f"{label}:{n}: class {parts[0]} outside 0..{nc - 1}")
        if not all(0.0 <= c <= 1.0 for c in coords):
            raise DataError(f"{label}:{n}: coordinates {coords} not normalised to [0, 1]")
        if box and (coords[2] <= 0 or coords[3] <= 0):
            raise DataError(f"{label}:{n}: zero-size box (width {parts[3]}, height {parts[4]})")
        checked += 1
    return checked


def _orphan_labels(images: list[Path], labels: list[Path]) -> list[Path]:
    """Files *.txt in the label folders of the images (labels/… beside images/…; a folder holding images too may
    hold other text files, such as classes.txt) that belong to no image."""
    expected = set(labels)
    dirs = {p.parent for p in labels} - {p.parent for p in images}
    return sorted(f for d in dirs if d.is_dir() for f in d.glob("*.txt") if f not in expected)


def check_labels(data: dict[str, Any], splits: tuple[str, ...] = ("train", "val"), task: str = "detect") -> int:
    """Every image readable and every label line in the task's layout (`label_layout`; detect: `cls xc yc w h`)
    with a known class and coordinates in [0, 1]; returns the number of labels. Ultralytics would silently drop such
    files as 'corrupt'; here they are an error naming file and line."""
    from ultralytics.data.utils import img2label_paths

    nc, checked, layout = int(data["nc"]), 0, label_layout(task, data)
    for split in splits:
        if not data.get(split):
            continue
        images = image_files(data[split])
        if not images:
            raise DataError(f"{data[split]}: no images for split '{split}'")
        check_images(images, split)
        labels = list(map(Path, img2label_paths([str(f) for f in images])))
        for label in labels:
            if label.exists():  # an image without labels is a background image
                checked += _check_label_file(label, nc, layout)
        entries = data[split] if isinstance(data[split], list) else [data[split]]
        if all(Path(e).is_dir() for e in entries):  # a .txt list may name a subset: other labels are no orphans
            orphans = _orphan_labels(images, labels)
            if orphans:
                raise DataError(
                    f"{orphans[0]}: label file without an image ({len(orphans)} in '{split}'); "
                    "Ultralytics would ignore it: add its image or remove it"
                )
    return checked


def _check_yaml_shape(node: Any, yaml_path: str | Path) -> None:
    """Bound a composed YAML document before it is built: at most MAX_YAML_NODES values with aliases expanded
    and MAX_YAML_DEPTH levels of nesting (a self-referencing alias never ends)."""
    import yaml

    stack, count = [(node, 1)], 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise DataError(f"{yaml_path}: over {MAX_YAML_NODES:,} values once its aliases are expanded")
        if depth > MAX_YAML_DEPTH:
            raise DataError(f"{yaml_path}: nested deeper than {MAX_YAML_DEPTH} levels (a self-referencing alias?)")
        if isinstance(item, yaml.SequenceNode):
            stack += [(child, depth + 1) for child in item.value]
        elif isinstance(item, yaml.MappingNode):
            stack += [(child, depth + 1) for pair in item.value for child in pair]


def _check_names(raw: dict[str, Any], yaml_path: Path) -> None:
    """`names:` a list, or a mapping from class index, of plain names (strings or numbers)."""
    names = raw.get("names")
    if names is None:
        return
    if isinstance(names, dict):
        bad_key = next((k for k in names if not isinstance(k, int) or isinstance(k, bool) or k < 0), None)
        if bad_key is not None:
            raise DataError(f"{yaml_path}: names: key {bad_key!r} is not a class index (0, 1, …)")
        items = list(names.items())
    elif isinstance(names, list):
        items = list(enumerate(names))
    else:
        raise DataError(f"{yaml_path}: names: must be a list or a mapping of class names, not {type(names).__name__}")
    for index, value in items:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise DataError(f"{yaml_path}: names: class {index} is a {type(value).__name__}, not a plain name")


def read_bounded_yaml(yaml_path: Path, name: str | Path | None = None) -> Any:
    """An untrusted YAML file's content, bounded (size, alias expansion, nesting) before it is built; errors name
    it as `name` (default: the path)."""
    import yaml

    name = name or yaml_path
    size = yaml_path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise DataError(f"{name}: {size:,} bytes; a YAML file here is at most {MAX_YAML_BYTES:,}")
    try:
        text = yaml_path.read_text()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_yaml_shape(node, name)
        return yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DataError(f"{name}: not a readable YAML file ({' '.join(str(err).split())})") from None


def _read_yaml(yaml_path: Path) -> dict[str, Any]:
    """An untrusted data YAML, bounded (`read_bounded_yaml`, plain class names) before it is built."""
    raw = read_bounded_yaml(yaml_path)
    if not isinstance(raw, dict):
        raise DataError(f"{yaml_path}: not a data YAML (no train:/val: keys)")
    _check_names(raw, yaml_path)
    return raw


def _missing_images(yaml_path: Path, raw: dict[str, Any]) -> tuple[str, Path] | None:
    """('images not found: …', the path) for the first train/val path that does not exist (resolved as
    Ultralytics' `check_det_dataset` resolves it), else None."""
    from ultralytics.utils import DATASETS_DIR

    root = Path(raw.get("path") or yaml_path.parent)
    if not root.exists() and not root.is_absolute():
        root = DATASETS_DIR / root
    for split in ("train", "val"):
        entries = raw.get(split)
        for entry in entries if isinstance(entries, list) else [entries] if entries else []:
            first = (root / str(entry)).resolve()
            alt = (root / str(entry)[3:]).resolve() if str(entry).startswith("../") else first
            if not first.exists() and not alt.exists():
                return f"images not found: {split}: {entry} is {first}, which does not exist", first
    return None


def _voc_hint(out: Path) -> str:
    """The conversion command that writes the VOC dataset at `out` (relative to the working folder if inside)."""
    out = out.absolute()
    shown = out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out
    return f"run `sos-detect data voc --root /path/to/VOCdevkit --out {shown}` first"


def _voc_yaml(typed: str) -> Path:
    """The converted VOC: `datasets/voc/voc.yaml` in the working folder, else the checkout's configs/voc.yaml."""
    for candidate in (VOC_CONVERTED / "voc.yaml", VOC_CONFIG):
        if candidate.is_file() and _missing_images(candidate, _read_yaml(candidate)) is None:
            return candidate
    looked = VOC_CONVERTED / "images" / "train"
    raise DataError(f"{typed}: no converted PASCAL VOC here ({looked} not found); {_voc_hint(VOC_CONVERTED)}")


def resolve_data(path: str | Path | None, typed: str | None = None) -> Path:
    """The data YAML for `path`: a file as given, the converted VOC for `voc.yaml`, Ultralytics' own dataset
    YAMLs by name (`coco8.yaml`), and the embedded tree dataset for None. `typed` names the option in errors."""
    from ultralytics.utils.checks import check_file

    typed = typed or f"{path}"
    if path is None:
        if not EMBEDDED_YAML.is_file():
            raise DataError(f"{EMBEDDED_YAML}: data YAML not found (the embedded dataset lives in the source checkout)")
        return EMBEDDED_YAML
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        raise DataError(f"{typed}: is a folder; pass its data YAML")
    if len(p.parts) == 1 and p.name.lower() in VOC_NAMES:
        return _voc_yaml(typed)
    if len(p.parts) == 1 and p.suffix in (".yaml", ".yml", ""):
        name = p.name if p.suffix else f"{p.name}.yaml"
        found = check_file(name, hard=False)
        if found and Path(found).is_file():
            return Path(found)
    raise DataError(f"{typed}: data YAML not found")


def load_data(path: str | Path | None, typed: str | None = None, task: str = "detect") -> tuple[str, dict[str, Any]]:
    """(absolute yaml path, Ultralytics data dict) for `path` (see `resolve_data`), every image and label checked
    in the layout of `task`'s labels.

    Images that are missing are one line naming the path Ultralytics would look at; Ultralytics' own datasets are
    downloaded only where the user allowed downloads (YOLO_OFFLINE unset or false)."""
    from ultralytics.data.utils import check_det_dataset

    from sos_detect.core.runtime import downloads_allowed

    typed = typed or f"{path if path is not None else EMBEDDED_YAML}"
    yaml_path = resolve_data(path, typed).resolve()
    raw = _read_yaml(yaml_path)
    missing = _missing_images(yaml_path, raw)
    if missing and not (raw.get("download") and downloads_allowed()):
        shown = typed if path is None or Path(path).resolve() == yaml_path else f"{typed} ({yaml_path})"
        message, where = missing
        if yaml_path.name.lower() == "voc.yaml":  # images/<split> of the converted VOC
            message += f"; {_voc_hint(where.parent.parent)}"
        elif raw.get("download"):
            message += "; Ultralytics would download it, but downloads are off (YOLO_OFFLINE=1, see the README)"
        raise DataError(f"{shown}: {message}")
    try:
        data = check_det_dataset(str(yaml_path), autodownload=downloads_allowed())
    except (FileNotFoundError, SyntaxError, KeyError, ValueError, TypeError) as err:
        raise DataError(f"{typed}: {str(err).splitlines()[0]}") from err
    if task == "pose" and not data.get("kpt_shape"):
        raise DataError(f"{typed}: a pose dataset needs kpt_shape: [keypoints, 2 or 3] in its YAML")
    check_labels(data, task=task)
    return str(yaml_path), data
