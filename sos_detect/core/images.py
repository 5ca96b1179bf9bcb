"""Image files a run trains on: each must decode completely, or the run is refused naming the first bad one."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A dataset problem; the message names the file."""


def _image_problem(f: Path) -> str | None:
    """Why an image cannot be trained on, or None: it must decode completely (JPEGs at 1/8 scale, which still reads
    every byte), be at least 10 px on each side, and a JPEG must end with its end-of-image marker (Ultralytics
    would rewrite such a file in place, "restored")."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            w, h = im.size
            if min(w, h) < 10:  # Ultralytics' verify_image_label drops these
                return f"image size {w}x{h} is below Ultralytics' 10-pixel minimum"
            if im.format == "JPEG":
                with open(f, "rb") as raw:
                    raw.seek(-2, 2)
                    if raw.read() != b"\xff\xd9":
                        return "JPEG does not end with its end-of-image marker (cut short, or bytes after it)"
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            im.load()
    except FileNotFoundError:
        return "listed but not on disk"
    except (UnidentifiedImageError, ImportError) as err:  # ImportError: Ultralytics' HEIF opener tried pi_heif
        heif = isinstance(err, ImportError) and f.suffix.lower() in (".heic", ".heif")
        return f"HEIF image, needs {err.name}" if heif else "not a readable image (no known image format)"
    except Exception as err:  # noqa: BLE001 - PIL raises several types for damaged files
        return f"not a readable image ({type(err).__name__}: {' '.join(str(err).split())})"
    return None


def check_images(images: list[Path], split: str) -> None:
    """Every image must decode completely (`_image_problem`); Ultralytics would skip a bad one as 'corrupt' with a
    cryptic reason and train on fewer images, or fail with a traceback when none is left."""
    bad = [(f, why) for f in images if (why := _image_problem(f)) is not None]
    if bad:
        raise DataError(f"{bad[0][0]}: {bad[0][1]} ({len(bad)} of {len(images)} '{split}' images unreadable)")
