"""Fashion-MNIST as Debian's dataset-fashion-mnist ships it: IDX files (the MNIST container of uint8 arrays), read
into arrays for the classification companion and for composing the fashion-det detection benchmark."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally .gz): the MNIST container of uint8 arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: IDX file not found")
    if path.suffix == ".gz":
        with gzip.open(path) as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08 or len(raw) < 4 + 4 * (magic & 0xFF):
        raise ValueError(f"{path}: not a uint8 IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: IDX header says {shape} but holds {data.size} values")
    return data.reshape(shape)


def read_fashion_mnist(root: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images N×28×28, labels), (test images, labels)) from Fashion-MNIST's IDX files in `root`."""

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (root / name).is_file():
                return root / name
        raise FileNotFoundError(f"{root}: no {stem}[.gz] (install Debian's dataset-fashion-mnist or pass --root)")

    return tuple(  # type: ignore[return-value]
        (read_idx(find(f"{p}-images-idx3-ubyte")), read_idx(find(f"{p}-labels-idx1-ubyte"))) for p in ("train", "t10k")
    )
