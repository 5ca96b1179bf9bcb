"""The classification training loop with Algorithm 1 (SOS on the final linear layer) and post-hoc shifting."""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sos_detect.classify.data import ClassificationData, load_classification_data
from sos_detect.classify.models import build_model, final_linear
from sos_detect.classify.optim import NSO, SAM
from sos_detect.files import save_atomic
from sos_detect.layers import ShiftReport, check_shift_options, shift_model

OPTIMIZERS = ("sgd", "sam", "nso")
CHECKPOINT = "last.pt"  # written after every epoch, removed when the run finishes
RESUME_FREE = ("out", "device", "workers", "resume")  # settings a resumed run may change


@dataclass
class TrainConfig:
    model: str = "resnet18"
    data: str = "cifar100"
    root: str | None = None
    optimizer: str = "sgd"
    epochs: int = 200
    batch_size: int = 128
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
    resume: bool = True  # continue an interrupted run from out/last.pt
    out: str = "runs/classify/train"

    def check(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"--schedule must be step or cosine, got {self.schedule!r}")
        for key in ("epochs", "batch_size", "sos_batch", "sos_samples", "sos_every", "nso_perturbations"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        check_shift_options(
            self.sos_mode, self.sos_tau, self.sos_batch if self.sos_mode == "paper" else None, prefix="--sos-"
        )


def _loader(ds: Dataset, batch: int, shuffle: bool, seed: int, workers: int) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=batch,
        shuffle=shuffle,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


def evaluate(model: nn.Module, ds: Dataset, device: torch.device, batch: int = 512) -> dict[str, float]:
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


def _random_batches(ds: Dataset, n: int, batch: int, seed: int) -> list[torch.Tensor]:
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    xs = torch.stack([ds[i][0] for i in idx])
    ys = torch.tensor([ds[i][1] for i in idx])
    return [(xs[i : i + batch], ys[i : i + batch]) for i in range(0, len(xs), batch)]


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
    """
    name, layer = final_linear(model)
    n = cfg.sos_batch if cfg.sos_mode == "paper" else cfg.sos_samples
    batches = _random_batches(plain_train, n, 512, seed)
    forward = lambda m, b: m(b[0].to(device))  # noqa: E731

    def loss_fn(m: nn.Module) -> float:
        modes = {mod: mod.training for mod in m.modules()}
        m.eval()
        total = sum(
            float(nn.functional.cross_entropy(m(x.to(device)), y.to(device), reduction="sum")) for x, y in batches
        )
        for mod, training in modes.items():
            mod.training = training
        return total / n

    return shift_model(
        model,
        {name: layer},
        batches,
        mode=cfg.sos_mode,
        tau=cfg.sos_tau,
        rows=cfg.sos_batch if cfg.sos_mode == "paper" else None,
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
    """'key saved → now' for every setting of a saved run that differs from cfg (RESUME_FREE aside)."""
    now = asdict(cfg)
    return [f"{k} {saved.get(k)!r} → {now[k]!r}" for k in now if k not in RESUME_FREE and saved.get(k) != now[k]]


def _load_checkpoint(cfg: TrainConfig, out: Path) -> dict[str, Any] | None:
    """out/last.pt of an interrupted run with the same settings (RESUME_FREE aside); None to start afresh."""
    path = out / CHECKPOINT
    if not (cfg.resume and path.is_file()):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    changed = changed_settings(state["config"], cfg)
    if changed:
        raise ValueError(
            f"{path}: an unfinished run with other settings ({', '.join(changed)}); rerun with its settings, "
            "pass --no-resume to start over, or choose another --out"
        )
    return state


def train(cfg: TrainConfig, data: ClassificationData | None = None) -> dict[str, Any]:
    """Train with the configured scheme; writes log.csv, sos_log.jsonl and model.pt under cfg.out.

    After every epoch out/last.pt holds the model, optimiser, log and random states, so a rerun with the same
    settings continues an interrupted run exactly where it stopped (the same weights as an uninterrupted run).
    """
    cfg.check()
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    data = data or load_classification_data(
        cfg.data, cfg.root, train_subset=cfg.train_subset, test_subset=cfg.test_subset, seed=cfg.seed
    )
    model = build_model(cfg.model, data.num_classes, data.in_ch, cfg.weights).to(device)
    _check_fit(model, data, cfg)
    opt = _optimizer(model, cfg)
    base = getattr(opt, "base_optimizer", opt)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    loader = _loader(data.train, cfg.batch_size, True, cfg.seed, cfg.workers)
    rows: list[dict[str, float]] = []
    state = _load_checkpoint(cfg, out)
    if state is not None:
        model.load_state_dict(state["model"])
        base.load_state_dict(state["optimizer"])
        _set_rng_states(state["rng"], loader, opt, device)
        rows = state["rows"]
    _keep_log_until(out / "sos_log.jsonl", len(rows))
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    mix = torch.distributions.Beta(cfg.mixup, cfg.mixup) if cfg.mixup > 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    start = time.time() - (rows[-1]["seconds"] if rows else 0.0)
    for epoch in range(len(rows), cfg.epochs):
        for g in base.param_groups:
            g["lr"] = cfg.lr * _lr_factor(cfg, epoch)
        model.train()
        seen = loss_sum = 0.0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if mix is not None:
                lam = float(mix.sample())
                perm = torch.randperm(len(y), device=device)
                x = lam * x + (1 - lam) * x[perm]

            def closure(x=x, y=y, lam=lam if mix else 1.0, perm=perm if mix else None):
                opt.zero_grad()
                with autocast:
                    out_ = model(x).float()
                    loss_ = lam * nn.functional.cross_entropy(out_, y)
                    if perm is not None:
                        loss_ = loss_ + (1 - lam) * nn.functional.cross_entropy(out_, y[perm])
                loss_.backward()
                return loss_

            loss = opt.step(closure, model) if cfg.optimizer in ("sam", "nso") else _sgd_step(opt, closure)
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
        report = None
        if cfg.sos and epoch >= cfg.sos_start and (epoch - cfg.sos_start) % cfg.sos_every == 0:
            report = sos_step(model, data.plain_train, cfg, device, cfg.seed * 1000 + epoch, optimizer=base)
            with open(out / "sos_log.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch + 1, **report.to_dict()}) + "\n")
        test = evaluate(model, data.test, device)
        rows.append(
            {
                "epoch": epoch + 1,
                "lr": base.param_groups[0]["lr"],
                "train_loss": loss_sum / seen,
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
            out / CHECKPOINT,
        )
    with open(out / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    save_atomic({"model": model.state_dict(), "config": asdict(cfg)}, out / "model.pt")
    (out / CHECKPOINT).unlink(missing_ok=True)
    return {"final": rows[-1], "rows": rows}


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
    before = evaluate(model, data.test, device)
    report = sos_step(model, data.plain_train, cfg, device, cfg.seed)
    after = evaluate(model, data.test, device)
    return {"before": before, "after": after, "report": report}
