"""Classification data: CIFAR-10/100 and ImageFolder from local roots, Fashion-MNIST from IDX files, digits.

Nothing is downloaded: a missing root is an error naming it.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

DATASETS = ("cifar10", "cifar100", "imagefolder", "fashion-mnist", "digits")
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass
class ClassificationData:
    train: Dataset  # augmented
    plain_train: Dataset  # the same samples without augmentation (SOS capture, train accuracy)
    test: Dataset
    num_classes: int
    in_ch: int


class TensorImages(Dataset):
    """Images held as a uint8 tensor (N, C, H, W) with an optional tensor transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        return (self.transform(x) if self.transform else x.float() / 255), int(self.labels[i])


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


def _fashion(root: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (root / name).is_file():
                return root / name
        raise FileNotFoundError(f"{root}: no {stem}[.gz] (install Debian's dataset-fashion-mnist or pass --root)")

    return tuple(  # type: ignore[return-value]
        (read_idx(find(f"{p}-images-idx3-ubyte")), read_idx(find(f"{p}-labels-idx1-ubyte"))) for p in ("train", "t10k")
    )


def _augment(size: int, padding: int, mean, std, flip: bool = True):
    from torchvision.transforms import v2

    ops = [v2.RandomCrop(size, padding=padding)] + ([v2.RandomHorizontalFlip()] if flip else [])
    return v2.Compose([*ops, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def _plain(mean, std):
    from torchvision.transforms import v2

    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def _subset(ds: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, idx.tolist())


def load_classification_data(
    name: str,
    root: str | Path | None = None,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
) -> ClassificationData:
    """Train (augmented), plain train and test sets for `name` (see DATASETS)."""
    if name not in DATASETS:
        raise ValueError(f"--data must be one of {DATASETS}, got {name!r}")
    if name == "digits":
        from sos_detect.classify.digits import load_digits_split

        x, y, xt, yt = load_digits_split(seed=0)
        train = torch.utils.data.TensorDataset(x.view(-1, 1, 8, 8), y)  # images: conv models take them too
        test = torch.utils.data.TensorDataset(xt.view(-1, 1, 8, 8), yt)
        return ClassificationData(
            _subset(train, train_subset, seed),
            _subset(train, train_subset, seed),
            _subset(test, test_subset, seed),
            10,
            1,
        )
    if name == "fashion-mnist":
        root = Path(root or FASHION_ROOT)
        (xtr, ytr), (xte, yte) = _fashion(root)
        mean, std = (0.2860,), (0.3530,)
        as_t = lambda a: torch.from_numpy(a.copy())[:, None]  # noqa: E731
        make = lambda x, y, tf: TensorImages(as_t(x), torch.from_numpy(y.astype(np.int64)), tf)  # noqa: E731
        train, plain = make(xtr, ytr, _augment(28, 2, mean, std)), make(xtr, ytr, _plain(mean, std))
        test = make(xte, yte, _plain(mean, std))
        return ClassificationData(
            _subset(train, train_subset, seed),
            _subset(plain, train_subset, seed),
            _subset(test, test_subset, seed),
            10,
            1,
        )
    if root is None:
        raise FileNotFoundError(f"--data {name} needs --root, the dataset folder (nothing is downloaded)")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"--root {root}: dataset folder not found")
    root = Path(root)
    import torchvision

    if name in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        from torchvision.transforms import v2

        to_img = v2.Compose([v2.ToImage()])
        try:
            train = cls(
                root, train=True, download=False, transform=v2.Compose([to_img, _augment(32, 4, CIFAR_MEAN, CIFAR_STD)])
            )
            plain = cls(root, train=True, download=False, transform=v2.Compose([to_img, _plain(CIFAR_MEAN, CIFAR_STD)]))
            test = cls(root, train=False, download=False, transform=v2.Compose([to_img, _plain(CIFAR_MEAN, CIFAR_STD)]))
        except RuntimeError as err:
            raise FileNotFoundError(f"{root}: {name} not found in the standard python layout ({err})") from err
        nc = 10 if name == "cifar10" else 100
        return ClassificationData(
            _subset(train, train_subset, seed),
            _subset(plain, train_subset, seed),
            _subset(test, test_subset, seed),
            nc,
            3,
        )
    from torchvision.transforms import v2

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    norm = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / split}: ImageFolder split not found (need train/ and val/)")
    train = torchvision.datasets.ImageFolder(
        root / "train", v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip(), *norm])
    )
    plain = torchvision.datasets.ImageFolder(root / "train", v2.Compose([v2.Resize(256), v2.CenterCrop(224), *norm]))
    test = torchvision.datasets.ImageFolder(root / "val", v2.Compose([v2.Resize(256), v2.CenterCrop(224), *norm]))
    return ClassificationData(
        _subset(train, train_subset, seed),
        _subset(plain, train_subset, seed),
        _subset(test, test_subset, seed),
        len(train.classes),
        3,
    )
