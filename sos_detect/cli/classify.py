"""Classification commands: classify train, classify shift (SGD / SAM / NSO with and without SOS).

Options left out are None here: TrainConfig's defaults (or, with --resume, the run's own settings) apply.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from sos_detect.cli.arguments import add_options, command, resolve_device, torch_device
from sos_detect.core.options import SOS_OPTIONS

# the shift rows of the option table as classification takes them: unset means TrainConfig's default (paper mode)
ROWS = {o.key: o for o in SOS_OPTIONS}
CLASSIFY_SHIFT_OPTIONS = (
    replace(
        ROWS["sos_mode"],
        default=None,
        optional=True,
        help="paper (default here): τ = 0 on --sos-batch samples; guarded: min ‖V'‖ with output change ≤ τ",
    ),
    replace(ROWS["sos_tau"], default=None, optional=True),
    replace(  # classification's b is a number of samples (one row each for the final linear layer)
        ROWS["sos_rows"],
        key="sos_batch",
        default=None,
        help="b, samples per paper-mode shift, below the last layer's width (default 32 for digits, 64 for "
        "fashion-mnist, else 300)",
    ),
    replace(
        ROWS["sos_images"],
        key="sos_samples",
        default=None,
        optional=True,
        help="guarded mode: samples captured per shift (default 2048)",
    ),
)

# Defaults per dataset where TrainConfig's (the paper's CIFAR setting: resnet18, lr 0.1, 200 epochs) do not suit it.
# digits (8×8, 1,437 training images): the 64-64 MLP reaches 97.6 % top-1 in 30 epochs (4 s on one core), where
# resnet18's CIFAR stem at lr 0.1 showed test loss 3.5e6 and top-1 0.10 after its first epoch. Fashion-MNIST: the
# mini preset's small CNN, batch and learning rate (89.2 % top-1 after 30 epochs, README). Paper-mode SOS needs
# b below the last layer's width to change anything: b = half of it (64 → 32, 128 → 64), as 300 of 512 in the paper.
DATA_DEFAULTS = {
    "digits": {"model": "mlp", "epochs": 30, "sos_batch": 32},
    "fashion-mnist": {"model": "smallcnn", "epochs": 30, "batch_size": 128, "lr": 0.05, "sos_batch": 64},
}


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("classify", help="classification companion: SGD/SAM/NSO with and without SOS")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    ct = command(
        csub,
        "train",
        cmd_classify_train,
        help="train a classifier (Algorithm 1 with --sos)",
        description="Runs go to PROJECT/NAME (runs/classify/train, then train-2, train-3, …); a finished run "
        "(model.pt) is never overwritten. Every epoch shows a progress bar (loss, accuracy) and a test line. "
        "An interrupted run keeps last.pt: --resume continues the latest unfinished run of --project/--name with "
        "its own settings (bit-identical to an uninterrupted run); --resume RUN continues that folder.",
    )
    cs = command(
        csub, "shift", cmd_classify_shift, help="post-hoc shift of a trained classifier: top-1/top-5 before and after"
    )
    for p in (ct, cs):
        p.set_defaults(cli_sos_mode="paper")  # TrainConfig's --sos-mode
        _common_flags(p)
    _train_flags(ct)


def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="resnet18, resnet50, vgg16_bn, densenet201 (CIFAR stems), resnet50_imagenet, shufflenet_v2_x1_0, "
        "shufflenet_v2_x2_0 (the paper's Table 2 ShuffleNet), resnext50_32x4d, smallcnn, mlp (default: mlp for digits, "
        "smallcnn for fashion-mnist, else resnet18)",
    )
    p.add_argument("--data", help="cifar100 (default), cifar10, imagefolder, fashion-mnist, digits")
    p.add_argument(
        "--root",
        help="dataset root (the folder holding cifar-10-batches-py/ or cifar-100-python/; ImageFolder with "
        "train/ and val/; Fashion-MNIST IDX folder, default /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument(
        "--imgsz",
        type=int,
        help="image side; default 224 for the ImageNet models, else the images' own size (digits 8, "
        "Fashion-MNIST 28, CIFAR 32, an ImageFolder's first image) up to 64. ImageFolder at ≤ 64: resize, "
        "padded random crop + flip; above: RandomResizedCrop + flip, evaluation Resize(imgsz/0.875) + CenterCrop",
    )
    p.add_argument(
        "--batch",
        type=int,
        help="batch size (default 128 for fashion-mnist, else 64); evaluation and SOS capture use twice it",
    )
    p.add_argument("--weights", help="local weights file (state dict); never downloaded")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    add_options(p, CLASSIFY_SHIFT_OPTIONS)
    p.add_argument("--train-subset", type=int, help="use this many training samples")
    p.add_argument("--test-subset", type=int, help="use this many test samples")


def _train_flags(ct: argparse.ArgumentParser) -> None:
    ct.add_argument("--optimizer", help="sgd (default; Nesterov 0.9), sam, nso")
    ct.add_argument(
        "--sos",
        action=argparse.BooleanOptionalAction,
        help="shift during training; off by default here (Algorithm 1 is opt-in), on by default in sos-detect train",
    )
    add_options(ct, (replace(ROWS["sos_every"], default=None, optional=True),))
    ct.add_argument("--epochs", type=int, help="epochs (default 30 for digits and fashion-mnist, else 200)")
    ct.add_argument("--lr", type=float, help="learning rate (default 0.05 for fashion-mnist, else 0.1)")
    ct.add_argument("--weight-decay", type=float, help="weight decay (default 5e-4)")
    ct.add_argument("--schedule", help="step (default; ÷10 at 50 %% and 75 %%) or cosine")
    ct.add_argument("--rho", type=float, help="SAM radius (default 0.05)")
    ct.add_argument("--adaptive", action="store_true", default=None, help="ASAM")
    ct.add_argument("--sigma", type=float, help="NSO noise standard deviation (default 0.01)")
    ct.add_argument("--nso-perturbations", type=int, help="NSO: perturbation pairs ±U per step (default 1)")
    ct.add_argument("--mixup", type=float, help="Mixup Beta(α, α); 0 = off (default)")
    ct.add_argument("--amp", action="store_true", default=None, help="bf16 autocast on CUDA")
    ct.add_argument("--workers", type=int, help="data loader worker processes (default 0)")
    ct.add_argument("--project", help="output root (default runs/classify)")
    ct.add_argument("--name", help="run name (default train; auto-incremented: train-2, train-3, …)")
    ct.add_argument(
        "--exist-ok",
        action="store_true",
        default=None,
        help="write into PROJECT/NAME as it is instead of a new folder (starts over an unfinished run there; "
        "a finished one is refused)",
    )
    ct.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN",
        help="continue the latest unfinished run of --project/--name (or the run folder / last.pt given) with its "
        "saved settings; options given here must match them, except --device and --workers",
    )


def _config(a: argparse.Namespace):
    """The TrainConfig the options describe: given options over TrainConfig's defaults, or over the resumed run's."""
    from sos_detect.classify.config import TrainConfig
    from sos_detect.classify.runs import resume_config

    given = {
        ("batch_size" if k == "batch" else k): v
        for k, v in vars(a).items()
        if not k.startswith("cli_") and k not in ("command", "action", "resume") and v is not None
    }
    given["device"] = torch_device(resolve_device(a))
    if getattr(a, "resume", None):
        return resume_config(
            a.resume, given.get("project", TrainConfig.project), given.get("name", TrainConfig.name), given
        )
    defaults = DATA_DEFAULTS.get(given.get("data", TrainConfig.data), {})
    if "epochs" not in vars(a):  # classify shift trains nothing
        defaults = {k: v for k, v in defaults.items() if k not in ("epochs", "lr")}
    return TrainConfig(**{**defaults, **given})


def cmd_classify_train(a: argparse.Namespace) -> int:
    from sos_detect.classify.train import train

    train(_config(a))
    return 0


def cmd_classify_shift(a: argparse.Namespace) -> int:
    from sos_detect.classify.config import config_data
    from sos_detect.classify.models import build_model
    from sos_detect.classify.train import shift_classifier
    from sos_detect.reproduce.paper import posthoc_lines

    cfg = _config(a)
    if cfg.weights is None:
        raise ValueError("classify shift needs --weights")
    cfg.check()
    data = config_data(cfg)
    model = build_model(cfg.model, data.num_classes, data.in_ch, cfg.weights)
    res = shift_classifier(model, data, cfg)
    print(res["report"].format())
    for key in ("before", "after"):
        print(f"{key}: top-1 {res[key]['top1']:.4f}  top-5 {res[key]['top5']:.4f}  loss {res[key]['loss']:.4f}")
    delta = 100 * (res["after"]["top1"] - res["before"]["top1"])
    print(f"ours: top-1 {100 * res['before']['top1']:.2f} → {100 * res['after']['top1']:.2f} % ({delta:+.2f})")
    for line in posthoc_lines(cfg.model, cfg.data, data.num_classes):
        print(line)
    return 0
