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

from sos_detect.runtime import one_thread
from sos_detect.shift import GramAccumulator, GramSpectrum, ShiftInfo, output_change, solve_shift, spectrum

LOGGER = logging.getLogger("sos_detect")
MODES = ("guarded", "paper")
# Per optimiser (every one Ultralytics builds): its weight-shaped state tensors that are running sums of gradients
# (first moments, linear in the gradients: a shift V' = MV maps them by the same M) and those that are per-coordinate
# scales (second moments: kept as they are; no linear map carries a coordinate-wise statistic to the new basis, and
# zeroing them with the step counter kept would blow up the next steps). Scalars (step, mu_product) are untouched.
OPTIMIZER_STATE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "SGD": (("momentum_buffer",), ()),
    "MuSGD": (("momentum_buffer", "momentum_buffer_SGD"), ()),  # Muon's momentum and its SGD part's
    "Adam": (("exp_avg",), ("exp_avg_sq", "max_exp_avg_sq")),
    "AdamW": (("exp_avg",), ("exp_avg_sq", "max_exp_avg_sq")),
    "NAdam": (("exp_avg",), ("exp_avg_sq",)),
    "RAdam": (("exp_avg",), ("exp_avg_sq",)),
    "Adamax": (("exp_avg",), ("exp_inf",)),
    "RMSprop": (("momentum_buffer", "grad_avg"), ("square_avg",)),
}


def first_moments(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """The state keys a shift maps for this optimiser (OPTIMIZER_STATE); an optimiser not in the table is a
    TypeError: its state would be half-mapped."""
    name = type(optimizer).__name__
    if name not in OPTIMIZER_STATE:
        raise TypeError(
            f"optimizer {name}: SOS does not know which of its state tensors to map with a shift "
            f"(known: {', '.join(OPTIMIZER_STATE)})"
        )
    return OPTIMIZER_STATE[name][0]


def first_moment_tensors(optimizer: torch.optim.Optimizer, w: Tensor) -> dict[str, Tensor]:
    """The first-moment state tensors of weight w; a weight-shaped state the table does not name is a ValueError."""
    firsts, seconds = first_moments(optimizer), OPTIMIZER_STATE[type(optimizer).__name__][1]
    out = {}
    for key, buf in optimizer.state.get(w, {}).items():
        if not (isinstance(buf, Tensor) and buf.shape == w.shape):
            continue
        if key in firsts:
            out[key] = buf
        elif key not in seconds:
            raise ValueError(f"optimizer {type(optimizer).__name__}: unknown state '{key}' of a shifted weight")
    return out


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
    modes = {mod: mod.training for mod in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), capture:
            for batch in batches:
                forward(model, batch)
    finally:
        for mod, training in modes.items():
            mod.training = training
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


def apply_shift(
    layer: nn.Module, V_new: Tensor, *, optimizer: torch.optim.Optimizer | None = None, info: ShiftInfo | None = None
) -> None:
    """Write V' into the layer's weight in place; map its first-moment optimiser state by the same M.

    Every first moment of OPTIMIZER_STATE (SGD/MuSGD momenta, Adam-family `exp_avg`, RMSprop's momentum and
    `grad_avg`) becomes M·buffer in the V layout; second moments are left alone.
    """
    check_layer(layer)
    w = layer.weight
    if tuple(V_new.shape) != tuple(as_v(w).shape):
        raise ValueError(f"V_new has shape {tuple(V_new.shape)}, expected {tuple(as_v(w).shape)} for this layer")
    if optimizer is not None and info is None:
        raise ValueError("apply_shift needs `info` (the shift's linear map) to update optimiser state")
    write_v(w, V_new.to(w.dtype))
    if optimizer is not None:
        for buf in first_moment_tensors(optimizer, w).values():
            write_v(buf, info.apply(as_v(buf)))


@dataclass
class LayerReport:
    name: str
    in_width: int
    out_width: int
    rows: int  # rows the shift was solved on (the sampled ones in paper mode)
    rank: int
    norm_before: float
    norm_after: float
    out_change_predicted: float
    out_change_measured: float  # on the rows solved on, with the weights as written
    out_change_all: float  # on every captured row (differs from the above in paper mode only)
    out_change_unsampled: float | None  # on the captured rows not solved on (paper mode; None when all were)
    budget: float  # the bound the solver promised for out_change_measured
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
            f"{'Δout pred':>10} {'Δout meas':>10} {'Δout all':>10}"
        ]
        for r in self.layers:
            lines.append(
                f"{r.name:<28} {r.in_width:>5} {r.out_width:>4} {r.rows:>8} {r.rank:>5} "
                f"{r.norm_before:>9.4f} {r.norm_after:>9.4f} {r.out_change_predicted:>10.2e} "
                f"{r.out_change_measured:>10.2e} {r.out_change_all:>10.2e}"
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
            saved += [(buf, buf.detach().clone()) for buf in first_moment_tensors(optimizer, w).values()]
    return saved


def restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    """Put back bit-exact copies taken by a snapshot."""
    with torch.no_grad():
        for t, copy in saved:
            t.copy_(copy)


def _solve_layers(
    named: Mapping[str, nn.Module],
    grams: Mapping[str, GramAccumulator],
    tau: float,
    spectra: dict[str, GramSpectrum] | None,
) -> dict[str, tuple[Tensor, ShiftInfo]]:
    """Solve every layer's shift before anything is written (all or nothing); fills `spectra` for reuse."""
    spectra = {} if spectra is None else spectra
    solved = {}
    for name, layer in named.items():
        acc = grams[name]
        if acc.rows == 0:
            raise ValueError(f"{name}: no input rows were captured (is the layer used by the forward pass?)")
        v = as_v(layer.weight.detach())
        try:
            if name not in spectra:
                spectra[name] = spectrum(acc.gram, v.dtype)
            solved[name] = solve_shift(None, v, tau=tau, spec=spectra[name])
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
    return solved


def shift_layers(
    named: Mapping[str, nn.Module],
    grams: Mapping[str, GramAccumulator],
    *,
    mode: str = "guarded",
    tau: float = 1e-4,
    full: Mapping[str, GramAccumulator] | None = None,
    spectra: dict[str, GramSpectrum] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[nn.Module], float] | None = None,
    model: nn.Module | None = None,
    loss_tol: float | None = None,
    max_change: float | None = None,
) -> ShiftReport:
    """Solve each layer's shift from its Gram, write it in place, check it, and roll everything back on failure.

    `grams` are solved on; `full` (default: the same) holds every captured row, on which the output change is
    measured against `max_change`. `spectra` shares eigendecompositions between calls on the same rows (a
    model and its EMA). Checks: measured change ≤ the solver's budget·(1 + 1e-3); change on all rows ≤
    max_change; with `loss_fn` and `loss_tol`, (loss_after − loss_before)/|loss_before| ≤ loss_tol.
    """
    tau = 0.0 if mode == "paper" else float(tau)
    report = ShiftReport(mode=mode, tau=tau)
    with one_thread():
        solved = _solve_layers(named, grams, tau, spectra)
    full = full or grams
    if loss_fn is not None:
        with torch.no_grad():
            report.loss_before = float(loss_fn(model))
    saved = _snapshot(named, optimizer)
    try:
        with one_thread():
            _write_and_measure(named, grams, full, solved, report, optimizer)
        report.reason = _check(report, loss_fn, model, loss_tol, max_change)
    except BaseException:
        restore(saved)
        raise
    report.applied = not report.reason
    if not report.applied:
        restore(saved)
        LOGGER.warning("SOS shift rolled back: %s", report.reason)
    return report


def _write_and_measure(named, grams, full, solved, report: ShiftReport, optimizer) -> None:
    """Write every solved V' (and its optimiser state) in place and add each layer's measured figures."""
    for name, layer in named.items():
        v_old = as_v(layer.weight.detach()).clone()
        v_new, info = solved[name]
        apply_shift(layer, v_new, optimizer=optimizer, info=info)
        v_written = as_v(layer.weight.detach())
        measured = output_change(grams[name].gram, v_old, v_written)
        everywhere = measured if full is grams else output_change(full[name].gram, v_old, v_written)
        unsampled = None  # the rows left out of the solve have Gram G_all − G_solved (G is a sum over rows)
        if full is not grams and full[name].rows > grams[name].rows:
            unsampled = output_change(full[name].gram - grams[name].gram, v_old, v_written)
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
                out_change_all=everywhere,
                out_change_unsampled=unsampled,
                budget=info.budget,
                mu=info.mu,
            )
        )


def _check(report: ShiftReport, loss_fn, model, loss_tol, max_change) -> str:
    """Empty string when the shift passes its checks, else the reason it fails."""
    for r in report.layers:
        bound = r.budget * (1 + 1e-3)
        if not math.isfinite(r.out_change_measured) or r.out_change_measured > bound:
            return f"{r.name}: measured output change {r.out_change_measured:.3e} exceeds its budget {bound:.3e}"
        if max_change is not None and r.out_change_all > max_change:
            return (
                f"{r.name}: changes the outputs on the captured rows by {r.out_change_all:.3g} > max_change "
                f"{max_change:g}"
            )
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
    max_change: float | None = None,
    seed: int = 0,
    sync: Callable[[dict[str, GramAccumulator]], None] | None = None,
) -> ShiftReport:
    """Capture features in an eval pass, then solve and apply an optimum shift of `layers` (`shift_layers`).

    mode="guarded": min ‖V'‖ s.t. ‖A(V'−V)‖ ≤ τ‖AV‖ over all captured rows.
    mode="paper": τ = 0 on `rows` uniformly sampled rows (the paper's SOS; choose rows < width).
    `sync`, if given, combines the captured Grams in place before solving (e.g. an all-reduce).
    """
    check_shift_options(mode, tau, rows, loss_tol)
    start = time.perf_counter()
    named = resolve_layers(model, layers)
    capture = eval_capture(model, named, batches, rows=rows if mode == "paper" else None, forward=forward, seed=seed)
    grams = capture.grams()
    if sync is not None:
        sync(grams)
        if grams is not capture.full:
            sync(capture.full)
    report = shift_layers(
        named,
        grams,
        mode=mode,
        tau=tau,
        full=capture.full,
        optimizer=optimizer,
        loss_fn=loss_fn,
        model=model,
        loss_tol=loss_tol,
        max_change=max_change,
    )
    report.seconds = time.perf_counter() - start
    return report
