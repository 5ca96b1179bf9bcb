"""Fashion-MNIST small enough to carry to a device call: the items a default fashion-det build reads, the rest zeroed.

The device tool carries at most 64 MiB per call; Ultralytics' polars wheel (33 MB) and the repository leave too
little room for Debian's 30 MB of IDX files. A default build (3,000 train / 1,000 val) reads about a quarter of
the items, so this builds fashion-det here with arrays that record which items are read, writes IDX files where
every other item is zero (gzip shrinks those to nothing), and checks that a build from them has the same sha256.
Run: python benchmarks/device/sparse_fashion_mnist.py .gpu/fmnist
"""

from __future__ import annotations

import gzip
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sos_detect.core import fashion_mnist as data
from sos_detect.core.fashion_mnist import FASHION_ROOT, read_fashion_mnist
from sos_detect.detect import synthetic

STEMS = {"train": "train", "val": "t10k"}


class Recording(np.ndarray):
    """An array that remembers the integer indices it was read at. Only integer reads of the array itself count
    (a view starts its own record); a build that read items otherwise would fail the digest check."""

    used: set[int]

    def __array_finalize__(self, obj: np.ndarray | None) -> None:
        self.used = set()

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int | np.integer):
            self.used.add(int(key))
        return super().__getitem__(key)


def write_idx(path: Path, array: np.ndarray) -> None:
    """uint8 IDX, gzip-compressed: magic 0x08nn (nn = number of dims), big-endian int32 dims, then the bytes."""
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as f:  # no timestamp: the same bytes every time
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def main(out: Path) -> None:
    """Build fashion-det with recording arrays, write the sparse IDX files to `out`, rebuild from them, compare."""
    full = read_fashion_mnist(Path(FASHION_ROOT))
    recording = []
    for images, _ in full:
        view = images.view(Recording)
        view.used = set()
        recording.append(view)
    original = data.read_fashion_mnist  # build_fashion_det imports it from there when it runs
    recording_source = tuple((rec, labels) for rec, (_, labels) in zip(recording, full, strict=True))
    with tempfile.TemporaryDirectory() as tmp:
        data.read_fashion_mnist = lambda root: recording_source
        try:
            synthetic.build_fashion_det(Path(tmp) / "full", progress=False)
        finally:
            data.read_fashion_mnist = original
        reference = synthetic.dataset_digest(Path(tmp) / "full")
        out.mkdir(parents=True, exist_ok=True)
        for (split, stem), rec, (images, labels) in zip(STEMS.items(), recording, full, strict=True):
            sparse = np.zeros_like(images)
            idx = sorted(rec.used)
            sparse[idx] = images[idx]
            write_idx(out / f"{stem}-images-idx3-ubyte.gz", sparse)
            write_idx(out / f"{stem}-labels-idx1-ubyte.gz", labels)
            print(f"{split}: {len(idx)} of {len(images)} items kept")
        synthetic.build_fashion_det(Path(tmp) / "sparse", root=out, progress=False)
        digest = synthetic.dataset_digest(Path(tmp) / "sparse")
    if digest != reference:
        raise SystemExit(f"{out}: a build from these files differs ({digest} != {reference})")
    print(f"fashion-det sha256 {digest} from {out} (same as from {FASHION_ROOT})")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu/fmnist"))
