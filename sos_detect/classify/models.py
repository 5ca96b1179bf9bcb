"""Classification models: CIFAR-stem ResNet/VGG/DenseNet, torchvision ImageNet models from a local file,
and small networks for Fashion-MNIST and digits. `final_linear` finds the layer SOS shifts."""

from __future__ import annotations

from pathlib import Path

import torchvision
from torch import nn

CIFAR_MODELS = ("resnet18", "resnet50", "vgg16_bn", "densenet201")
IMAGENET_MODELS = ("resnet50_imagenet", "shufflenet_v2_x1_0", "shufflenet_v2_x2_0", "resnext50_32x4d")
SMALL_MODELS = ("smallcnn", "mlp")
MODELS = CIFAR_MODELS + IMAGENET_MODELS + SMALL_MODELS


def _cifar_resnet(arch: str, num_classes: int, in_ch: int) -> nn.Module:
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)  # 32×32 stem: 3×3 stride 1, no max-pool
    model.maxpool = nn.Identity()
    return model


def _cifar_vgg(num_classes: int, in_ch: int) -> nn.Module:
    model = torchvision.models.vgg16_bn(num_classes=num_classes)
    if in_ch != 3:
        model.features[0] = nn.Conv2d(in_ch, 64, 3, padding=1)
    model.avgpool = nn.AdaptiveAvgPool2d(1)  # 32×32 input leaves 1×1×512 after five pools
    model.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(512, num_classes))
    return model


def _cifar_densenet(num_classes: int, in_ch: int) -> nn.Module:
    model = torchvision.models.densenet201(num_classes=num_classes)
    model.features.conv0 = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
    model.features.pool0 = nn.Identity()
    return model


def small_cnn(num_classes: int = 10, in_ch: int = 1, width: int = 32) -> nn.Sequential:
    """conv-bn-relu ×2 with pooling, then a 128-wide hidden layer and the final Linear (28×28 or 32×32 input)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )  # fmt: skip


def build_model(name: str, num_classes: int, in_ch: int = 3, weights: str | Path | None = None) -> nn.Module:
    """A model by name; ImageNet models load `weights` from a local file (never downloaded)."""
    if name in ("resnet18", "resnet50"):
        model = _cifar_resnet(name, num_classes, in_ch)
    elif name == "vgg16_bn":
        model = _cifar_vgg(num_classes, in_ch)
    elif name == "densenet201":
        model = _cifar_densenet(num_classes, in_ch)
    elif name in IMAGENET_MODELS:
        arch = "resnet50" if name == "resnet50_imagenet" else name
        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    elif name == "smallcnn":
        model = small_cnn(num_classes, in_ch)
    elif name == "mlp":
        from sos_detect.classify.digits import digits_mlp

        model = digits_mlp()
    else:
        raise ValueError(f"--model must be one of {MODELS}, got {name!r}")
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict (or a {'model': state_dict} / {'state_dict': …} checkpoint) from a local file, through the
    one checkpoint loader (safe unpickling, finite tensors, one-line errors naming the file)."""
    from sos_detect.core.checkpoints import load_state_dict

    state = load_state_dict(path)
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        k = bad[0]
        raise ValueError(
            f"{path}: {k} has shape {tuple(state[k].shape)} but the model expects {tuple(own[k].shape)} "
            "(does the class count match --data?)"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def final_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last nn.Linear of the model (fc / classifier[-1]): the layer SOS shifts."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise TypeError(f"{type(model).__name__} has no nn.Linear layer to shift")
    return last
