"""The classification training loop with Algorithm 1 (SOS on the final linear layer) and post-hoc shifting.

Runs land in project/name, auto-incremented like Ultralytics' (train, train-2, …); a finished run (model.pt) is
never overwritten. After every epoch last.pt holds everything needed to continue an interrupted run bit-exactly.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from sos_detect.classify.data import SMALL_MAX, ClassificationData, default_imgsz, load_classification_data
from sos_detect.classify.models import CIFAR_MODELS, build_model, final_linear
from sos_detect.core.apply import shift_model
from sos_detect.core.optim import NSO, SAM
from sos_detect.core.options import MAX_IMGSZ, ShiftConfig, check_options, sos_options
from sos_detect.core.record import ShiftReport
from sos_detect.core.runs import save_atomic

OPTIMIZERS = ("sgd", "sam", "nso")
CHECKPOINT = "last.pt"  # written after every epoch, removed when the run finishes
FINISHED = "model.pt"  # a finished run: never overwritten
RESUME_FREE = ("project", "name", "exist_ok", "resume", "device", "workers")  # settings a resumed run may change


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
    sos_tau: float = 1e-4  # guarded mode
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


def _loader(ds: Dataset, batch: int, shuffle: bool, seed: int, workers: int) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=batch,
        shuffle=shuffle,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


def eval_batch(cfg: TrainConfig) -> int:
    """Batch of the no-grad passes (evaluation, SOS capture): twice the training batch, as Ultralytics validates.

    A no-grad forward keeps about a quarter of a training step's activations per image, so these passes never need
    more memory than training does (a fixed 512 held 300–512 full-resolution images at once).
    """
    return 2 * cfg.batch_size


def evaluate(model: nn.Module, ds: Dataset, device: torch.device, batch: int = 128) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy."""
    model.eval()
    loss = top1 = top5 = n = 0.0
    with torch.no_grad():
        for x, y in _loader(ds, batch, False, 0, 0):
            x, y = x.to(device), y.to(device)
            out = model(x).float()
            loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            k = min(5, out.shape[1])
            top = out.topk(k, dim=1).indices
            top1 += float((top[:, 0] == y).sum())
            top5 += float((top == y[:, None]).any(dim=1).sum())
            n += len(y)
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n}


def sos_step(
    model: nn.Module,
    plain_train: Dataset,
    cfg: TrainConfig,
    device: torch.device,
    seed: int,
    optimizer: torch.optim.Optimizer | None = None,
) -> ShiftReport:
    """Algorithm 1's shift of the final linear layer on a fresh random sample of training data (no augmentation).

    paper: one batch of b = sos_batch samples, τ = 0 (b rows, so b < width makes the system under-determined);
    guarded: sos_samples samples, budget τ. The loss on the captured samples is measured before and after.
    The samples are read in chunks of eval_batch(cfg), never all at once.
    """
    name, layer = final_linear(model)
    n = cfg.sos_batch if cfg.sos_mode == "paper" else cfg.sos_samples
    idx = torch.randperm(len(plain_train), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    batches = _loader(Subset(plain_train, idx), eval_batch(cfg), False, 0, 0)
    forward = lambda m, b: m(b[0].to(device))  # noqa: E731

    def loss_fn(m: nn.Module) -> float:
        modes = {mod: mod.training for mod in m.modules()}
        m.eval()
        total = sum(
            float(nn.functional.cross_entropy(m(x.to(device)), y.to(device), reduction="sum")) for x, y in batches
        )
        for mod, training in modes.items():
            mod.training = training
        return total / len(idx)

    return shift_model(
        model,
        {name: layer},
        batches,
        cfg.shift_config(),
        forward=forward,
        optimizer=optimizer,
        loss_fn=loss_fn,
        seed=seed,
    )


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    kw = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "sam":
        return SAM(model.parameters(), torch.optim.SGD, rho=cfg.rho, adaptive=cfg.adaptive, **kw)
    if cfg.optimizer == "nso":
        return NSO(
            model.parameters(),
            torch.optim.SGD,
            sigma=cfg.sigma,
            num_perturbations=cfg.nso_perturbations,
            generator=torch.Generator().manual_seed(cfg.seed),
            **kw,
        )
    return torch.optim.SGD(model.parameters(), **kw)


def _lr_factor(cfg: TrainConfig, epoch: int) -> float:
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    return 0.1 ** sum(epoch >= f * cfg.epochs for f in (0.5, 0.75))


def _rng_states(loader: DataLoader, opt: torch.optim.Optimizer, device: torch.device) -> dict[str, Any]:
    """Every random stream the loop draws from: global CPU (augmentation, Mixup), shuffling, NSO noise, CUDA."""
    return {
        "torch": torch.get_rng_state(),
        "loader": loader.generator.get_state(),
        "nso": opt.generator.get_state() if isinstance(opt, NSO) else None,
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _set_rng_states(states: dict[str, Any], loader: DataLoader, opt: torch.optim.Optimizer, device) -> None:
    torch.set_rng_state(states["torch"])
    loader.generator.set_state(states["loader"])
    if isinstance(opt, NSO):
        opt.generator.set_state(states["nso"])
    if device.type == "cuda" and states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)


def _check_fit(model: nn.Module, data: ClassificationData, cfg: TrainConfig) -> None:
    """The model takes the data's inputs and has one output per class (one test sample, eval mode)."""
    _, last = final_linear(model)
    if last.out_features != data.num_classes:
        raise ValueError(
            f"--model {cfg.model} ends in {last.out_features} outputs but --data {cfg.data} has "
            f"{data.num_classes} classes"
        )
    x = data.test[0][0][None].to(next(model.parameters()).device)
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError as err:
        raise ValueError(
            f"--model {cfg.model} cannot take --data {cfg.data} inputs of shape {tuple(x.shape[1:])}: "
            f"{str(err).splitlines()[0]}"
        ) from None


def changed_settings(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """'key saved → now' for every setting of a saved run that differs from cfg (RESUME_FREE aside, and settings
    the run predates, such as imgsz in runs made when every dataset had its one size)."""
    now = asdict(cfg)
    return [f"{k} {saved[k]!r} → {now[k]!r}" for k in now if k not in RESUME_FREE and k in saved and saved[k] != now[k]]


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


def unfinished_runs(project: str | Path, name: str) -> list[Path]:
    """Run folders project/name, project/name-2, … holding a last.pt, the most recently written first."""
    base = Path(project) / name
    found = [base] + [p for p in base.parent.glob(f"{name}-*") if p.name[len(name) + 1 :].isdigit()]
    runs = [p for p in found if (p / CHECKPOINT).is_file()]
    return sorted(runs, key=lambda p: (p / CHECKPOINT).stat().st_mtime, reverse=True)


def resume_folder(resume: bool | str, project: str | Path, name: str) -> Path:
    """The run that resume=… continues: the given folder (or its last.pt), or the latest unfinished project/name."""
    if resume is True:
        runs = unfinished_runs(project, name)
        if not runs:
            raise FileNotFoundError(f"{Path(project) / name}: no unfinished run of this name to resume (no last.pt)")
        return runs[0]
    path = Path(resume)
    folder = path.parent if path.name == CHECKPOINT else path
    if not (folder / CHECKPOINT).is_file():
        state = "a finished run, nothing to resume" if (folder / FINISHED).is_file() else "no last.pt"
        raise FileNotFoundError(f"{path}: {state} (--resume)")
    return folder


def resume_config(resume: bool | str, project: str, name: str, given: dict[str, Any]) -> TrainConfig:
    """The saved settings of the run to resume, `given` on top; train() refuses those that differ (RESUME_FREE aside).

    This is what `classify train --resume` runs: options the user typed are checked against the run's own.
    """
    folder = resume_folder(resume, project, name)
    saved = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=True)["config"]
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in saved.items() if k in known}, **given, "resume": str(folder)})


def run_folder(cfg: TrainConfig) -> Path:
    """Where the run goes: the resumed folder, project/name with exist_ok, else project/name auto-incremented."""
    if cfg.resume:
        return resume_folder(cfg.resume, cfg.project, cfg.name)
    from ultralytics.utils.files import increment_path

    folder = increment_path(Path(cfg.project) / cfg.name, exist_ok=cfg.exist_ok)
    if (folder / FINISHED).is_file():
        raise ValueError(f"{folder}: holds a finished run ({FINISHED}), never overwritten; drop --exist-ok or rename")
    return folder


def _load_checkpoint(cfg: TrainConfig, folder: Path) -> dict[str, Any]:
    """folder/last.pt of an interrupted run with the same settings as cfg (RESUME_FREE aside)."""
    path = folder / CHECKPOINT
    state = torch.load(path, map_location="cpu", weights_only=True)
    changed = changed_settings(state["config"], cfg)
    if changed:
        raise ValueError(
            f"{path}: an unfinished run with other settings ({', '.join(changed)}); resume it with its own "
            "settings or start a new run without --resume"
        )
    return state


def train(cfg: TrainConfig, data: ClassificationData | None = None) -> dict[str, Any]:
    """Train with the configured scheme into a run folder (run_folder): log.csv, sos_log.jsonl, model.pt.

    After every epoch folder/last.pt holds the model, optimiser, log and random states, so resume=True (or the
    folder) continues an interrupted run exactly where it stopped (the same weights as an uninterrupted run).
    Returns {"final": last log row, "rows": log rows, "save_dir": folder}.
    """
    from ultralytics.utils import LOGGER, TQDM

    cfg.check()
    cfg = replace(cfg, imgsz=data.imgsz) if data is not None and not cfg.imgsz else with_imgsz(cfg)
    folder = run_folder(cfg)
    state = _load_checkpoint(cfg, folder) if cfg.resume else None
    if state is None:
        for other in unfinished_runs(cfg.project, cfg.name)[:1]:
            if other != folder:
                LOGGER.info(f"{other} holds an unfinished run; --resume continues it")
    if cfg.model in CIFAR_MODELS and cfg.imgsz > SMALL_MAX:
        LOGGER.warning(
            f"--model {cfg.model} has a CIFAR stem (no early downsampling): at imgsz {cfg.imgsz} its activations are "
            f"{(cfg.imgsz / 32) ** 2:.0f}× those at 32 px; the ImageNet models suit large images"
        )
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    data = data or config_data(cfg)
    model = build_model(cfg.model, data.num_classes, data.in_ch, cfg.weights).to(device)
    _check_fit(model, data, cfg)
    opt = _optimizer(model, cfg)
    base = getattr(opt, "base_optimizer", opt)
    loader = _loader(data.train, cfg.batch_size, True, cfg.seed, cfg.workers)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)  # only now: every check above fails without leaving a folder
    rows: list[dict[str, float]] = []
    if state is not None:
        model.load_state_dict(state["model"])
        base.load_state_dict(state["optimizer"])
        _set_rng_states(state["rng"], loader, opt, device)
        rows = state["rows"]
    else:
        (folder / CHECKPOINT).unlink(missing_ok=True)  # exist_ok without resume: start over
    _keep_log_until(folder / "sos_log.jsonl", len(rows))
    (folder / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    LOGGER.info(
        f"classify {cfg.model} on {cfg.data} ({len(data.train)} train / {len(data.test)} test images, "
        f"imgsz {cfg.imgsz}, batch {cfg.batch_size}), {cfg.optimizer}{' + SOS' if cfg.sos else ''} → {folder}"
    )
    mix = torch.distributions.Beta(cfg.mixup, cfg.mixup) if cfg.mixup > 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    start = time.time() - (rows[-1]["seconds"] if rows else 0.0)
    for epoch in range(len(rows), cfg.epochs):
        for g in base.param_groups:
            g["lr"] = cfg.lr * _lr_factor(cfg, epoch)
        model.train()
        seen = loss_sum = correct = 0.0
        LOGGER.info(f"{'Epoch':>10}{'loss':>10}{'acc':>10}{'imgsz':>10}")
        pbar = TQDM(loader, total=len(loader))
        for x, y in pbar:
            x, y = x.to(device), y.to(device)
            lam, perm = 1.0, None
            if mix is not None:
                lam = float(mix.sample())
                perm = torch.randperm(len(y), device=device)
                x = lam * x + (1 - lam) * x[perm]
            first: list[torch.Tensor] = []  # the step's first forward: its outputs give the logged accuracy

            def closure(x=x, y=y, lam=lam, perm=perm, first=first):
                opt.zero_grad()
                with autocast:
                    out_ = model(x).float()
                    loss_ = lam * nn.functional.cross_entropy(out_, y)
                    if perm is not None:
                        loss_ = loss_ + (1 - lam) * nn.functional.cross_entropy(out_, y[perm])
                loss_.backward()
                if not first:
                    first.append(out_.detach())
                return loss_

            loss = opt.step(closure, model) if cfg.optimizer in ("sam", "nso") else _sgd_step(opt, closure)
            loss_sum += float(loss.detach()) * len(y)
            correct += float((first[0].argmax(1) == y).sum())
            seen += len(y)
            pbar.set_description(
                f"{f'{epoch + 1}/{cfg.epochs}':>10}{loss_sum / seen:>10.4g}{correct / seen:>10.4g}{cfg.imgsz:>10}"
            )
        if not math.isfinite(loss_sum / seen):  # a diverged model is never saved as a finished run
            if created and not rows:
                shutil.rmtree(folder, ignore_errors=True)
            kept = f"; {folder / CHECKPOINT} holds epoch {len(rows)}" if rows else ""
            raise ValueError(
                f"--lr {cfg.lr}: training diverged in epoch {epoch + 1} (loss {loss_sum / seen}); lower it{kept}"
            )
        report = None
        if cfg.sos and epoch >= cfg.sos_start and (epoch - cfg.sos_start) % cfg.sos_every == 0:
            report = sos_step(model, data.plain_train, cfg, device, cfg.seed * 1000 + epoch, optimizer=base)
            with open(folder / "sos_log.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch + 1, **report.to_dict()}) + "\n")
        test = evaluate(model, data.test, device, eval_batch(cfg))
        shift = f"  SOS ‖V'‖/‖V‖ {report.norm_ratio:.4f}" if report else ""
        LOGGER.info(f"{'test':>10}{test['loss']:>10.4g}  top-1 {test['top1']:.4f}  top-5 {test['top5']:.4f}{shift}")
        rows.append(
            {
                "epoch": epoch + 1,
                "lr": base.param_groups[0]["lr"],
                "train_loss": loss_sum / seen,
                "train_acc": correct / seen,
                "test_loss": test["loss"],
                "test_top1": test["top1"],
                "test_top5": test["top5"],
                "last_norm": float(final_linear(model)[1].weight.detach().norm()),
                "sos_applied": float(bool(report and report.applied)),
                "sos_norm_ratio": report.norm_ratio if report else 1.0,
                "sos_loss_before": report.loss_before if report else math.nan,
                "sos_loss_after": report.loss_after if report else math.nan,
                "seconds": time.time() - start,
            }
        )
        save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": base.state_dict(),
                "rng": _rng_states(loader, opt, device),
                "rows": rows,
                "config": asdict(cfg),
            },
            folder / CHECKPOINT,
        )
    with open(folder / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    save_atomic({"model": model.state_dict(), "config": asdict(cfg)}, folder / FINISHED)
    (folder / CHECKPOINT).unlink(missing_ok=True)
    final = rows[-1]
    LOGGER.info(
        f"Final ({folder / FINISHED}): test top-1 {final['test_top1']:.4f}  top-5 {final['test_top5']:.4f}  "
        f"loss {final['test_loss']:.4f}  last-layer norm {final['last_norm']:.4f}, {final['seconds']:.0f} s"
    )
    return {"final": final, "rows": rows, "save_dir": folder}


def _keep_log_until(path: Path, epochs: int) -> None:
    """Keep the SOS log entries of the first `epochs` epochs (all of a resumed run's, none of a fresh one's)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["epoch"] <= epochs]
    path.write_text("".join(kept))


def _sgd_step(opt: torch.optim.Optimizer, closure) -> torch.Tensor:
    loss = closure()
    opt.step()
    return loss


def shift_classifier(model: nn.Module, data: ClassificationData, cfg: TrainConfig) -> dict[str, Any]:
    """Post-hoc shift of a trained model's final linear layer: top-1/top-5 before and after (Table 2)."""
    device = torch.device(cfg.device)
    model.to(device)
    before = evaluate(model, data.test, device, eval_batch(cfg))
    report = sos_step(model, data.plain_train, cfg, device, cfg.seed)
    after = evaluate(model, data.test, device, eval_batch(cfg))
    return {"before": before, "after": after, "report": report}
