"""Layer adapters: nn.Linear and 1×1 nn.Conv2d as Z = AV, feature capture, in-place shifts, rollback.

A Linear layer y = Wx + b has rows A = inputs (one per sample or token) and V = Wᵀ. A 1×1 convolution
is the same map at every spatial position: rows are (sample, y, x) positions, V = W[:, :, 0, 0]ᵀ.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sos_detect.shift import GramAccumulator, ShiftInfo, output_change, solve_shift

LOGGER = logging.getLogger("sos_detect")
FIRST_MOMENTS = ("momentum_buffer", "exp_avg")
MODES = ("guarded", "paper")


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
    """The rows A (r, m) that `layer` multiplies by V, from its input x."""
    if isinstance(layer, nn.Conv2d):
        sy, sx = layer.stride
        x = x[:, :, ::sy, ::sx]
        return x.permute(0, 2, 3, 1).reshape(-1, layer.in_channels)
    return x.reshape(-1, layer.in_features)


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
    all rows seen (the paper's stochastic mode). Train/eval modes are restored afterwards.
    """
    named = resolve_layers(model, layers)
    if rows is not None and (not isinstance(rows, int) or rows <= 0):
        raise ValueError(f"rows must be a positive integer, got {rows!r}")
    forward = forward or (lambda mdl, batch: mdl(batch))
    accs = {n: GramAccumulator(_in_width(m)) for n, m in named.items()}
    samplers = {n: _RowSampler(rows, seed + i) for i, n in enumerate(named)} if rows else {}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, _output: Any) -> None:
            a = layer_rows(module, inputs[0].detach())
            if rows:
                if not torch.isfinite(a).all():
                    raise ValueError(f"{name}: captured features contain NaN or Inf")
                samplers[name].add(a)
            else:
                accs[name].update(a)

        return hook

    modes = {mod: mod.training for mod in model.modules()}
    handles = [m.register_forward_hook(make_hook(n)) for n, m in named.items()]
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        for mod, training in modes.items():
            mod.training = training
    for name, sampler in samplers.items():
        if sampler.rows is not None:
            accs[name].update(sampler.rows)
    return accs


def _in_width(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def apply_shift(
    layer: nn.Module, V_new: Tensor, *, optimizer: torch.optim.Optimizer | None = None, info: ShiftInfo | None = None
) -> None:
    """Write V' into the layer's weight in place; map its first-moment optimiser state by the same M.

    SGD `momentum_buffer` and Adam/AdamW `exp_avg` become M·buffer (in the V layout); second moments
    are left alone.
    """
    check_layer(layer)
    w = layer.weight
    if tuple(V_new.shape) != tuple(as_v(w).shape):
        raise ValueError(f"V_new has shape {tuple(V_new.shape)}, expected {tuple(as_v(w).shape)} for this layer")
    if optimizer is not None and info is None:
        raise ValueError("apply_shift needs `info` (the shift's linear map) to update optimiser state")
    write_v(w, V_new.to(w.dtype))
    if optimizer is not None:
        state = optimizer.state.get(w, {})
        for key in FIRST_MOMENTS:
            buf = state.get(key)
            if isinstance(buf, Tensor) and buf.shape == w.shape:
                write_v(buf, info.apply(as_v(buf)))


@dataclass
class LayerReport:
    name: str
    in_width: int
    out_width: int
    rows: int
    rank: int
    norm_before: float
    norm_after: float
    out_change_predicted: float
    out_change_measured: float
    mu: float


@dataclass
class ShiftReport:
    """Per-layer figures of one shift and whether it was kept."""

    mode: str
    tau: float
    layers: list[LayerReport] = field(default_factory=list)
    loss_before: float | None = None
    loss_after: float | None = None
    applied: bool = False
    reason: str = ""
    seconds: float = 0.0

    @property
    def norm_ratio(self) -> float:
        """‖V'‖/‖V‖ over all shifted layers together."""
        before = math.sqrt(sum(r.norm_before**2 for r in self.layers))
        after = math.sqrt(sum(r.norm_after**2 for r in self.layers))
        return after / before if before > 0 else 1.0

    @property
    def max_out_change(self) -> float:
        return max((r.out_change_measured for r in self.layers), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["norm_ratio"] = self.norm_ratio
        for layer in d["layers"]:
            layer["out_change"] = layer["out_change_measured"]
        return d

    def format(self) -> str:
        """A fixed-width table, one line per layer, then the totals."""
        lines = [
            f"{'layer':<28} {'m':>5} {'n':>4} {'rows':>8} {'rank':>5} {'‖V‖':>9} {'‖V′‖':>9} "
            f"{'Δout pred':>10} {'Δout meas':>10}"
        ]
        for r in self.layers:
            lines.append(
                f"{r.name:<28} {r.in_width:>5} {r.out_width:>4} {r.rows:>8} {r.rank:>5} "
                f"{r.norm_before:>9.4f} {r.norm_after:>9.4f} {r.out_change_predicted:>10.2e} "
                f"{r.out_change_measured:>10.2e}"
            )
        status = "applied" if self.applied else f"rolled back ({self.reason})"
        loss = ""
        if self.loss_before is not None:
            loss = f", loss {self.loss_before:.6g} -> {self.loss_after:.6g}"
        lines.append(
            f"mode={self.mode} tau={self.tau:g}: norm ratio {self.norm_ratio:.4f}{loss}, {status}, {self.seconds:.2f}s"
        )
        return "\n".join(lines)


def _snapshot(named: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer | None) -> list[tuple[Tensor, Tensor]]:
    """(tensor, copy) pairs of every tensor a shift may touch."""
    saved = []
    for layer in named.values():
        w = layer.weight
        saved.append((w, w.detach().clone()))
        if optimizer is not None:
            for key in FIRST_MOMENTS:
                buf = optimizer.state.get(w, {}).get(key)
                if isinstance(buf, Tensor):
                    saved.append((buf, buf.detach().clone()))
    return saved


def restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    """Put back bit-exact copies taken by a snapshot."""
    with torch.no_grad():
        for t, copy in saved:
            t.copy_(copy)


def _solve_layers(
    named: Mapping[str, nn.Module], grams: Mapping[str, GramAccumulator], tau: float, rtol: float | None = None
) -> dict[str, tuple[Tensor, ShiftInfo]]:
    """Solve every layer's shift before anything is written (all or nothing)."""
    solved = {}
    for name, layer in named.items():
        acc = grams[name]
        if acc.rows == 0:
            raise ValueError(f"{name}: no input rows were captured (is the layer used by the forward pass?)")
        try:
            solved[name] = solve_shift(acc.gram, as_v(layer.weight.detach()), tau=tau, rtol=rtol)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
    return solved


def _apply_solved(
    named: Mapping[str, nn.Module],
    grams: Mapping[str, GramAccumulator],
    solved: Mapping[str, tuple[Tensor, ShiftInfo]],
    report: ShiftReport,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[nn.Module], float] | None = None,
    model: nn.Module | None = None,
    loss_tol: float | None = None,
) -> ShiftReport:
    """Write the solved shifts, measure them, and roll every touched tensor back if a check fails.

    Checks: measured output change within the solver's prediction (or τ) and, with `loss_fn` and
    `loss_tol`, (loss_after − loss_before)/|loss_before| ≤ loss_tol.
    """
    saved = _snapshot(named, optimizer)
    try:
        for name, layer in named.items():
            v_old = as_v(layer.weight.detach()).clone()
            v_new, info = solved[name]
            apply_shift(layer, v_new, optimizer=optimizer, info=info)
            measured = output_change(grams[name].gram, v_old, as_v(layer.weight.detach()))
            report.layers.append(
                LayerReport(
                    name=name,
                    in_width=v_old.shape[0],
                    out_width=v_old.shape[1],
                    rows=grams[name].rows,
                    rank=info.rank,
                    norm_before=info.norm_before,
                    norm_after=info.norm_after,
                    out_change_predicted=info.out_change,
                    out_change_measured=measured,
                    mu=info.mu,
                )
            )
        report.reason = _check(report, loss_fn, model, loss_tol)
    except BaseException:
        restore(saved)
        raise
    report.applied = not report.reason
    if not report.applied:
        restore(saved)
        LOGGER.warning("SOS shift rolled back: %s", report.reason)
    return report


def _check(report: ShiftReport, loss_fn, model, loss_tol) -> str:
    """Empty string when the shift passes its checks, else the reason it fails."""
    eps = 10 * torch.finfo(torch.float32).eps
    for r in report.layers:
        bound = max(r.out_change_predicted, report.tau) * (1 + 1e-3) + eps
        if not math.isfinite(r.out_change_measured) or r.out_change_measured > bound:
            return f"{r.name}: measured output change {r.out_change_measured:.3e} exceeds {bound:.3e}"
    if loss_fn is not None:
        with torch.no_grad():
            report.loss_after = float(loss_fn(model))
        if not math.isfinite(report.loss_after):
            return "loss after the shift is not finite"
        if loss_tol is not None and report.loss_before is not None:
            rel = (report.loss_after - report.loss_before) / max(abs(report.loss_before), 1e-12)
            if rel > loss_tol:
                return f"relative loss increase {rel:.3e} > loss_tol {loss_tol:g}"
    return ""


def check_shift_options(
    mode: str, tau: float, rows: int | None, loss_tol: float | None = None, *, prefix: str = ""
) -> None:
    """Validate the user-facing SOS options; messages name each option as `prefix + name`
    (prefix "sos_" for trainer args, "--sos-" for command-line flags)."""

    def name(key: str) -> str:
        return prefix + (key.replace("_", "-") if prefix.startswith("--") else key)

    if mode not in MODES:
        raise ValueError(f"{name('mode')} must be one of {MODES}, got {mode!r}")
    if not (isinstance(tau, (int, float)) and 0 <= tau < 1):  # τ ≥ 1 makes V' = 0 feasible
        raise ValueError(f"{name('tau')} must be a number in [0, 1), got {tau!r}")
    if mode == "paper" and rows is None:
        raise ValueError(f"{name('mode')}='paper' needs {name('rows')} (the number b of sampled rows, b < layer width)")
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows <= 0):
        raise ValueError(f"{name('rows')} must be a positive integer, got {rows!r}")
    if loss_tol is not None and not (math.isfinite(loss_tol) and loss_tol >= 0):
        raise ValueError(f"{name('loss_tol')} must be a finite number >= 0, got {loss_tol!r}")


def shift_model(
    model: nn.Module,
    layers: Sequence[nn.Module] | Mapping[str, nn.Module],
    batches: Iterable[Any],
    *,
    mode: str = "guarded",
    tau: float = 1e-4,
    rows: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[nn.Module], float] | None = None,
    loss_tol: float | None = None,
    seed: int = 0,
    sync: Callable[[dict[str, GramAccumulator]], None] | None = None,
) -> ShiftReport:
    """Capture features, solve and apply an optimum shift of `layers`, with rollback on failed checks.

    mode="guarded": min ‖V'‖ s.t. ‖A(V'−V)‖ ≤ τ‖AV‖ over all captured rows.
    mode="paper": τ = 0 on `rows` uniformly sampled rows (the paper's SOS; choose rows < width).
    `sync`, if given, combines the captured Grams in place before solving (e.g. an all-reduce).
    """
    check_shift_options(mode, tau, rows, loss_tol)
    start = time.perf_counter()
    named = resolve_layers(model, layers)
    tau = 0.0 if mode == "paper" else float(tau)
    report = ShiftReport(mode=mode, tau=tau)
    if loss_fn is not None:
        with torch.no_grad():
            report.loss_before = float(loss_fn(model))
    grams = capture_grams(model, named, batches, rows=rows, forward=forward, seed=seed)
    if sync is not None:
        sync(grams)
    solved = _solve_layers(named, grams, tau)
    _apply_solved(named, grams, solved, report, optimizer=optimizer, loss_fn=loss_fn, model=model, loss_tol=loss_tol)
    report.seconds = time.perf_counter() - start
    return report
