"""One loader for every checkpoint a command reads: it says what the file is, refuses what the command cannot
use, and refuses non-finite weights naming the first bad tensor. Errors are one line naming the file as typed.

Kinds: a checkpoint dict holding networks ('ema'/'model'; what network it is says the caller's `network_kind`, e.g.
detect/checkpoints.py's YOLO detector or classifier), a state dict (tensors only, as `classify` writes and reads), a
whole-model pickle (`torch.save(model)`), and anything else, which is not a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

DETECTOR, CLASSIFIER, STATE_DICT, PICKLE, OTHER = "detector", "classifier", "state dict", "whole-model pickle", "other"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the one-line message names the file as typed."""


@dataclass
class Checkpoint:
    name: str  # the file as typed, with its flag: "--weights runs/x.pt"
    kind: str
    content: Any  # what torch.load returned
    what: str  # the kind in words: "a YOLO detector checkpoint (DetectionModel, 1 class)"

    def networks(self) -> dict[str, nn.Module]:
        """The stored networks of a checkpoint dict ('ema' first), or the pickled module itself."""
        if isinstance(self.content, nn.Module):
            return {"model": self.content}
        return {k: self.content[k] for k in ("ema", "model") if isinstance(self.content.get(k), nn.Module)}

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.name}: {message}")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def state_dict_of(obj: Any) -> dict[str, torch.Tensor] | None:
    """The tensors of a state dict, also inside {'model': …} or {'state_dict': …}; None if there are none."""
    if isinstance(obj, dict):
        for inner in (obj.get("model"), obj.get("state_dict"), obj):
            if _is_state_dict(inner):
                return inner
    return None


NetworkKind = Callable[[nn.Module], tuple[str, str]]  # a stored network → (kind, the kind in words)


def _any_network(net: nn.Module) -> tuple[str, str]:
    return OTHER, f"a checkpoint of a {type(net).__name__} network"


def describe(content: Any, network_kind: NetworkKind = _any_network) -> tuple[str, str]:
    """(kind, the kind in words) of a loaded object; a checkpoint dict's first network says it by `network_kind`."""
    if isinstance(content, nn.Module):
        return PICKLE, f"a whole-model pickle (torch.save of a {type(content).__name__}), not a checkpoint dict"
    if isinstance(content, dict):
        nets = [content.get(k) for k in ("ema", "model") if isinstance(content.get(k), nn.Module)]
        if nets:
            return network_kind(nets[0])
        sd = state_dict_of(content)
        if sd is not None:
            return STATE_DICT, f"a state dict ({len(sd)} tensors, no network)"
        return OTHER, f"not a checkpoint (a dict with keys {sorted(map(str, content))[:4]})"
    return OTHER, f"not a checkpoint (it holds a {type(content).__name__})"


def _open(path: Path, name: str) -> None:
    if not path.exists():
        raise CheckpointError(f"{name}: file not found")
    if path.is_dir():
        raise CheckpointError(f"{name}: is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{name}: empty file, not a checkpoint")


def _unsafe_kind(path: Path, name: str) -> CheckpointError:
    """Why a file fails torch's safe loader, without running its pickle: the classes it would import."""
    try:
        names = [str(g) for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)]
    except Exception:  # noqa: BLE001 - not even a torch archive
        return CheckpointError(f"{name}: not a PyTorch checkpoint (neither a torch archive nor a pickle of tensors)")
    nets = [g for g in names if g.startswith("ultralytics.nn.tasks.")]
    if any(g.endswith("ClassificationModel") for g in nets):
        return CheckpointError(f"{name}: a YOLO classification checkpoint (ClassificationModel), not a state dict")
    if nets:
        return CheckpointError(f"{name}: a YOLO detector checkpoint ({nets[0].rsplit('.', 1)[1]}), not a state dict")
    shown = ", ".join(names[:2])
    return CheckpointError(f"{name}: a pickle of Python objects ({shown}), not a state dict")


def read_checkpoint(
    path: str | Path, flag: str = "--weights", *, safe: bool = False, network_kind: NetworkKind = _any_network
) -> Checkpoint:
    """Load `path` and say what it is (`describe`). `safe`: torch's weights-only loader (state dicts; pickled
    networks are named from the classes they reference, never unpickled); otherwise Ultralytics' loader, as `YOLO()`
    uses."""
    name = f"{flag} {path}"
    path = Path(path)
    _open(path, name)
    try:
        if safe:
            content = torch.load(path, map_location="cpu", weights_only=True)
        else:
            from ultralytics.utils.patches import torch_load

            content = torch_load(path, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        if safe:
            raise _unsafe_kind(path, name) from None
        raise CheckpointError(
            f"{name}: not a PyTorch checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    kind, what = describe(content, network_kind)
    return Checkpoint(name, kind, content, what)


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    for key, t in tensors:
        if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            return key
    return None


def check_finite(ckpt: Checkpoint) -> None:
    """Refuse a checkpoint with NaN/inf in any stored tensor, naming the network and the first bad tensor."""
    nets = ckpt.networks()
    groups = [(k, n.state_dict().items()) for k, n in nets.items()]
    if not nets and (sd := state_dict_of(ckpt.content)) is not None:
        groups = [("", sd.items())]
    for where, tensors in groups:
        bad = first_non_finite(tensors)
        if bad is not None:
            raise ckpt.error(f"non-finite weights (NaN or inf) in {where + ' ' if where else ''}tensor {bad}")


def check_optimizer_state(ckpt: Checkpoint) -> None:
    """The stored optimizer state (momentum buffers, Adam moments) is finite: resuming from NaN state gives NaN
    losses from the first step."""
    state = (ckpt.content.get("optimizer") or {}).get("state") or {}
    for index, entry in state.items():
        bad = first_non_finite((f"{k} of parameter {index}", v) for k, v in entry.items() if torch.is_tensor(v))
        if bad is not None:
            raise ckpt.error(f"non-finite optimizer state (NaN or inf): {bad}; it cannot be resumed")


def load_state_dict(path: str | Path, flag: str = "--weights") -> dict[str, torch.Tensor]:
    """The finite tensors of a state dict file ({'model': sd} and {'state_dict': sd} too), loaded safely."""
    ckpt = read_checkpoint(path, flag, safe=True)
    sd = state_dict_of(ckpt.content)
    if sd is None:
        raise ckpt.error(f"{ckpt.what}; a state dict of the --model network is needed")
    check_finite(ckpt)
    return sd
