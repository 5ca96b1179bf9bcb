"""What a classification run is: its settings (TrainConfig) with their checks, the image size and batch they
resolve to, and the data they name."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from sos_detect.classify.data import ClassificationData, default_imgsz, load_classification_data
from sos_detect.core.options import MAX_IMGSZ, SOS_DEFAULTS, ShiftConfig, check_options, sos_options

OPTIMIZERS = ("sgd", "sam", "nso")


@dataclass
class TrainConfig:
    model: str = "resnet18"
    data: str = "cifar100"
    root: str | None = None
    imgsz: int | None = None  # None: the dataset's and model's default (data.default_imgsz)
    optimizer: str = "sgd"
    epochs: int = 200
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9  # Nesterov
    weight_decay: float = 5e-4
    schedule: str = "step"  # step: ÷10 at 50 % and 75 % of the epochs; cosine
    rho: float = 0.05  # SAM
    adaptive: bool = False  # ASAM
    sigma: float = 0.01  # NSO
    nso_perturbations: int = 1
    mixup: float = 0.0  # Beta(α, α); 0 = off
    sos: bool = False
    sos_mode: str = "paper"  # paper: τ = 0 on sos_batch sampled training samples (Algorithm 1); guarded
    sos_batch: int = 300  # b, paper mode (CIFAR-100 best at 300 in the paper)
    sos_tau: float = SOS_DEFAULTS["sos_tau"]  # guarded mode
    sos_samples: int = 2048  # guarded mode: training samples captured per shift
    sos_every: int = 1
    sos_start: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    weights: str | None = None
    seed: int = 0
    device: str = "cpu"
    amp: bool = False  # bf16 autocast on CUDA
    workers: int = 0
    project: str = "runs/classify"
    name: str = "train"
    exist_ok: bool = False  # reuse project/name as it is (never a finished run's folder)
    resume: bool | str = False  # True: the latest unfinished run of project/name; or a run folder / its last.pt

    def check(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"--schedule must be step or cosine, got {self.schedule!r}")
        flag = lambda key: "--" + ("batch" if key == "batch_size" else key.replace("_", "-"))  # noqa: E731
        for key in ("imgsz", "epochs", "batch_size", "sos_batch", "sos_samples", "sos_every", "nso_perturbations"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{flag(key)} must be >= 1, got {value}")
        if self.imgsz is not None and self.imgsz > MAX_IMGSZ:
            raise ValueError(f"--imgsz {self.imgsz}: must be an integer in [1, {MAX_IMGSZ}]")
        for key in ("workers", "sos_start"):
            if getattr(self, key) < 0:
                raise ValueError(f"{flag(key)} {getattr(self, key)}: must be an integer >= 0")
        positive = ("lr", "rho")  # a zero step or radius trains nothing; NaN or inf trains a NaN model
        for key in ("lr", "momentum", "weight_decay", "rho", "sigma", "mixup"):
            value = getattr(self, key)
            low = "> 0" if key in positive else ">= 0"
            if not math.isfinite(value) or value < 0 or (key in positive and value == 0):
                raise ValueError(f"{flag(key)} {value}: must be a finite number {low}")
        if self.momentum >= 1:
            raise ValueError(f"--momentum {self.momentum}: must be a finite number in [0, 1)")
        self.shift_config()

    def shift_config(self) -> ShiftConfig:
        """The shift Algorithm 1 makes (b = sos_batch samples in paper mode, no rollback), checked by the option
        table's rows; errors name the flags of `sos-detect classify`."""
        flags = {"sos_rows": "--sos-batch"}
        values = {"sos_mode": self.sos_mode, "sos_tau": self.sos_tau, "sos_rows": self.sos_batch}
        check_options(values, sos_options("shift"), lambda key: flags.get(key, "--" + key.replace("_", "-")))
        return ShiftConfig(mode=self.sos_mode, tau=self.sos_tau, rows=self.sos_batch, max_change=None)


def eval_batch(cfg: TrainConfig) -> int:
    """Batch of the no-grad passes (evaluation, SOS capture): twice the training batch, as Ultralytics validates.

    A no-grad forward keeps about a quarter of a training step's activations per image, so these passes never need
    more memory than training does (a fixed 512 held 300–512 full-resolution images at once).
    """
    return 2 * cfg.batch_size


def with_imgsz(cfg: TrainConfig) -> TrainConfig:
    """cfg with imgsz resolved to its default when unset: what a run records and is compared by."""
    return cfg if cfg.imgsz else replace(cfg, imgsz=default_imgsz(cfg.model, cfg.data, cfg.root))


def config_data(cfg: TrainConfig) -> ClassificationData:
    """The datasets cfg names, at its image size (its default when unset)."""
    return load_classification_data(
        cfg.data,
        cfg.root,
        imgsz=cfg.imgsz,
        model=cfg.model,
        train_subset=cfg.train_subset,
        test_subset=cfg.test_subset,
        seed=cfg.seed,
    )
