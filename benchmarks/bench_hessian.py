"""Hessian-trace estimators side by side on the same model and batch.

  ours       sos_detect.hessian.hessian_trace: gradient graph built once, one Rademacher probe per
             backward through it (CPU default)
  ours-batch the same with 8 probes per batched backward (is_grads_batched, the CUDA default)
  exact      (digits only) Σ_i e_iᵀHe_i over every parameter, from HVPs with unit vectors
  pyhessian  a loop written the way PyHessian's trace() computes it: model.eval(), one probe per
             Hessian-vector product, stop when the running mean changes by < 1e-3 relative (max 100)
  curvlinops curvlinops' HessianLinearOperator + hutchinson_trace (if installed; classifier only: its
             (output, target) loss interface does not fit Ultralytics' loss(batch))

All use Rademacher probes, so equal standard error means equal probe count: the time ratio at equal
standard error is the ratio of seconds per probe. Prints a table; writes benchmarks/results/bench_hessian.json.
Run: python benchmarks/bench_hessian.py
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

from sos_detect.runtime import configure

configure()
import torch  # noqa: E402
from torch import nn  # noqa: E402

from sos_detect.hessian import HessianOperator, TraceEstimate, gradients_enabled, hessian_trace  # noqa: E402

PROBES = 96


def pyhessian_style(loss_fn, params, max_iter=100, tol=1e-3, seed=0) -> tuple[TraceEstimate, list[float]]:
    """PyHessian's trace(): one Rademacher v per HVP, stop on relative change of the running mean < tol."""
    gen = torch.Generator().manual_seed(seed)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    samples, trace = [], 0.0
    for _ in range(max_iter):
        v = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in params]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, only_inputs=True, retain_graph=True)
        samples.append(sum(float((h * x).sum()) for h, x in zip(hv, v, strict=True)))
        mean = statistics.fmean(samples)
        if abs(mean - trace) / (abs(trace) + 1e-6) < tol:
            break
        trace = mean
    sd = statistics.stdev(samples) / math.sqrt(len(samples)) if len(samples) > 1 else math.inf
    return TraceEstimate(statistics.fmean(samples), sd, len(samples)), samples


def exact_trace(loss_fn, params, chunk: int = 256) -> dict:
    """tr(H) = Σ_i (He_i)_i with unit vectors e_i, in batched backwards."""
    op = HessianOperator(loss_fn, params)
    start, total = time.perf_counter(), 0.0
    for i in range(0, op.dim, chunk):
        idx = torch.arange(i, min(i + chunk, op.dim))
        e = torch.zeros(len(idx), op.dim, dtype=op.params[0].dtype)
        e[torch.arange(len(idx)), idx] = 1.0
        total += float(op.matmat(e)[torch.arange(len(idx)), idx].sum())
    return {"value": total, "stderr": 0.0, "probes": op.dim, "seconds": time.perf_counter() - start}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def digits_workload():
    from sos_detect.classify.digits import load_digits_split, train_digits_mlp

    x, y, _, _ = load_digits_split()
    model = train_digits_mlp(x, y, epochs=20).eval()
    params = [p for p in model.parameters()]
    return "digits MLP (all params)", model, params, lambda: nn.functional.cross_entropy(model(x), y), (x, y)


def detector_workload():
    from sos_detect.checkpoints import load_detector
    from sos_detect.detect.checkpoint import capture_set_for, working_copy
    from sos_detect.detect.data import load_data
    from sos_detect.detect.embedded import REPO_ROOT
    from sos_detect.detect.flatness import detector_params
    from sos_detect.detect.shifting import detection_loss_tensor

    ckpt = load_detector(REPO_ROOT / "data" / "checkpoints" / "yolov5n-trees.pt")
    model = working_copy(ckpt.get("ema") or ckpt["model"], torch.device("cpu"), imgsz=320, batch=4)
    batches = capture_set_for(model, load_data(None)[1]).sample(4, seed=0)
    params = detector_params(model, "head")
    return (
        "YOLOv5n trees (head convs, 4 images @320)",
        model,
        params,
        lambda: detection_loss_tensor(model, batches, torch.device("cpu")),
        None,
    )


def curvlinops_trace(model, params, data, probes):
    try:
        from curvlinops import HessianLinearOperator, hutchinson_trace
    except ImportError:
        return None
    x, y = data
    op = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    torch.manual_seed(0)
    value, seconds = timed(lambda: float(hutchinson_trace(op, probes)))
    return {"value": value, "probes": probes, "seconds": seconds}


def measure(name, model, params, loss_fn, data) -> dict:
    with gradients_enabled(params):
        ours, t_ours = timed(lambda: hessian_trace(loss_fn, params, max_probes=PROBES, rtol=0.0, seed=0))
        batch, t_batch = timed(
            lambda: hessian_trace(loss_fn, params, max_probes=PROBES, rtol=0.0, seed=0, probes_per_pass=8)
        )
        exact = exact_trace(loss_fn, params) if data is not None else None
        (ref, _), t_ref = timed(lambda: pyhessian_style(loss_fn, params, seed=1))
        (fixed, _), t_fixed = timed(lambda: pyhessian_style(loss_fn, params, max_iter=PROBES, tol=-1, seed=2))
        cl = curvlinops_trace(model, params, data, PROBES) if data is not None else None
    per_probe = t_ours / ours.probes
    return {
        "workload": name,
        "ours": {"value": ours.value, "stderr": ours.stderr, "probes": ours.probes, "seconds": t_ours},
        "ours_batched8": {"value": batch.value, "stderr": batch.stderr, "probes": batch.probes, "seconds": t_batch},
        "exact": exact,
        "pyhessian_style_tol1e-3": {"value": ref.value, "stderr": ref.stderr, "probes": ref.probes, "seconds": t_ref},
        "pyhessian_style_fixed": {"value": fixed.value, "stderr": fixed.stderr, "probes": PROBES, "seconds": t_fixed},
        "curvlinops": cl,
        "speedup_per_probe_vs_pyhessian": (t_fixed / PROBES) / per_probe,
        "speedup_per_probe_vs_curvlinops": (cl["seconds"] / cl["probes"]) / per_probe if cl else None,
        "agreement_sigma": abs(ours.value - fixed.value) / math.hypot(ours.stderr, fixed.stderr),
    }


def main() -> None:
    rows = [measure(*workload()) for workload in (digits_workload, detector_workload)]
    print(f"{'workload':<44} {'method':<24} {'trace':>12} {'± stderr':>10} {'probes':>7} {'s':>8} {'s/probe':>9}")
    for r in rows:
        for key in ("exact", "ours", "ours_batched8", "pyhessian_style_fixed", "pyhessian_style_tol1e-3", "curvlinops"):
            m = r[key]
            if m is None:
                print(f"{r['workload']:<44} {key:<24} {'n/a':>12}")
                continue
            se = m.get("stderr", float("nan"))
            print(
                f"{r['workload']:<44} {key:<24} {m['value']:>12.5g} {se:>10.3g} {m['probes']:>7} "
                f"{m['seconds']:>8.2f} {m['seconds'] / m['probes']:>9.4f}"
            )
        cl = r["speedup_per_probe_vs_curvlinops"]
        print(
            f"  → time at equal stderr: pyhessian-style / ours = {r['speedup_per_probe_vs_pyhessian']:.2f}x"
            + (f", curvlinops / ours = {cl:.2f}x" if cl else "")
            + f"; ours vs pyhessian-style estimates differ by {r['agreement_sigma']:.2f} σ"
        )
    out = Path(__file__).parent / "results" / "bench_hessian.json"
    out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
