"""The classification training loop with Algorithm 1 (SOS on the final linear layer) and post-hoc shifting.

`train` runs its steps in order: open the run (classify/runs.py), build the model, optimiser and loader, restore an
interrupted run's state, then per epoch train, shift (SOS), evaluate and log, and checkpoint; finally write the
finished run. After every epoch last.pt holds everything needed to continue an interrupted run bit-exactly.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from sos_detect.classify.config import TrainConfig, config_data, eval_batch, with_imgsz
from sos_detect.classify.data import SMALL_MAX, ClassificationData
from sos_detect.classify.models import CIFAR_MODELS, build_model, final_linear
from sos_detect.classify.runs import CHECKPOINT, FINISHED, open_run
from sos_detect.core.apply import shift_model
from sos_detect.core.capture import eval_mode
from sos_detect.core.optim import NSO, SAM
from sos_detect.core.record import ShiftReport, keep_log_epochs
from sos_detect.core.runs import save_atomic, write_csv


def _loader(ds: Dataset, batch: int, shuffle: bool, seed: int, workers: int) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=batch,
        shuffle=shuffle,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


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
        with eval_mode(m):
            total = sum(
                float(nn.functional.cross_entropy(m(x.to(device)), y.to(device), reduction="sum")) for x, y in batches
            )
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


@dataclass
class _Loop:
    """What the steps of one training share: the resolved settings and data, the model, the optimiser (`opt`, which
    steps) and the SGD it wraps (`base`, which holds lr and state), the shuffling loader, the run folder, Mixup's
    Beta(α, α) (None: off) and the autocast context (bf16 on CUDA with amp)."""

    cfg: TrainConfig
    data: ClassificationData
    device: torch.device
    model: nn.Module
    opt: torch.optim.Optimizer
    base: torch.optim.Optimizer
    loader: DataLoader
    folder: Path
    mix: torch.distributions.Beta | None
    autocast: torch.autocast


def train(cfg: TrainConfig, data: ClassificationData | None = None) -> dict[str, Any]:
    """Train with the configured scheme into a run folder (runs.run_folder): log.csv, sos_log.jsonl, model.pt.

    After every epoch folder/last.pt holds the model, optimiser, log and random states, so resume=True (or the
    folder) continues an interrupted run exactly where it stopped (the same weights as an uninterrupted run).
    Returns {"final": last log row, "rows": log rows, "save_dir": folder}.
    """
    cfg.check()
    cfg = replace(cfg, imgsz=data.imgsz) if data is not None and not cfg.imgsz else with_imgsz(cfg)
    folder, state = open_run(cfg)
    loop = _build(cfg, data, folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)  # only now: every check above fails without leaving a folder
    rows = _restore(loop, state)
    _record_start(loop, rows)
    start = time.time() - (rows[-1]["seconds"] if rows else 0.0)
    for epoch in range(len(rows), cfg.epochs):
        loss, acc = _train_epoch(loop, epoch)
        if not math.isfinite(loss):  # a diverged model is never saved as a finished run
            _diverged(loop, epoch, loss, rows, created)
        report = _shift(loop, epoch)
        rows.append(_epoch_row(loop, epoch, loss, acc, report, start))
        _save_checkpoint(loop, rows)
    return _finish(loop, rows)


def _build(cfg: TrainConfig, data: ClassificationData | None, folder: Path) -> _Loop:
    """Seed the global RNG with cfg.seed, then load the data (cfg's when not given), build the model (checked to
    take the data), its optimiser and the shuffling loader; nothing is written. A CIFAR-stem model given large
    images is warned about first."""
    from ultralytics.utils import LOGGER

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
    loader = _loader(data.train, cfg.batch_size, True, cfg.seed, cfg.workers)
    mix = torch.distributions.Beta(cfg.mixup, cfg.mixup) if cfg.mixup > 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    base = getattr(opt, "base_optimizer", opt)
    return _Loop(cfg, data, device, model, opt, base, loader, folder, mix, autocast)


def _restore(loop: _Loop, state: dict[str, Any] | None) -> list[dict[str, float]]:
    """An interrupted run's model, optimiser and random states put back, its log rows returned; a fresh run drops
    a last.pt left in its folder (exist_ok without resume: start over) and starts with no rows."""
    if state is None:
        (loop.folder / CHECKPOINT).unlink(missing_ok=True)
        return []
    loop.model.load_state_dict(state["model"])
    loop.base.load_state_dict(state["optimizer"])
    _set_rng_states(state["rng"], loop.loader, loop.opt, loop.device)
    return state["rows"]


def _record_start(loop: _Loop, rows: list[dict[str, float]]) -> None:
    """The SOS log trimmed to the epochs done, config.json written, the run announced."""
    from ultralytics.utils import LOGGER

    cfg, data, folder = loop.cfg, loop.data, loop.folder
    keep_log_epochs(folder / "sos_log.jsonl", len(rows))
    (folder / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    LOGGER.info(
        f"classify {cfg.model} on {cfg.data} ({len(data.train)} train / {len(data.test)} test images, "
        f"imgsz {cfg.imgsz}, batch {cfg.batch_size}), {cfg.optimizer}{' + SOS' if cfg.sos else ''} → {folder}"
    )


def _train_epoch(loop: _Loop, epoch: int) -> tuple[float, float]:
    """One epoch of optimiser steps at the schedule's lr (with Mixup when on); returns the mean training loss and
    the accuracy of each step's first forward, over the epoch's samples."""
    from ultralytics.utils import LOGGER, TQDM

    cfg, model, opt, device = loop.cfg, loop.model, loop.opt, loop.device
    for g in loop.base.param_groups:
        g["lr"] = cfg.lr * _lr_factor(cfg, epoch)
    model.train()
    seen = loss_sum = correct = 0.0
    LOGGER.info(f"{'Epoch':>10}{'loss':>10}{'acc':>10}{'imgsz':>10}")
    pbar = TQDM(loop.loader, total=len(loop.loader))
    for x, y in pbar:
        x, y = x.to(device), y.to(device)
        lam, perm = 1.0, None
        if loop.mix is not None:
            lam = float(loop.mix.sample())
            perm = torch.randperm(len(y), device=device)
            x = lam * x + (1 - lam) * x[perm]
        first: list[torch.Tensor] = []  # the step's first forward: its outputs give the logged accuracy

        def closure(x=x, y=y, lam=lam, perm=perm, first=first):
            opt.zero_grad()
            with loop.autocast:
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
    return loss_sum / seen, correct / seen


def _diverged(loop: _Loop, epoch: int, loss: float, rows: list[dict[str, float]], created: bool) -> NoReturn:
    """Refuse a diverged run in one line; a folder this run created holding no finished epoch is removed."""
    folder = loop.folder
    if created and not rows:
        shutil.rmtree(folder, ignore_errors=True)
    kept = f"; {folder / CHECKPOINT} holds epoch {len(rows)}" if rows else ""
    raise ValueError(f"--lr {loop.cfg.lr}: training diverged in epoch {epoch + 1} (loss {loss}); lower it{kept}")


def _shift(loop: _Loop, epoch: int) -> ShiftReport | None:
    """Algorithm 1's shift (sos_step) when SOS is on and this epoch is on its schedule (from sos_start, every
    sos_every), logged to sos_log.jsonl; None when no shift is due."""
    cfg = loop.cfg
    if not (cfg.sos and epoch >= cfg.sos_start and (epoch - cfg.sos_start) % cfg.sos_every == 0):
        return None
    report = sos_step(loop.model, loop.data.plain_train, cfg, loop.device, cfg.seed * 1000 + epoch, optimizer=loop.base)
    with open(loop.folder / "sos_log.jsonl", "a") as f:
        f.write(json.dumps({"epoch": epoch + 1, **report.to_dict()}) + "\n")
    return report


def _epoch_row(
    loop: _Loop, epoch: int, loss: float, acc: float, report: ShiftReport | None, start: float
) -> dict[str, float]:
    """The epoch's test evaluation, logged, and its log row (training figures, test figures, last-layer norm, the
    shift's outcome, seconds since the run started)."""
    from ultralytics.utils import LOGGER

    test = evaluate(loop.model, loop.data.test, loop.device, eval_batch(loop.cfg))
    shift = f"  SOS ‖V'‖/‖V‖ {report.norm_ratio:.4f}" if report else ""
    LOGGER.info(f"{'test':>10}{test['loss']:>10.4g}  top-1 {test['top1']:.4f}  top-5 {test['top5']:.4f}{shift}")
    return {
        "epoch": epoch + 1,
        "lr": loop.base.param_groups[0]["lr"],
        "train_loss": loss,
        "train_acc": acc,
        "test_loss": test["loss"],
        "test_top1": test["top1"],
        "test_top5": test["top5"],
        "last_norm": float(final_linear(loop.model)[1].weight.detach().norm()),
        "sos_applied": float(bool(report and report.applied)),
        "sos_norm_ratio": report.norm_ratio if report else 1.0,
        "sos_loss_before": report.loss_before if report else math.nan,
        "sos_loss_after": report.loss_after if report else math.nan,
        "seconds": time.time() - start,
    }


def _save_checkpoint(loop: _Loop, rows: list[dict[str, float]]) -> None:
    """folder/last.pt, written atomically: model, optimiser, random states, log rows and settings."""
    state = {
        "model": loop.model.state_dict(),
        "optimizer": loop.base.state_dict(),
        "rng": _rng_states(loop.loader, loop.opt, loop.device),
        "rows": rows,
        "config": asdict(loop.cfg),
    }
    save_atomic(state, loop.folder / CHECKPOINT)


def _finish(loop: _Loop, rows: list[dict[str, float]]) -> dict[str, Any]:
    """The finished run: log.csv, model.pt (model and settings), last.pt removed, the final figures logged."""
    from ultralytics.utils import LOGGER

    folder = loop.folder
    write_csv(folder / "log.csv", rows)
    save_atomic({"model": loop.model.state_dict(), "config": asdict(loop.cfg)}, folder / FINISHED)
    (folder / CHECKPOINT).unlink(missing_ok=True)
    final = rows[-1]
    LOGGER.info(
        f"Final ({folder / FINISHED}): test top-1 {final['test_top1']:.4f}  top-5 {final['test_top5']:.4f}  "
        f"loss {final['test_loss']:.4f}  last-layer norm {final['last_norm']:.4f}, {final['seconds']:.0f} s"
    )
    return {"final": final, "rows": rows, "save_dir": folder}


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
