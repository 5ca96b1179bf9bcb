"""Capture: linear layers as Z = AV, and forward hooks summing each layer's input Gram G = AᵀA.

A Linear layer y = Wx + b has rows A = inputs (one per sample or token) and V = Wᵀ. A 1×1 convolution is the same
map at every spatial position: rows are (sample, y, x) positions, V = W[:, :, 0, 0]ᵀ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sos_detect.core.solver import GramAccumulator


def check_layer(layer: nn.Module, name: str = "layer") -> None:
    """Raise TypeError unless `layer` is an nn.Linear or a 1×1, groups-1 nn.Conv2d."""
    if isinstance(layer, nn.Linear):
        return
    if isinstance(layer, nn.Conv2d):
        if tuple(layer.kernel_size) != (1, 1):
            raise TypeError(
                f"{name}: Conv2d with kernel {tuple(layer.kernel_size)} is not a linear map over "
                "positions; only 1×1 convolutions can be shifted"
            )
        if layer.groups != 1:
            raise TypeError(f"{name}: grouped Conv2d (groups={layer.groups}) cannot be shifted; need groups=1")
        if layer.padding_mode != "zeros":
            raise TypeError(f"{name}: Conv2d padding_mode={layer.padding_mode!r} is not supported")
        return
    raise TypeError(
        f"{name}: {type(layer).__name__} cannot be shifted; only nn.Linear and 1×1 nn.Conv2d are "
        "linear layers over rows"
    )


def layer_rows(layer: nn.Module, x: Tensor) -> Tensor:
    """The rows A that `layer` multiplies by V, from its input x, as blocks (b, r, m): a 1×1 conv's are one block
    per image, each a transposed view of that image's (m, positions) features, so Σ_k A_kᵀA_k is one batched
    product without a copy; a Linear's are one block (1, r, m)."""
    if isinstance(layer, nn.Conv2d):
        sy, sx = layer.stride
        x = x[:, :, ::sy, ::sx]
        return x.flatten(2).mT
    return x.reshape(1, -1, layer.in_features)


def as_v(t: Tensor) -> Tensor:
    """A weight-shaped tensor (n, m[, 1, 1]) as V = (m, n), a view where possible."""
    return t.reshape(t.shape[0], -1).T


def write_v(t: Tensor, v: Tensor) -> None:
    """Write V (m, n) into the weight-shaped tensor t in place."""
    with torch.no_grad():
        t.copy_(v.T.reshape(t.shape))


def resolve_layers(model: nn.Module, layers: Sequence[nn.Module] | Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Name → module for the target layers (names from `model.named_modules()`), each checked."""
    if isinstance(layers, Mapping):
        named = dict(layers)
    else:
        names = {id(m): n for n, m in model.named_modules()}
        named = {names.get(id(m)) or f"layer{i}": m for i, m in enumerate(layers)}
    if not named:
        raise ValueError("no layers to shift")
    for name, layer in named.items():
        check_layer(layer, name)
    return named


class _RowSampler:
    """Uniform sample of k rows from a stream without replacement: keep the k smallest random keys."""

    def __init__(self, k: int, seed: int) -> None:
        self.k, self.seed = k, seed
        self.rows: Tensor | None = None
        self.keys: Tensor | None = None
        self.generator: torch.Generator | None = None

    def add(self, a: Tensor) -> None:
        if self.generator is None:
            self.generator = torch.Generator(device=a.device).manual_seed(self.seed)
        keys = torch.rand(a.shape[0], generator=self.generator, device=a.device)
        if self.rows is not None:
            a, keys = torch.cat([self.rows, a]), torch.cat([self.keys, keys])
        if a.shape[0] > self.k:
            keys, idx = torch.topk(keys, self.k, largest=False)
            a = a[idx]
        self.rows, self.keys = a.clone(), keys


class GramCapture:
    """Forward hooks adding each target layer's input rows to a float64 Gram G = AᵀA, in any forward pass.

    Training steps included: inputs are detached and accumulated in float64 outside autocast, and nothing but the
    m×m sums is held. With `rows`, a uniform sample of that many rows per layer is kept too (the paper's
    stochastic mode). A batch whose features are not finite (an fp16 overflow, say) raises, or with
    skip_nonfinite is left out and counted in `skipped`.
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        *,
        rows: int | None = None,
        seed: int = 0,
        skip_nonfinite: bool = False,
        max_images: int | None = None,
    ) -> None:
        self.layers = dict(layers)
        self.full = {n: GramAccumulator(_in_width(m)) for n, m in self.layers.items()}
        self._samplers = {n: _RowSampler(rows, seed + i) for i, n in enumerate(self.layers)} if rows else {}
        self.skip_nonfinite = skip_nonfinite
        self.max_images = max_images
        self.skipped = dict.fromkeys(self.layers, 0)
        self.seen = dict.fromkeys(self.layers, 0)  # images (samples) each layer has taken rows from
        self._handles: list[Any] = []

    @property
    def images(self) -> int:
        """Images (samples) captured: the most any layer has seen."""
        return max(self.seen.values(), default=0)

    def __enter__(self) -> GramCapture:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self) -> None:
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, _output: Any) -> None:
            x = inputs[0].detach()
            if self.max_images is not None and self.seen[name] >= self.max_images:
                return
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                a = layer_rows(module, x)
                try:
                    self.full[name].update(a)
                except ValueError:
                    if not self.skip_nonfinite:
                        raise ValueError(f"{name}: captured features contain NaN or Inf") from None
                    self.skipped[name] += 1
                    return
                if self._samplers:
                    self._samplers[name].add(a.reshape(-1, a.shape[-1]))
            self.seen[name] += x.shape[0]

        return hook

    def grams(self) -> dict[str, GramAccumulator]:
        """The Grams to solve on: of the sampled rows (paper mode) or of all rows (guarded mode)."""
        if not self._samplers:
            return self.full
        out = {}
        for name, sampler in self._samplers.items():
            out[name] = GramAccumulator(self.full[name].m)
            if sampler.rows is not None:
                out[name].update(sampler.rows)
        return out


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for a block; every submodule's train/eval mode is restored after, also on error."""
    modes = {mod: mod.training for mod in model.modules()}
    try:
        yield model.eval()
    finally:
        for mod, training in modes.items():
            mod.training = training


def eval_capture(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Any],
    *,
    rows: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    seed: int = 0,
) -> GramCapture:
    """A GramCapture over one pass of `batches` in eval mode under no_grad; train/eval modes are restored."""
    if rows is not None and (not isinstance(rows, int) or rows <= 0):
        raise ValueError(f"rows must be a positive integer, got {rows!r}")
    forward = forward or (lambda mdl, batch: mdl(batch))
    capture = GramCapture(layers, rows=rows, seed=seed)
    with eval_mode(model), torch.no_grad(), capture:
        for batch in batches:
            forward(model, batch)
    return capture


def capture_grams(
    model: nn.Module,
    layers: Sequence[nn.Module] | Mapping[str, nn.Module],
    batches: Iterable[Any],
    *,
    rows: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    seed: int = 0,
) -> dict[str, GramAccumulator]:
    """G = AᵀA of each layer's input rows over `batches`, captured in eval mode under no_grad.

    With `rows`, G is built from `rows` rows per layer drawn uniformly without replacement from
    all rows seen (the paper's stochastic mode).
    """
    named = resolve_layers(model, layers)
    return eval_capture(model, named, batches, rows=rows, forward=forward, seed=seed).grams()


def _in_width(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
