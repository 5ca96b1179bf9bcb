"""Classification commands: classify train, classify shift (SGD / SAM / NSO with and without SOS)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sos_detect.cli.options import command, resolve_device, torch_device


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("classify", help="classification companion: SGD/SAM/NSO with and without SOS")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    ct = command(csub, "train", cmd_classify_train, help="train a classifier (Algorithm 1 with --sos)")
    cs = command(
        csub, "shift", cmd_classify_shift, help="post-hoc shift of a trained classifier: top-1/top-5 before and after"
    )
    for p in (ct, cs):
        _common_flags(p)
    _train_flags(ct)


def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="resnet18",
        help="resnet18, resnet50, vgg16_bn, densenet201 (CIFAR "
        "stems), resnet50_imagenet, shufflenet_v2_x1_0, resnext50_32x4d, smallcnn, mlp",
    )
    p.add_argument("--data", default="cifar100", help="cifar10, cifar100, imagefolder, fashion-mnist, digits")
    p.add_argument(
        "--root",
        default=None,
        help="dataset root (CIFAR python layout; ImageFolder with train/ "
        "and val/; Fashion-MNIST IDX folder, default /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("--weights", default=None, help="local weights file (state dict); never downloaded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--sos-mode", default="paper", help="paper: τ = 0 on --sos-batch samples; guarded: budget τ")
    p.add_argument("--sos-batch", type=int, default=300, help="b, samples per paper-mode shift (default 300)")
    p.add_argument("--sos-tau", type=float, default=1e-4, help="guarded mode's output-change budget")
    p.add_argument("--sos-samples", type=int, default=2048, help="guarded mode: samples captured per shift")
    p.add_argument("--train-subset", type=int, default=None, help="use this many training samples")
    p.add_argument("--test-subset", type=int, default=None, help="use this many test samples")


def _train_flags(ct: argparse.ArgumentParser) -> None:
    ct.add_argument("--optimizer", default="sgd", help="sgd (Nesterov 0.9), sam, nso")
    ct.add_argument(
        "--sos",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="shift during training; off by default here (Algorithm 1 is opt-in), on by default in sos-detect train",
    )
    ct.add_argument("--sos-every", type=int, default=1, help="shift every N epochs (default 1)")
    ct.add_argument("--epochs", type=int, default=200)
    ct.add_argument("--batch", type=int, default=128)
    ct.add_argument("--lr", type=float, default=0.1)
    ct.add_argument("--weight-decay", type=float, default=5e-4)
    ct.add_argument("--schedule", default="step", help="step (÷10 at 50 %% and 75 %%) or cosine")
    ct.add_argument("--rho", type=float, default=0.05, help="SAM radius")
    ct.add_argument("--adaptive", action="store_true", help="ASAM")
    ct.add_argument("--sigma", type=float, default=0.01, help="NSO noise standard deviation")
    ct.add_argument("--nso-perturbations", type=int, default=1, help="NSO: perturbation pairs ±U per step")
    ct.add_argument("--mixup", type=float, default=0.0, help="Mixup Beta(α, α); 0 = off")
    ct.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    ct.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue an interrupted run in --out from its last.pt (default on; its settings must match)",
    )
    ct.add_argument("--out", default="runs/classify/train", help="output folder")


def _common(a: argparse.Namespace) -> dict[str, Any]:
    keys = ("model", "data", "root", "weights", "seed", "sos_mode", "sos_batch", "sos_tau", "sos_samples")
    return dict(
        **{k: getattr(a, k) for k in keys},
        device=torch_device(resolve_device(a)),
        train_subset=a.train_subset,
        test_subset=a.test_subset,
    )


def cmd_classify_train(a: argparse.Namespace) -> int:
    from sos_detect.classify.train import TrainConfig, train

    keys = ("optimizer", "sos", "sos_every", "epochs", "lr", "weight_decay", "schedule", "rho", "adaptive", "sigma")
    keys += ("nso_perturbations", "mixup", "amp", "resume", "out")
    cfg = TrainConfig(**_common(a), **{k: getattr(a, k) for k in keys}, batch_size=a.batch)
    final = train(cfg)["final"]
    print(
        f"epoch {final['epoch']}: test top-1 {final['test_top1']:.4f}  top-5 {final['test_top5']:.4f}  "
        f"last-layer norm {final['last_norm']:.4f}  (log: {Path(a.out) / 'log.csv'})"
    )
    return 0


def cmd_classify_shift(a: argparse.Namespace) -> int:
    from sos_detect.classify.data import load_classification_data
    from sos_detect.classify.models import build_model
    from sos_detect.classify.train import TrainConfig, shift_classifier

    if a.weights is None:
        raise ValueError("classify shift needs --weights")
    cfg = TrainConfig(**_common(a))
    cfg.check()
    data = load_classification_data(a.data, a.root, train_subset=a.train_subset, test_subset=a.test_subset)
    model = build_model(a.model, data.num_classes, data.in_ch, a.weights)
    res = shift_classifier(model, data, cfg)
    print(res["report"].format())
    for key in ("before", "after"):
        print(f"{key}: top-1 {res[key]['top1']:.4f}  top-5 {res[key]['top5']:.4f}  loss {res[key]['loss']:.4f}")
    return 0
