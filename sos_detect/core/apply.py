"""Apply: solve every target layer's shift, write it in place with its optimiser state, check it, and roll everything
back bit for bit when a check fails; under torch.distributed the Grams are summed over ranks before the solve and rank
0's tensors broadcast after. `shift_targets` shifts several networks (a model and its EMA) on shared Grams;
`shift_model` captures the Grams in an eval pass first.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sos_detect.core.capture import GramCapture, as_v, check_layer, eval_capture, resolve_layers, write_v
from sos_detect.core.options import ShiftConfig
from sos_detect.core.record import LayerReport, ShiftReport
from sos_detect.core.runtime import one_thread
from sos_detect.core.solver import GramAccumulator, GramSpectrum, ShiftInfo, output_change, solve_shift, spectrum

LOGGER = logging.getLogger("sos_detect")
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
    config: ShiftConfig,
    *,
    full: Mapping[str, GramAccumulator] | None = None,
    spectra: dict[str, GramSpectrum] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[nn.Module], float] | None = None,
    model: nn.Module | None = None,
) -> ShiftReport:
    """Solve each layer's shift from its Gram, write it in place, check it, and roll everything back on failure.

    `grams` are solved on; `full` (default: the same) holds every captured row, on which the output change is
    measured against config.max_change. `spectra` shares eigendecompositions between calls on the same rows (a
    model and its EMA). Checks: measured change ≤ the solver's budget·(1 + 1e-3); change on all rows ≤
    max_change; with `loss_fn` and config.loss_tol, (loss_after − loss_before)/|loss_before| ≤ loss_tol.
    """
    report = ShiftReport(mode=config.mode, tau=config.solve_tau)
    with one_thread():
        solved = _solve_layers(named, grams, config.solve_tau, spectra)
    full = full or grams
    if loss_fn is not None:
        with torch.no_grad():
            report.loss_before = float(loss_fn(model))
    saved = _snapshot(named, optimizer)
    try:
        with one_thread():
            _write_and_measure(named, grams, full, solved, report, optimizer)
        report.reason = _check(report, loss_fn, model, config.loss_tol, config.max_change)
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


def distributed() -> bool:
    """Whether this process is one of several in an initialised torch.distributed group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_rows(rows: int | None) -> int | None:
    """This process's share of b sampled rows under torch.distributed (the shares' Grams are summed)."""
    return math.ceil(rows / dist.get_world_size()) if rows and distributed() else rows


def all_reduce_grams(grams: Mapping[str, GramAccumulator]) -> None:
    """Sum every Gram and row count over all processes (G is a sum over rows)."""
    for acc in grams.values():
        gram = acc.gram.clone()
        rows = torch.tensor([float(acc.rows)], dtype=torch.float64, device=gram.device)
        dist.all_reduce(gram)
        dist.all_reduce(rows)
        acc.gram, acc.rows = gram, int(rows.item())


def broadcast_shifted(layers: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer | None) -> None:
    """Make every rank hold rank 0's shifted weights and first-moment buffers, bit for bit."""
    with torch.no_grad():
        for layer in layers.values():
            dist.broadcast(layer.weight.data, src=0)
            if optimizer is not None:
                for buf in first_moment_tensors(optimizer, layer.weight).values():
                    dist.broadcast(buf, src=0)


Target = tuple[Mapping[str, nn.Module], nn.Module, "torch.optim.Optimizer | None"]  # (its layers, network, optimiser)


def shift_targets(
    capture: GramCapture,
    targets: Mapping[str, Target],
    config: ShiftConfig,
    *,
    loss_fn: Callable[[nn.Module], float] | None = None,
) -> dict[str, ShiftReport]:
    """Shift every target (a training model, its EMA) on the Grams `capture` took: each its own minimum-norm V' under
    the same rows A (min ‖V'‖ s.t. ‖A(V'−V)‖ ≤ τ‖AV‖ for its own V), one eigendecomposition per layer serving all.

    The capture's layers are named as each target's (layers of one architecture). Under torch.distributed the Grams
    are summed over ranks first and rank 0's tensors broadcast after, so all ranks end identical.
    """
    grams = capture.grams()
    if distributed():
        all_reduce_grams(grams)
        if grams is not capture.full:
            all_reduce_grams(capture.full)
    spectra: dict[str, GramSpectrum] = {}
    reports = {}
    for name, (layers, network, optimizer) in targets.items():
        start = time.perf_counter()
        reports[name] = shift_layers(
            layers,
            grams,
            config,
            full=capture.full,
            spectra=spectra,
            optimizer=optimizer,
            loss_fn=loss_fn,
            model=network,
        )
        if distributed():
            broadcast_shifted(layers, optimizer)
        reports[name].seconds = time.perf_counter() - start
    return reports


def shift_model(
    model: nn.Module,
    layers: Sequence[nn.Module] | Mapping[str, nn.Module],
    batches: Iterable[Any],
    config: ShiftConfig | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[nn.Module], float] | None = None,
    seed: int = 0,
    **options: Any,
) -> ShiftReport:
    """Capture features in an eval pass over `batches`, then shift `layers` (`shift_targets`); `options` are
    ShiftConfig fields over `config` (default: the option table's defaults).

    mode="guarded": min ‖V'‖ s.t. ‖A(V'−V)‖ ≤ τ‖AV‖ over all captured rows.
    mode="paper": τ = 0 on `rows` uniformly sampled rows (the paper's SOS; choose rows < width).
    """
    config = replace(config or ShiftConfig(), **options)
    start = time.perf_counter()
    named = resolve_layers(model, layers)
    capture = eval_capture(model, named, batches, rows=rank_rows(config.sampled_rows), forward=forward, seed=seed)
    report = shift_targets(capture, {"model": (named, model, optimizer)}, config, loss_fn=loss_fn)["model"]
    report.seconds = time.perf_counter() - start
    return report
