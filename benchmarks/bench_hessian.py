"""Hessian traces and top eigenvalues: how long each method takes to reach 1 % relative error, side by side.

Workloads (float32, CPU):
  digits-mlp   the digits MLP (8,970 parameters, 1,347 training images), whole network; exact trace and
               eigenvalues from the full Hessian (unit-vector HVPs, float64)
  digits-last  its last Linear layer (650 parameters); exact: the closed form
  yolo-cls     YOLOv5n trees detector (data/checkpoints/yolov5n-trees.pt, 4 embedded images at 320 px), the
               classification head convs cv3[i][-1]; exact: the closed form
  yolo-head    the same, all six head output convs (cls + box); exact: cls closed form + box output-space curvature
  yolo-all     the same detector, whole model (2.5 M parameters, 2 images at 160 px); no exact value: the reference
               is a long run of our estimator (exact head + Hutch++ rank 64 with 400 residual probes on the rest),
               reported with its standard error
Trace methods:
  exact               closed form (digits-last, yolo-cls, yolo-head); no HVP
  ours hutchinson     sos_detect.core.hessian.hutchinson: Rademacher probes, gradient graph built once
  ours hutch++        sos_detect.core.hessian.hutchpp, rank 16 (32 HVPs for the sketch), then residual probes
  ours exact+hutch++  (yolo-all) exact head blocks + Hutch++ (rank 16 and 64) on every other parameter (what
                      `sos-detect hessian --params all` runs); its time includes the exact head blocks
  pyhessian-style     a loop written as PyHessian's trace(): one Rademacher probe per HVP through a graph built once
  curvlinops-*        curvlinops-for-pytorch's HessianLinearOperator with hutchinson_trace / hutchpp_trace / xtrace
                      (digits only: its (output, target) loss interface does not take Ultralytics' loss(batch))
"HVPs to 1 %" is the number of Hessian-vector products at which the estimator's RMS relative error is 1 % of the
exact (reference) trace T. For the probe-averaging estimators (Hutchinson, PyHessian-style, the residual of
Hutch++) it is projected from the measured per-probe standard deviation σ: n = (σ / 0.01 T)² (+ 2·rank for Hutch++),
the probe count at which the standard error is 1 % of T. On digits and the YOLO head it is also measured directly
("measured"): the smallest budget on the grid 3·2^j at which the RMS relative error over 8 seeds is ≤ 1 % (every
method, curvlinops included: its estimators are not incremental); "None" when the largest budget run does not reach
it (800 HVPs on digits, 256 on the head). The JSON also has the median over seeds of the HVPs after which the running
estimate stays within 1 %.
"Time to 1 %" = setup (gradient graph) + HVPs to 1 % × seconds per HVP, each a median of interleaved repeats in
this run; the exact methods' time is their measured wall time.
Eigenvalues: HVPs (and time) to the top 5 for Lanczos (ours, tol 1e-3) and for power iteration with deflation
(PyHessian's eigenvalues(): maxIter 100, tol 1e-3 per eigenvalue), with the largest relative error against the
exact (digits: full Hessian) or a converged Lanczos reference (yolo-head: 300 steps, tol 1e-10).
HVP implementations: seconds per HVP for double backward through a graph built once (1 or 8 probes per backward)
and forward-over-reverse (torch.func.jvp of torch.func.grad, which rebuilds the forward for every product).

Prints the tables; writes benchmarks/results/bench_hessian.{json,txt}. Run (about 11 min on one core):
taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/bench_hessian.py
(sections: --only hvp,traces,eig; workloads: --workloads digits,yolo-head,yolo-all; later runs update the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from sos_detect.core.runtime import configure

configure()
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, jvp  # noqa: E402

from sos_detect.core.hessian import (  # noqa: E402
    HessianOperator,
    gradients_enabled,
    hutchinson,
    hutchpp,
    linear_block_diagonal,
    softmax_cross_entropy_curvature,
    top_eigenvalues,
)

OUT = Path(__file__).parent / "results" / "bench_hessian.json"
RANK = 16  # Hutch++ sketch rank (the library default)
REF_RANK, REF_PROBES = 64, 400  # the whole detector's reference: a long Hutch++ run
REPEATS = 3  # interleaved timing repeats
MLP_SEEDS = 8
HEAD_SEEDS = 8
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f} s] {msg}", flush=True)


class Workload:
    """A loss over `params` of `model`, a functional form for torch.func, and an exact trace where one exists."""

    def __init__(self, name: str, model: nn.Module, params: list[torch.Tensor], loss_fn: Callable, call: Callable):
        self.name, self.model, self.params, self.loss_fn, self.call = name, model, params, loss_fn, call
        self.exact: dict | None = None  # {"value": T, "seconds": wall time} for closed forms / full Hessians
        self.data = None  # (x, y) for curvlinops

    def operator(self, block: int = 1) -> HessianOperator:
        return HessianOperator(self.loss_fn, self.params, block=block)

    def functional_hvp(self, params: list[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """v ↦ Hv by forward-over-reverse: jvp of grad, the forward and backward redone for every product."""
        named = dict(self.model.named_parameters())
        name_of = {id(p): n for n, p in named.items()}
        names = [name_of[id(p)] for p in params]  # the operator's order
        fixed = {n: p.detach() for n, p in named.items() if n not in names}
        primal = {n: named[n].detach() for n in names}

        def f(ps):
            return self.call(lambda *args: functional_call(self.model, {**fixed, **ps}, args))

        def hvp(v: torch.Tensor) -> torch.Tensor:
            tangent, i = {}, 0
            for n in names:
                tangent[n] = v[i : i + primal[n].numel()].reshape(primal[n].shape).to(primal[n])
                i += primal[n].numel()
            _, out = jvp(grad(f), (primal,), (tangent,))
            return torch.cat([out[n].reshape(-1) for n in names])

        return hvp


# -- workloads ------------------------------------------------------------------------------------------------------
def digits_workloads() -> list[Workload]:
    from sos_detect.classify.digits import load_digits_split, train_digits_mlp

    x, y, _, _ = load_digits_split()
    model = train_digits_mlp(x, y, epochs=20).eval()
    call = lambda fwd: nn.functional.cross_entropy(fwd(x), y)  # noqa: E731
    loss_fn = lambda: call(model)  # noqa: E731
    whole = Workload("digits-mlp", model, list(model.parameters()), loss_fn, call)
    last = Workload("digits-last", model, [model[5].weight, model[5].bias], loss_fn, call)
    whole.data = last.data = (x, y)
    start = time.perf_counter()
    with torch.no_grad():
        feats = model[:5](x)
        diag = linear_block_diagonal(feats, softmax_cross_entropy_curvature(model[5](feats), 1 / len(x)), bias=True)
    last.exact = {"value": float(diag.sum()), "seconds": time.perf_counter() - start}
    return [whole, last]


def full_hessian(work: Workload, chunk: int = 256) -> tuple[torch.Tensor, float]:
    """The full float64 Hessian of a float64 copy of the workload, from unit-vector HVPs; and its wall time."""
    import copy

    model = copy.deepcopy(work.model).double()
    x, y = work.data
    op = HessianOperator(lambda: work.call(lambda t: model(t.double())), model.parameters(), block=chunk)
    start = time.perf_counter()
    rows = []
    for i in range(0, op.dim, chunk):
        unit = torch.zeros(min(chunk, op.dim - i), op.dim, dtype=torch.float64)
        unit[torch.arange(len(unit)), torch.arange(i, i + len(unit))] = 1.0
        rows.append(op.matmat(unit))
    h = torch.cat(rows)
    return (h + h.T) / 2, time.perf_counter() - start


def top5(h: torch.Tensor) -> list[float]:
    """The 5 largest eigenvalues of a dense symmetric matrix (ARPACK, an implementation independent of ours)."""
    from scipy.sparse.linalg import eigsh

    return sorted(eigsh(h.numpy(), k=5, which="LA", tol=1e-12)[0].tolist(), reverse=True)


def detector(images: int, imgsz: int):
    from sos_detect.detect.checkpoints import load_detector
    from sos_detect.detect.data import load_data
    from sos_detect.detect.detector_shift import detection_loss_tensor
    from sos_detect.detect.embedded import REPO_ROOT
    from sos_detect.detect.posthoc import capture_set_for, working_copy

    ckpt = load_detector(REPO_ROOT / "data" / "checkpoints" / "yolov5n-trees.pt")
    model = working_copy(ckpt.get("ema") or ckpt["model"], torch.device("cpu"), imgsz=imgsz, batch=images)
    batches = capture_set_for(model, load_data(None)[1]).sample(images, seed=0)
    cpu = torch.device("cpu")

    def call(fwd):  # detection_loss_tensor's per-image loss with the model call replaced (model.loss = forward(dict))
        model.eval()
        total = 0.0
        for b in batches:
            b = {**b, "img": b["img"].float() / 255}
            total = total + fwd(b)[0].sum()
        return total / images

    return model, batches, (lambda: detection_loss_tensor(model, batches, cpu)), call


def yolo_head_workloads() -> list[Workload]:
    from sos_detect.detect.flatness import cls_head_diagonal, exact_trace, output_space_diagonal
    from sos_detect.detect.heads import detect_head_layers

    model, batches, loss_fn, call = detector(4, 320)
    cpu = torch.device("cpu")
    cls = [m.weight for m in detect_head_layers(model, "cls").values()]
    box = [m.weight for m in detect_head_layers(model, "box").values()]
    out = [Workload("yolo-cls", model, cls, loss_fn, call), Workload("yolo-head", model, cls + box, loss_fn, call)]
    start = time.perf_counter()
    t_cls = exact_trace(cls_head_diagonal(model, batches, cpu)).value
    out[0].exact = {"value": t_cls, "seconds": time.perf_counter() - start}
    t_box = exact_trace(output_space_diagonal(model, batches, cpu, "box")).value
    out[1].exact = {"value": t_cls + t_box, "seconds": time.perf_counter() - start}
    return out


# -- the PyHessian-style loops -----------------------------------------------------------------------------------------
class PyHessianStyle:
    """Written the way PyHessian's hessian class computes: the gradient graph built at construction, then
    trace() (one Rademacher v per HVP, stop when the running mean moves by < tol relative; tol < 0: never) and
    eigenvalues() (power iteration per eigenvalue, orthogonalised against the ones found)."""

    def __init__(self, loss_fn: Callable, params: list[torch.Tensor]) -> None:
        self.params = params
        self.grads = torch.autograd.grad(loss_fn(), params, create_graph=True)

    def hvp(self, v: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(self.grads, self.params, grad_outputs=v, only_inputs=True, retain_graph=True)

    @staticmethod
    def dot(a, b) -> float:
        return sum(float((x * y).sum()) for x, y in zip(a, b, strict=True))

    def trace(self, max_iter: int = 100, tol: float = 1e-3, seed: int = 0) -> list[float]:
        """The per-probe vᵀHv."""
        gen = torch.Generator().manual_seed(seed)
        samples, trace = [], 0.0
        for _ in range(max_iter):
            v = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in self.params]
            samples.append(self.dot(self.hvp(v), v))
            mean = statistics.fmean(samples)
            if abs(mean - trace) / (abs(trace) + 1e-6) < tol:
                break
            trace = mean
        return samples

    def eigenvalues(self, top_n: int = 5, max_iter: int = 100, tol: float = 1e-3, seed: int = 0):
        """The top_n eigenvalues and the HVPs used."""
        gen = torch.Generator().manual_seed(seed)

        def normalise(v):
            norm = math.sqrt(self.dot(v, v)) + 1e-6
            return [x / norm for x in v]

        values, vectors, hvps = [], [], 0
        for _ in range(top_n):
            v = normalise([torch.randn(p.shape, generator=gen).to(p) for p in self.params])
            value = None
            for _ in range(max_iter):
                for u in vectors:  # Gram-Schmidt against the eigenvectors found
                    c = self.dot(v, u)
                    v = [x - c * y for x, y in zip(v, u, strict=True)]
                v = normalise(v)
                hv = self.hvp(v)
                hvps += 1
                tmp = self.dot(hv, v)
                v = normalise([h.detach() for h in hv])
                if value is not None and abs(value - tmp) / (abs(value) + 1e-6) < tol:
                    value = tmp
                    break
                value = tmp
            values.append(value)
            vectors.append(v)
        return values, hvps


# -- measurements ------------------------------------------------------------------------------------------------------
def median_time(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hvp_costs(work: Workload, probes: int) -> dict:
    """Seconds per HVP of each implementation, interleaved repeats of `probes` products each; graph set-up apart."""
    gen = torch.Generator().manual_seed(0)
    with gradients_enabled(work.params):
        ops = {"double backward": work.operator(1), "double backward, 8 per pass": work.operator(8)}
        dim = ops["double backward"].dim
        vs = (torch.randint(0, 2, (probes, dim), generator=gen) * 2 - 1).float()
        functional = work.functional_hvp(ops["double backward"].params)  # those with second-order dependence
        impl = {name: (lambda op=op: op.matmat(vs)) for name, op in ops.items()}
        impl["forward-over-reverse (torch.func)"] = lambda: [functional(v) for v in vs]
        pyh = PyHessianStyle(work.loss_fn, ops["double backward"].params)
        impl["pyhessian-style"] = lambda: pyh.trace(probes, -1)
        times: dict[str, list[float]] = {k: [] for k in impl}
        for _ in range(REPEATS):
            for name, fn in impl.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) / probes)
        setup = median_time(lambda: work.operator(1))
        check = float((functional(vs[0]) - ops["double backward"].matmat(vs[:1])[0]).norm())
        scale = float(ops["double backward"].matmat(vs[:1]).norm())
    per = {k: statistics.median(v) for k, v in times.items()}
    log(f"{work.name}: s/HVP " + ", ".join(f"{k} {v:.4f}" for k, v in per.items()))
    return {
        "dim": dim,
        "probes": probes,
        "seconds_per_hvp": per,
        "graph_setup_seconds": setup,
        "forward_over_reverse_relative_difference": check / scale,
    }


def projected(samples: list[float], ref: float, overhead: int = 0) -> dict:
    sd = statistics.stdev(samples)
    return {"per_probe_sd": sd, "hvps_to_1pct": overhead + math.ceil((sd / (0.01 * abs(ref))) ** 2)}


def stays_within(running: list[float], ref: float, offset: int = 0) -> int | None:
    """HVPs after which every running estimate is within 1 % of ref (None: the last one is not)."""
    n = None
    for i in range(len(running) - 1, -1, -1):
        if abs(running[i] - ref) > 0.01 * abs(ref):
            break
        n = offset + i + 1
    return n


def running_means(samples: list[float], base: float = 0.0) -> list[float]:
    out, total = [], 0.0
    for i, s in enumerate(samples, 1):
        total += s
        out.append(base + total / i)
    return out


def trace_methods(work: Workload, ref: float, probes: int, costs: dict, seeds: int, cheap: bool = True) -> dict:
    """Per method: per-probe spread, HVPs to 1 % (projected; on digits-mlp also measured), time to 1 %.

    cheap=False (the whole detector) runs Hutchinson only and gives the PyHessian-style loop its probes: the same
    estimator (the mean of vᵀHv over Rademacher v), so the same variance; its own seconds per HVP are measured."""
    per_hvp, setup = costs["seconds_per_hvp"], costs["graph_setup_seconds"]
    out = {}
    with gradients_enabled(work.params):
        op = work.operator(1)
        runs = {"ours hutchinson": [], "ours hutch++": [], "pyhessian-style": []} if cheap else {"ours hutchinson": []}
        for seed in range(seeds):
            h = hutchinson(op, max_probes=probes, rtol=0, seed=seed)
            runs["ours hutchinson"].append((h.samples, 0.0, 0))
            if cheap:
                hp = hutchpp(op, rank=RANK, max_probes=2 * RANK + probes, rtol=0, seed=seed)
                runs["ours hutch++"].append((hp.samples, hp.value - statistics.fmean(hp.samples), 2 * RANK))
                pyh = PyHessianStyle(work.loss_fn, op.params)
                runs["pyhessian-style"].append((pyh.trace(probes, -1, seed), 0.0, 0))
    if not cheap:
        runs["pyhessian-style"] = runs["ours hutchinson"]
    for name, rs in runs.items():
        samples = [s for run in rs for s in run[0]]
        overhead = rs[0][2]
        res = projected(samples, ref, overhead)
        cost = per_hvp["pyhessian-style" if name == "pyhessian-style" else "double backward"]
        res["seconds_per_hvp"] = cost
        res["time_to_1pct"] = setup + res["hvps_to_1pct"] * cost
        res["estimate"] = statistics.fmean(run[1] + statistics.fmean(run[0]) for run in rs)
        if seeds > 1:
            hits = [stays_within(running_means(run[0], run[1]), ref, run[2]) for run in rs]
            res["stays_within_1pct_median"] = statistics.median(h if h is not None else math.inf for h in hits)
            res["rms_error_by_budget"] = rms_curve([running_means(run[0], run[1]) for run in rs], ref, overhead)
            res["rms_hvps_to_1pct"] = first_budget(res["rms_error_by_budget"])
        out[name] = res
    log(f"{work.name}: traces")
    if work.exact is not None:
        out["exact"] = {"hvps_to_1pct": 0, "time_to_1pct": work.exact["seconds"], "estimate": work.exact["value"]}
    return out


BUDGETS = [3 * 2**j for j in range(12)]  # 3 … 6144 HVPs


def rms_curve(running: list[list[float]], ref: float, overhead: int) -> dict[int, float]:
    """RMS relative error over seeds of the estimate after each budget in BUDGETS that the runs reach."""
    out = {}
    for b in BUDGETS:
        i = b - overhead - 1
        if 0 <= i < len(running[0]):
            out[b] = math.sqrt(statistics.fmean(((r[i] - ref) / ref) ** 2 for r in running))
    return out


def first_budget(curve: dict[int, float]) -> int | None:
    return next((b for b, e in sorted(curve.items()) if e <= 0.01), None)


def curvlinops_methods(work: Workload, ref: float, seeds: int) -> dict | None:
    try:
        from curvlinops import HessianLinearOperator, hutchinson_trace, hutchpp_trace, xtrace
    except ImportError:
        return None
    x, y = work.data
    op = HessianLinearOperator(work.model, nn.CrossEntropyLoss(), work.params, [(x, y)], check_deterministic=False)
    v = torch.randn(op.shape[1], 16)
    per_hvp = median_time(lambda: op @ v) / 16
    out = {}
    for name, fn in (("curvlinops hutchinson", hutchinson_trace), ("curvlinops hutch++", hutchpp_trace)):
        curve = {}
        for b in BUDGETS:
            if b >= op.shape[1]:
                break
            errs = []
            for seed in range(seeds):
                torch.manual_seed(seed)
                errs.append(((float(fn(op, b)) - ref) / ref) ** 2)
            curve[b] = math.sqrt(statistics.fmean(errs))
            if curve[b] <= 0.01:
                break
        n = first_budget(curve)
        out[name] = {
            "rms_error_by_budget": curve,
            "hvps_to_1pct": n,
            "seconds_per_hvp": per_hvp,
            "time_to_1pct": median_time(lambda n=n, fn=fn: fn(op, n), 1) if n else None,
        }
    xt = {}
    for b in BUDGETS[:8]:  # XTrace: exchangeable Hutch++; budget must be even
        errs = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            errs.append(((float(xtrace(op, b + b % 2)) - ref) / ref) ** 2)
        xt[b + b % 2] = math.sqrt(statistics.fmean(errs))
        if xt[b + b % 2] <= 0.01:
            break
    n = first_budget(xt)
    out["curvlinops xtrace"] = {
        "rms_error_by_budget": xt,
        "hvps_to_1pct": n,
        "seconds_per_hvp": per_hvp,
        "time_to_1pct": median_time(lambda: xtrace(op, n), 1) if n else None,
    }
    return out


def eigen_methods(work: Workload, exact_top: list[float]) -> dict:
    def err(vals):
        return max(abs(a - b) / abs(b) for a, b in zip(sorted(vals, reverse=True), exact_top, strict=True))

    with gradients_enabled(work.params):
        op = work.operator(1)
        calls = []
        start = time.perf_counter()
        lanczos = top_eigenvalues(op, k=5, max_iter=300, tol=1e-3, progress=lambda d, t: calls.append(d))
        t_lanczos = time.perf_counter() - start
        pyh = PyHessianStyle(work.loss_fn, op.params)  # built outside the timing, as the operator above
        start = time.perf_counter()
        power, hvps = pyh.eigenvalues()
        t_power = time.perf_counter() - start
    log(f"{work.name}: eigenvalues")
    return {
        "reference": exact_top,
        "lanczos": {"values": lanczos, "hvps": calls[-1], "seconds": t_lanczos, "max_rel_error": err(lanczos)},
        "power_deflation": {"values": power, "hvps": hvps, "seconds": t_power, "max_rel_error": err(power)},
    }


# -- driver ------------------------------------------------------------------------------------------------------------
def run_digits(only: set[str]) -> dict:
    whole, last = digits_workloads()
    h, seconds = full_hessian(whole)
    whole.exact = None  # the full Hessian is a reference here, not a competing method
    ref = float(h.trace())
    res = {"digits-mlp": {"reference": {"value": ref, "how": "full Hessian", "seconds": seconds}}}
    res["digits-last"] = {"reference": {"value": last.exact["value"], "how": "closed form"}}
    h_last = h[-650:, -650:]  # the last Linear's weight and bias are the last parameters
    res["digits-last"]["reference"]["full_hessian_value"] = float(h_last.trace())
    for work, probes, seeds in ((whole, 800, MLP_SEEDS), (last, 800, MLP_SEEDS)):
        r = res[work.name]
        if "hvp" in only:
            r["hvp"] = hvp_costs(work, 16)
        if "traces" in only:
            r["traces"] = trace_methods(
                work, r["reference"]["value"], probes, r.get("hvp") or hvp_costs(work, 8), seeds
            )
            r["traces"].update(curvlinops_methods(work, r["reference"]["value"], seeds) or {})
    if "eig" in only:
        res["digits-mlp"]["eigenvalues"] = eigen_methods(whole, top5(h))
    return res


def run_yolo_head(only: set[str]) -> dict:
    res = {}
    for work in yolo_head_workloads():
        how = "closed form" if work.name == "yolo-cls" else "cls closed form + box output-space curvature"
        r = res[work.name] = {"reference": {"value": work.exact["value"], "how": how}}
        if "hvp" in only or "traces" in only:
            r["hvp"] = hvp_costs(work, 16)
        if "traces" in only:
            r["traces"] = trace_methods(work, work.exact["value"], 256, r["hvp"], HEAD_SEEDS)
        if "eig" in only and work.name == "yolo-head":
            with gradients_enabled(work.params):
                ref = top_eigenvalues(work.operator(1), k=5, max_iter=300, tol=1e-10)
            r["eigenvalues"] = eigen_methods(work, ref)
    return res


def run_yolo_all(only: set[str]) -> dict:
    from sos_detect.detect.flatness import detector_traces

    model, batches, loss_fn, call = detector(2, 160)
    cpu = torch.device("cpu")
    work = Workload("yolo-all", model, list(model.parameters()), loss_fn, call)
    r = {}
    if "hvp" in only or "traces" in only:
        r["hvp"] = hvp_costs(work, 1)
    if "traces" in only:
        start = time.perf_counter()
        best = detector_traces(model, batches, cpu, max_probes=2 * REF_RANK + REF_PROBES, rtol=0, rank=REF_RANK)
        ref = best["all"].value
        r["reference"] = {
            "value": ref,
            "stderr": best["all"].stderr,
            "how": f"exact head + Hutch++ (rank {REF_RANK}, {REF_PROBES} residual probes) on the rest",
            "seconds": time.perf_counter() - start,
        }
        r["traces"] = trace_methods(work, ref, 48, r["hvp"], 1, cheap=False)
        head_seconds = median_time(lambda: detector_traces(model, batches, cpu, whole=False))
        for rank, est in ((RANK, None), (REF_RANK, best["all"])):
            if est is None:
                est = detector_traces(model, batches, cpu, max_probes=2 * rank + 64, rtol=0, rank=rank)["all"]
            ours = projected(est.samples, ref, 2 * rank)
            ours["seconds_per_hvp"] = r["hvp"]["seconds_per_hvp"]["double backward"]
            setup = head_seconds + r["hvp"]["graph_setup_seconds"]
            ours["time_to_1pct"] = setup + ours["hvps_to_1pct"] * ours["seconds_per_hvp"]
            ours["estimate"] = est.value
            r["traces"][f"ours exact+hutch++ r{rank}"] = ours
    return {"yolo-all": r}


def tables(results: dict) -> str:
    """The three tables as text."""
    lines: list[str] = []
    lines.append(
        f"{'workload':<12} {'method':<22} {'estimate':>11} {'σ/probe':>9} {'HVPs→1%':>8} {'measured':>9} "
        f"{'s/HVP':>8} {'time→1%':>9} {'vs pyhessian':>12}"
    )
    for name, r in results.items():
        traces = r.get("traces") or {}
        base = (traces.get("pyhessian-style") or {}).get("time_to_1pct")
        for method, m in traces.items():
            t = m.get("time_to_1pct")
            measured = m.get("rms_hvps_to_1pct") if "rms_hvps_to_1pct" in m else m.get("stays_within_1pct_median")
            lines.append(
                f"{name:<12} {method:<22} {m.get('estimate', float('nan')):>11.5g} "
                f"{m.get('per_probe_sd', float('nan')):>9.3g} {str(m.get('hvps_to_1pct')):>8} {str(measured):>9} "
                f"{m.get('seconds_per_hvp', float('nan')):>8.4f} {t if t is not None else float('nan'):>9.3g} "
                f"{(base / t if base and t else float('nan')):>11.3g}x"
            )
    lines.append(f"\n{'workload':<12} {'HVP implementation':<36} {'s/HVP':>9}")
    for name, r in results.items():
        for impl, s in (r.get("hvp") or {}).get("seconds_per_hvp", {}).items():
            lines.append(f"{name:<12} {impl:<36} {s:>9.4f}")
    lines.append(f"\n{'workload':<12} {'top-5 eigenvalues':<20} {'HVPs':>6} {'s':>8} {'max rel err':>12}")
    for name, r in results.items():
        e = r.get("eigenvalues")
        if e:
            for method in ("lanczos", "power_deflation"):
                m = e[method]
                lines.append(f"{name:<12} {method:<20} {m['hvps']:>6} {m['seconds']:>8.2f} {m['max_rel_error']:>12.2e}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="hvp,traces,eig")
    parser.add_argument("--workloads", default="digits,yolo-head,yolo-all")
    a = parser.parse_args()
    only, workloads = set(a.only.split(",")), a.workloads.split(",")
    old = json.loads(OUT.read_text()) if OUT.is_file() else {}
    results, seconds = old.get("workloads", {}), old.get("seconds", {})
    runners = {"digits": run_digits, "yolo-head": run_yolo_head, "yolo-all": run_yolo_all}
    for w in workloads:
        start = time.perf_counter()
        for name, r in runners[w](only).items():
            results.setdefault(name, {}).update(r)
        seconds[w] = time.perf_counter() - start
        print(f"[{w}: {seconds[w]:.0f} s]", flush=True)
        OUT.write_text(
            json.dumps(
                {
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "seconds": seconds,
                    "workloads": results,
                },
                indent=1,
                default=str,
            )
        )
    text = tables(results)
    print(text)
    OUT.with_suffix(".txt").write_text(text + "\n")
    print(f"written {OUT} and {OUT.with_suffix('.txt')}")


if __name__ == "__main__":
    main()
