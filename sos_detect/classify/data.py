"""Classification data: CIFAR-10/100 (python pickle layout) and ImageFolder from local roots, Fashion-MNIST from IDX
files, digits; every dataset at a chosen image size.

Nothing is downloaded: a missing root or file is an error naming it.

Image size policy (`imgsz`, the side of the square input):
- default: 224 for the ImageNet models; otherwise the images' own size (digits 8, Fashion-MNIST 28, CIFAR 32, an
  ImageFolder's first training image, its shorter side), at most 64 — a CIFAR-stem network keeps full resolution
  through its first stage, so its activations grow with the square of the side.
- small images (imgsz ≤ 64), the CIFAR recipe: resize to imgsz (shorter side) and centre-crop; training adds a
  random crop with zero padding of 1/8 of the side (4 px at 32; Fashion-MNIST 2 px at 28) and a horizontal flip.
  Digits are not augmented.
- large images (imgsz > 64, ImageFolder), the ImageNet recipe: training RandomResizedCrop(imgsz) + flip; evaluation
  Resize(round(imgsz / 0.875)) + CenterCrop(imgsz) (256 → 224).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from sos_detect.core.fashion_mnist import FASHION_ROOT, read_fashion_mnist
from sos_detect.core.images import check_images

DATASETS = ("cifar10", "cifar100", "imagefolder", "fashion-mnist", "digits")
NATIVE_SIZE = {"digits": 8, "fashion-mnist": 28, "cifar10": 32, "cifar100": 32}
PADDING = {"fashion-mnist": 2 / 28}  # random-crop padding as a fraction of the side; 1/8 otherwise (CIFAR's 4 px)
SMALL_MAX = 64  # largest side treated as a small image (CIFAR recipe); the default cap for non-ImageNet models
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_FILES = {  # folder, training files, test file, label key
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels"),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels"),
}


@dataclass
class ClassificationData:
    train: Dataset  # augmented
    plain_train: Dataset  # the same samples without augmentation (SOS capture, train accuracy)
    test: Dataset
    num_classes: int
    in_ch: int
    imgsz: int


class TensorImages(Dataset):
    """Images held as a tensor (N, C, H, W) and a transform applied to each."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), int(self.labels[i])


def read_cifar(root: str | Path, name: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, test) of (uint8 images N×3×32×32, labels) from the python pickle layout torchvision reads.

    `root` is the folder holding cifar-10-batches-py/ or cifar-100-python/, or that folder itself.
    """
    folder, train_files, test_file, label_key = CIFAR_FILES[name]
    root = Path(root)
    base = root if root.name == folder else root / folder

    def read(file: str) -> tuple[np.ndarray, np.ndarray]:
        path = base / file
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {name} file not found (--root: the folder holding {folder}/)")
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
            raise ValueError(f"{path}: not a {name} python batch (needs 'data' and '{label_key}')")
        return np.asarray(entry["data"], np.uint8).reshape(-1, 3, 32, 32), np.asarray(entry[label_key], np.int64)

    parts = [read(f) for f in train_files]
    train = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return train, read(test_file)


def native_size(name: str, root: str | Path | None) -> int:
    """The images' own side: fixed for the built-in datasets, the first training image's shorter side otherwise."""
    if name in NATIVE_SIZE:
        return NATIVE_SIZE[name]
    from PIL import Image

    train = _imagefolder_split(root, "train")
    first = next((p for p in sorted(train.rglob("*")) if p.is_file() and not p.name.startswith(".")), None)
    if first is None:
        raise FileNotFoundError(f"{train}: no images")
    with Image.open(first) as im:
        return min(im.size)


def default_imgsz(model: str, data: str, root: str | Path | None) -> int:
    """224 for the ImageNet models, else the images' own size capped at SMALL_MAX (see the module docstring)."""
    from sos_detect.classify.models import IMAGENET_MODELS

    return 224 if model in IMAGENET_MODELS else min(native_size(data, root), SMALL_MAX)


def _small_transforms(imgsz: int, native: int, mean, std, pad: float = 1 / 8, from_pil: bool = False):
    """(train, eval) transforms of the CIFAR recipe at imgsz; tensors in, or PIL images with from_pil."""
    from torchvision.transforms import v2

    head = [v2.ToImage()] if from_pil else []
    if imgsz != native or from_pil:
        head += [v2.Resize(imgsz, antialias=True), v2.CenterCrop(imgsz)]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    crop = [v2.RandomCrop(imgsz, padding=max(1, round(pad * imgsz))), v2.RandomHorizontalFlip()]
    return v2.Compose([*head, *crop, *tail]), v2.Compose([*head, *tail])


def _imagenet_transforms(imgsz: int):
    from torchvision.transforms import v2

    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = v2.Compose([v2.RandomResizedCrop(imgsz, antialias=True), v2.RandomHorizontalFlip(), *tail])
    test = v2.Compose([v2.Resize(round(imgsz / 0.875), antialias=True), v2.CenterCrop(imgsz), *tail])
    return train, test


def check_root(name: str, root: str | Path | None) -> None:
    """A dataset that lives in a folder needs --root, and the folder must exist (nothing is downloaded)."""
    if root is None:
        raise FileNotFoundError(f"--data {name} needs --root, the dataset folder (nothing is downloaded)")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"--root {root}: dataset folder not found")


def _imagefolder_split(root: str | Path | None, split: str) -> Path:
    check_root("imagefolder", root)
    path = Path(root) / split
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: ImageFolder split not found (need train/ and val/)")
    return path


def _subset(ds: Dataset, n: int | None, seed: int, flag: str) -> Dataset:
    """n samples of ds drawn with the seed (all when n is None); more than ds holds is refused, not capped."""
    if n is None:
        return ds
    if not 1 <= n <= len(ds):
        raise ValueError(f"{flag} {n}: must be an integer in [1, {len(ds)}] (the set holds {len(ds)} samples)")
    if n == len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, idx.tolist())


def load_classification_data(
    name: str,
    root: str | Path | None = None,
    *,
    imgsz: int | None = None,
    model: str = "resnet18",
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
) -> ClassificationData:
    """Train (augmented), plain train and test sets for `name` (see DATASETS) at `imgsz` (default: default_imgsz)."""
    if name not in DATASETS:
        raise ValueError(f"--data must be one of {DATASETS}, got {name!r}")
    if name in ("cifar10", "cifar100", "imagefolder"):
        check_root(name, root)
    imgsz = imgsz or default_imgsz(model, name, root)
    if imgsz < 1:
        raise ValueError(f"--imgsz must be >= 1, got {imgsz}")
    if name == "imagefolder":
        import torchvision

        if imgsz <= SMALL_MAX:
            tf_train, tf_test = _small_transforms(imgsz, 0, IMAGENET_MEAN, IMAGENET_STD, from_pil=True)
        else:
            tf_train, tf_test = _imagenet_transforms(imgsz)
        folder = lambda split, tf: torchvision.datasets.ImageFolder(  # noqa: E731
            _imagefolder_split(root, split), tf, allow_empty=split == "val"
        )
        train, plain, test = folder("train", tf_train), folder("train", tf_test), folder("val", tf_test)
        if test.classes != train.classes:
            raise ValueError(
                f"{Path(root) / 'val'}: class folders {test.classes[:5]}... differ from train/'s {train.classes[:5]}..."
            )
        for split, ds in (("train", train), ("val", test)):
            check_images([Path(f) for f, _ in ds.samples], split)
        if len(train.classes) < 2:
            raise ValueError(
                f"{Path(root) / 'train'}: {len(train.classes)} class folder ({', '.join(train.classes)}); "
                "classification needs at least 2"
            )
        num_classes, in_ch = len(train.classes), 3
    else:
        if name == "digits":
            from sos_detect.classify.digits import load_digits_split

            x, y, xt, yt = load_digits_split(seed=0)  # standardised already: mean 0, std 1 per pixel
            (xtr, ytr), (xte, yte), mean, std = (x.view(-1, 1, 8, 8), y), (xt.view(-1, 1, 8, 8), yt), (0.0,), (1.0,)
        elif name == "fashion-mnist":
            (xtr, ytr), (xte, yte) = read_fashion_mnist(Path(root or FASHION_ROOT))
            xtr, xte = xtr[:, None], xte[:, None]  # one channel
            mean, std = (0.2860,), (0.3530,)
        else:
            (xtr, ytr), (xte, yte) = read_cifar(root, name)
            mean, std = CIFAR_MEAN, CIFAR_STD
        as_t = lambda a: a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        xtr, ytr, xte, yte = map(as_t, (xtr, ytr, xte, yte))
        tf_train, tf_test = _small_transforms(imgsz, NATIVE_SIZE[name], mean, std, PADDING.get(name, 1 / 8))
        if name == "digits":  # not augmented: only resized, if at all
            tf_train = tf_test
        train, plain = TensorImages(xtr, ytr, tf_train), TensorImages(xtr, ytr, tf_test)
        test = TensorImages(xte, yte, tf_test)
        num_classes, in_ch = {"cifar100": 100}.get(name, 10), xtr.shape[1]
    return ClassificationData(
        _subset(train, train_subset, seed, "--train-subset"),
        _subset(plain, train_subset, seed, "--train-subset"),
        _subset(test, test_subset, seed, "--test-subset"),
        num_classes,
        in_ch,
        imgsz,
    )
