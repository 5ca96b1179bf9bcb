"""fashion-det: a detection benchmark composed from real images that install offline, rebuilt bit for bit.

Each image is a crop of a real photograph (the repository's NEON aerial tiles, scikit-learn's two sample
photographs) with 2–8 Fashion-MNIST items (Debian's `dataset-fashion-mnist`, 10 classes) pasted at varied
scales and colours, overlapping each other, over clutter (patches of other photographs, lines, ellipses).
An item's box is the tight pixel box of its pasted mask, so boxes are exact. Train images use Fashion-MNIST's
training items and the training tiles + china.jpg; val images use its test items and the val tiles +
flower.jpg. Every image is drawn from its own generator seeded by (seed, split, index).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from sos_detect.detect.embedded import REPO_ROOT

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLITS = ("train", "val")
PHOTOS = {"train": "china.jpg", "val": "flower.jpg"}  # scikit-learn's sample images (CC BY 2.0)
TILES = REPO_ROOT / "data" / "deepforest" / "images"  # NEON aerial tiles (MIT), already split train/val
YAML_NAME = "fashion-det.yaml"
ALPHA_FULL = 64  # item intensity at which the item is opaque; below it the background shows through
BOX_ALPHA = 0.25  # a pixel belongs to an item's box when its opacity reaches this
MAX_COVER = 0.5  # an item may be covered by later items on at most this fraction of its box


@dataclass(frozen=True)
class SynthSpec:
    train: int = 3000
    val: int = 1000
    min_size: int = 192  # image sides are drawn from [min_size, max_size]
    max_size: int = 256
    seed: int = 0
    objects: tuple[int, int] = (2, 8)  # items per image
    clutter: tuple[int, int] = (1, 5)  # distractors per image

    @property
    def item_size(self) -> tuple[int, int]:
        """Range of an item's longer side in pixels (log-uniform): 14–96 px at min_size 192, proportional."""
        return max(6, self.min_size * 14 // 192), self.min_size // 2

    def check(self) -> None:
        for key in ("train", "val"):
            if getattr(self, key) < 1:  # an empty split is no dataset: Ultralytics cannot train or validate on it
                raise ValueError(f"--{key} {getattr(self, key)}: must be an integer >= 1")
        if not 32 <= self.min_size <= self.max_size:
            raise ValueError(f"--imgsz must be MIN,MAX with 32 <= MIN <= MAX, got {self.min_size},{self.max_size}")


def spec_from_args(train: int, val: int, imgsz: str, seed: int) -> SynthSpec:
    """A SynthSpec from command-line values; `imgsz` is 'MIN,MAX' or one size."""
    try:
        sizes = [int(v) for v in str(imgsz).split(",")]
    except ValueError:
        raise ValueError(f"--imgsz must be MIN,MAX or one size in pixels, got {imgsz!r}") from None
    if len(sizes) not in (1, 2):
        raise ValueError(f"--imgsz must be MIN,MAX or one size in pixels, got {imgsz!r}")
    spec = SynthSpec(train=train, val=val, min_size=sizes[0], max_size=sizes[-1], seed=seed)
    spec.check()
    return spec


def load_backgrounds(split: str) -> list[np.ndarray]:
    """The split's background photographs (BGR): its aerial tiles and one scikit-learn sample photo."""
    try:
        import sklearn.datasets
    except ImportError:
        raise FileNotFoundError("fashion-det needs scikit-learn's sample images: pip install -e .[dev]") from None
    files = sorted((TILES / split).glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"{TILES / split}: no aerial tiles (the source checkout's data/deepforest)")
    files.append(Path(sklearn.datasets.__file__).parent / "images" / PHOTOS[split])
    images = [cv2.imread(str(f), cv2.IMREAD_COLOR) for f in files]
    missing = [str(f) for f, im in zip(files, images, strict=True) if im is None]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: missing or unreadable background image")
    return images


def background(photos: list[np.ndarray], w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of a random photograph (the sample photo in 30 % of images), resized, flipped, re-lit."""
    photo = photos[-1] if rng.random() < 0.3 else photos[int(rng.integers(len(photos) - 1))]
    photo = np.rot90(photo, int(rng.integers(4)))
    ph, pw = photo.shape[:2]
    scale = rng.uniform(0.35, 1.0) * min(pw / w, ph / h)
    cw, ch = max(8, int(w * scale)), max(8, int(h * scale))
    x, y = int(rng.integers(pw - cw + 1)), int(rng.integers(ph - ch + 1))
    crop = cv2.resize(np.ascontiguousarray(photo[y : y + ch, x : x + cw]), (w, h), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    gain = rng.uniform(0.75, 1.25) * rng.uniform(0.9, 1.1, size=3)
    return np.clip(crop * gain, 0, 255)


def add_clutter(canvas: np.ndarray, photos: list[np.ndarray], count: int, rng: np.random.Generator) -> None:
    """Distractors that are not items: photo patches (rectangles or ellipses), lines and rings, drawn in place."""
    h, w = canvas.shape[:2]
    for _ in range(count):
        kind = rng.integers(3)
        if kind == 0:
            photo = photos[int(rng.integers(len(photos)))]
            pw, ph = (int(v) for v in rng.integers(10, min(w, h) // 3, size=2))
            sx, sy = int(rng.integers(photo.shape[1] - pw)), int(rng.integers(photo.shape[0] - ph))
            x, y = int(rng.integers(w - pw)), int(rng.integers(h - ph))
            mask = np.ones((ph, pw), np.float64)
            if rng.random() < 0.5:
                mask = cv2.ellipse(np.zeros((ph, pw)), (pw // 2, ph // 2), (pw // 2, ph // 2), 0, 0, 360, 1.0, -1)
            region = canvas[y : y + ph, x : x + pw]
            region[:] = region * (1 - mask[..., None]) + photo[sy : sy + ph, sx : sx + pw] * mask[..., None]
        else:
            colour = tuple(float(c) for c in rng.integers(0, 256, size=3))
            thickness = int(rng.integers(1, 4))
            if kind == 1:
                p0, p1 = rng.integers(0, [w, h], size=(2, 2))
                cv2.line(canvas, tuple(int(v) for v in p0), tuple(int(v) for v in p1), colour, thickness, cv2.LINE_AA)
            else:
                centre = tuple(int(v) for v in rng.integers(0, [w, h]))
                axes = tuple(int(v) for v in rng.integers(4, min(w, h) // 4, size=2))
                cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, thickness, cv2.LINE_AA)


def item_patch(item: np.ndarray, long_side: int, aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """An item cut to its non-zero pixels and resized: (opacity in [0, 1], shade in [0.35, 1]) of equal shape."""
    ys, xs = np.nonzero(item)
    item = item[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float64)
    ih, iw = item.shape
    ratio = iw / ih * aspect
    if ratio >= 1:
        pw, ph = long_side, max(2, round(long_side / ratio))
    else:
        pw, ph = max(2, round(long_side * ratio)), long_side
    value = cv2.resize(item, (pw, ph), interpolation=cv2.INTER_LINEAR)
    return np.clip(value / ALPHA_FULL, 0, 1), 0.35 + 0.65 * np.clip(value / 255, 0, 1)


def paste(canvas: np.ndarray, alpha: np.ndarray, shade: np.ndarray, x: int, y: int, colour: np.ndarray) -> tuple:
    """Blend a patch into the canvas at (x, y); return its exact box (x0, y0, x1, y1): the pixels with
    opacity ≥ BOX_ALPHA, in pixel-edge coordinates (x1, y1 exclusive)."""
    ph, pw = alpha.shape
    region = canvas[y : y + ph, x : x + pw]
    region[:] = region * (1 - alpha[..., None]) + (shade[..., None] * colour) * alpha[..., None]
    ys, xs = np.nonzero(alpha >= BOX_ALPHA)
    return x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1


def _contrasting_colour(canvas: np.ndarray, box: tuple, rng: np.random.Generator) -> np.ndarray:
    """A random colour whose luminance differs from the region's mean by at least 60 (of 255), when one is drawn."""
    x0, y0, x1, y1 = box
    weights = np.array([0.114, 0.587, 0.299])  # BGR luminance
    ground = float(canvas[y0:y1, x0:x1].mean(axis=(0, 1)) @ weights)
    for _ in range(16):
        colour = rng.uniform(0, 255, size=3)
        if abs(colour @ weights - ground) >= 60:
            break
    return colour


def _covered(a: tuple, b: tuple) -> float:
    """Fraction of box a's area that box b covers."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0) / ((a[2] - a[0]) * (a[3] - a[1]))


def compose(
    photos: list[np.ndarray], items: np.ndarray, labels: np.ndarray, spec: SynthSpec, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[int, tuple]]]:
    """One image (uint8 BGR) and its objects [(class, (x0, y0, x1, y1))]."""
    w, h = (int(v) for v in rng.integers(spec.min_size, spec.max_size + 1, size=2))
    canvas = background(photos, w, h, rng)
    add_clutter(canvas, photos, int(rng.integers(spec.clutter[0], spec.clutter[1] + 1)), rng)
    objects: list[tuple[int, tuple]] = []
    lo, hi = np.log(spec.item_size[0]), np.log(spec.item_size[1])
    for _ in range(int(rng.integers(spec.objects[0], spec.objects[1] + 1))):
        index = int(rng.integers(len(items)))
        alpha, shade = item_patch(items[index], round(float(np.exp(rng.uniform(lo, hi)))), rng.uniform(0.8, 1.25))
        ph, pw = alpha.shape
        for _ in range(20):  # placements until no earlier item is covered beyond MAX_COVER
            x, y = int(rng.integers(w - pw + 1)), int(rng.integers(h - ph + 1))
            if all(_covered(box, (x, y, x + pw, y + ph)) <= MAX_COVER for _, box in objects):
                box = paste(canvas, alpha, shade, x, y, _contrasting_colour(canvas, (x, y, x + pw, y + ph), rng))
                objects.append((int(labels[index]), box))
                break
    noise = rng.normal(0, rng.uniform(0, 6), size=canvas.shape)
    return np.clip(np.rint(canvas + noise), 0, 255).astype(np.uint8), objects


def yolo_lines(objects: list[tuple[int, tuple]], w: int, h: int) -> str:
    """`class xc yc w h` lines, normalised to the image size, 6 decimals."""
    return "".join(
        f"{c} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}\n"
        for c, (x0, y0, x1, y1) in objects
    )


def dataset_digest(out: str | Path) -> str:
    """SHA-256 over the names and bytes of the built files (images, labels, YAML): equal digests, equal datasets."""
    out, digest = Path(out), hashlib.sha256()
    files = sorted(p for sub in ("images", "labels") for p in (out / sub).rglob("*") if p.suffix in (".jpg", ".txt"))
    for p in [*files, out / YAML_NAME]:
        digest.update(p.relative_to(out).as_posix().encode() + b"\0" + p.read_bytes())
    return digest.hexdigest()


def _yaml_text(spec: SynthSpec) -> str:
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(CLASSES))
    settings = ", ".join(f"{k}={v}" for k, v in asdict(spec).items())
    return (
        "# fashion-det: Fashion-MNIST items on real photographs (sos_detect/detect/synthetic.py); not a real-world\n"
        f"# detection dataset. Built by `sos-detect data fashion-det` with {settings}.\n"
        "# Paths are relative to this file's folder (no `path:` or `download:` key).\n"
        f"train: images/train\nval: images/val\nnames:\n{names}"
    )


def build_fashion_det(
    out: str | Path, spec: SynthSpec = SynthSpec(), root: str | Path | None = None, progress: bool = True
) -> dict[str, int]:
    """Write images/{train,val}/*.jpg, labels/{train,val}/*.txt and fashion-det.yaml under `out`; return counts.

    `root` holds Fashion-MNIST's IDX files (default: Debian's /usr/share/datasets/fashion-mnist). A rebuild
    replaces the previous images and labels whole.
    """
    from sos_detect.core.fashion_mnist import FASHION_ROOT, read_fashion_mnist

    spec.check()
    source = dict(zip(SPLITS, read_fashion_mnist(Path(root or FASHION_ROOT)), strict=True))  # train ← train, val ← t10k
    out = Path(out)
    for sub in ("images", "labels"):
        shutil.rmtree(out / sub, ignore_errors=True)
    counts = {}
    for split_id, split in enumerate(SPLITS):
        photos = load_backgrounds(split)
        items, labels = source[split]
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        n = getattr(spec, split)
        boxes = 0
        for i in _progress(range(n), f"fashion-det {split}", progress):
            image, objects = compose(photos, items, labels, spec, np.random.default_rng([spec.seed, split_id, i]))
            stem = f"{split}_{i:05d}"
            _, jpg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
            (out / "images" / split / f"{stem}.jpg").write_bytes(jpg.tobytes())
            (out / "labels" / split / f"{stem}.txt").write_text(yolo_lines(objects, image.shape[1], image.shape[0]))
            boxes += len(objects)
        counts.update({f"{split}_images": n, f"{split}_boxes": boxes})
    (out / YAML_NAME).write_text(_yaml_text(spec))
    return counts


def _progress(it, desc: str, enabled: bool):
    from ultralytics.utils import TQDM

    return TQDM(it, desc=desc, disable=not enabled)
