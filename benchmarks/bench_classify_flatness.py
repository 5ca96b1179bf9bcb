"""Does optimum shifting flatten a trained classifier? Hessian trace and top eigenvalue, before and after.

Models: the Fashion-MNIST small CNNs of `sos-detect reproduce classify --preset mini --epochs 30 --schemes
sgd,sgd+sos --out benchmarks/results/classify_mini_30ep` (trained here if that folder lacks them: 30 epochs each).
A. Post-hoc shifts of each SGD model's final layer (width 128): paper mode (τ = 0) on b ∈ {32, 64, 100} sampled
   training samples, guarded τ ∈ {1e-4, 1e-3, 1e-2} on all 10,000 training samples.
B. The final SGD and SGD+SOS models of the same seeds, side by side.
Flatness is measured on a fixed batch of training samples (no augmentation, BatchNorm in eval mode):
  - tr(H) of the whole network by Hutch++ (rank 8, 24 residual probes) ± its standard error;
  - the change of tr(H) by Hutch++ on the difference H_after − H_before with the same probes, so that what the two
    Hessians share cancels (products of the first model with those probes are reused for every comparison);
  - the top Hessian eigenvalue (Lanczos);
  - the last layer's own block tr(H_VV) in closed form (sos_detect.core.hessian.linear_block_diagonal): it depends on V
    only through the softmax outputs, which OS keeps.
Writes benchmarks/results/bench_classify_flatness.json. Run: python benchmarks/bench_classify_flatness.py [seeds]
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from sos_detect.core.runtime import configure

configure()
import torch  # noqa: E402
from torch import nn  # noqa: E402

from sos_detect.classify.data import load_classification_data  # noqa: E402
from sos_detect.classify.models import build_model, final_linear  # noqa: E402
from sos_detect.classify.runs import FINISHED  # noqa: E402
from sos_detect.classify.train import evaluate, sos_step  # noqa: E402
from sos_detect.core.hessian import (  # noqa: E402
    HessianOperator,
    TraceEstimate,
    hutchpp,
    linear_block_diagonal,
    softmax_cross_entropy_curvature,
    top_eigenvalues,
)
from sos_detect.reproduce.classify import PRESETS, run_scheme  # noqa: E402

RUNS = Path(__file__).parent / "results" / "classify_mini_30ep" / "runs"
OUT = Path(__file__).parent / "results" / "bench_classify_flatness.json"
SETTINGS = [("paper", 0.0, b) for b in (32, 64, 100)] + [("guarded", t, None) for t in (1e-4, 1e-3, 1e-2)]
EPOCHS = 30  # as in the reproduce command above
BATCH = 256  # training samples in the loss whose Hessian is measured (1024 took 4 min per row on one core)
RANK, RESIDUAL = 8, 24  # Hutch++: 2·RANK sketch HVPs, then RESIDUAL probes


def load_model(scheme: str, seed: int, data) -> nn.Module:
    """The 30-epoch model of `scheme` and `seed` that `reproduce classify` trained (trained here when missing)."""
    base = replace(PRESETS["mini"], epochs=EPOCHS)
    run_scheme(scheme, seed, base, RUNS.parent)
    model = build_model(base.model, data.num_classes, data.in_ch)
    state = torch.load(RUNS / f"{scheme.replace('+', '_')}_s{seed}" / FINISHED, weights_only=True)
    model.load_state_dict(state["model"])
    return model.eval()


class Memo:
    """A Hessian operator whose products are remembered per vector: probes shared by several estimates cost once."""

    def __init__(self, op: HessianOperator) -> None:
        self.op, self.dim, self.block, self.memo = op, op.dim, op.block, {}

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        keys = [hash(v.double().cpu().numpy().tobytes()) for v in vs]
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        if todo:
            for i, hv in zip(todo, self.op.matmat(vs[todo]).double(), strict=True):
                self.memo[keys[i]] = hv
        return torch.stack([self.memo[k] for k in keys])


class Difference:
    """v ↦ (H_after − H_before) v."""

    def __init__(self, after: Memo, before: Memo) -> None:
        self.after, self.before, self.dim, self.block = after, before, after.dim, after.block

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        return self.after.matmat(vs) - self.before.matmat(vs)


class Flatness:
    """Loss, whole-network trace, top eigenvalue and the last layer's block trace of models on one batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
        self.x, self.y, self.seed = x, y, seed

    def measure(self, model: nn.Module) -> dict:
        model.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        op = Memo(HessianOperator(lambda: nn.functional.cross_entropy(model(self.x), self.y), params))
        trace = hutchpp(op, rank=RANK, max_probes=2 * RANK + RESIDUAL, rtol=0, seed=self.seed)
        eig = top_eigenvalues(op.op, k=1, max_iter=40, tol=1e-3, seed=self.seed)[0]
        _, layer = final_linear(model)
        feats = []
        hook = layer.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
        with torch.no_grad():
            logits = model(self.x)
        hook.remove()
        last = linear_block_diagonal(feats[0], softmax_cross_entropy_curvature(logits, 1 / len(self.x)), bias=True)
        return {
            "op": op,
            "loss": op.op.loss,
            "trace": trace.value,
            "trace_stderr": trace.stderr,
            "top_eig": eig,
            "last_trace": float(last.sum()),
            "last_norm": float(layer.weight.detach().norm()),
        }


def paired(before: dict, after: dict, seed: int) -> dict:
    """tr(H_after) − tr(H_before) by Hutch++ on the difference, with the probes of both traces (reused products)."""
    est: TraceEstimate = hutchpp(
        Difference(after["op"], before["op"]), rank=RANK, max_probes=2 * RANK + RESIDUAL, rtol=0, seed=seed
    )
    return {"trace_change": est.value, "trace_change_stderr": est.stderr}


def scalars(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "op"}


def main(seeds: list[int]) -> None:
    cpu = torch.device("cpu")
    posthoc, trained = [], []
    start_all = time.time()
    for seed in seeds:
        data = load_classification_data("fashion-mnist", train_subset=10_000, seed=seed)  # this seed's run's subset
        idx = torch.randperm(len(data.plain_train), generator=torch.Generator().manual_seed(123))[:BATCH].tolist()
        flat = Flatness(
            torch.stack([data.plain_train[i][0] for i in idx]),
            torch.tensor([data.plain_train[i][1] for i in idx]),
            seed,
        )
        base = load_model("sgd", seed, data)
        m0 = flat.measure(base)
        acc0, fit0 = evaluate(base, data.test, cpu), evaluate(base, data.plain_train, cpu)
        for mode, tau, b in SETTINGS:
            t0 = time.time()
            model = copy.deepcopy(base)
            cfg = replace(PRESETS["mini"], sos_mode=mode, sos_tau=tau, sos_batch=b or 1, sos_samples=10_000)
            report = sos_step(model, data.plain_train, cfg, cpu, seed)
            m1 = flat.measure(model)
            acc1, fit1 = evaluate(model, data.test, cpu), evaluate(model, data.plain_train, cpu)
            row = {
                "seed": seed,
                "mode": mode,
                "tau": tau,
                "rows": b or 10_000,
                "rank": report.layers[0].rank,
                "norm_ratio": report.norm_ratio,
                "train_loss_before": fit0["loss"],
                "train_loss_after": fit1["loss"],
                "train_top1_before": fit0["top1"],
                "train_top1_after": fit1["top1"],
                "test_top1_before": acc0["top1"],
                "test_top1_after": acc1["top1"],
                "test_loss_before": acc0["loss"],
                "test_loss_after": acc1["loss"],
                "before": scalars(m0),
                "after": scalars(m1),
                **paired(m0, m1, seed),
                "seconds": time.time() - t0,
            }
            posthoc.append(row)
            print(
                f"s{seed} {mode:<7} {'b=' + str(b) if b else f'τ={tau:.0e}':>7}  ‖V′‖/‖V‖ {row['norm_ratio']:.4f}  "
                f"train loss {fit0['loss']:.5f}→{fit1['loss']:.5f}  "
                f"top-1 {acc0['top1']:.4f}→{acc1['top1']:.4f}  "
                f"tr(H) {m0['trace']:.2f}→{m1['trace']:.2f} (Δ {row['trace_change']:+.3f} ± "
                f"{row['trace_change_stderr']:.3f})  λ1 {m0['top_eig']:.3f}→{m1['top_eig']:.3f}  "
                f"tr(H_VV) {m0['last_trace']:.4f}→{m1['last_trace']:.4f}  [{row['seconds']:.0f} s]",
                flush=True,
            )
        sos_model = load_model("sgd+sos", seed, data)
        m_sos = flat.measure(sos_model)
        acc_sos = evaluate(sos_model, data.test, cpu)
        trained.append(
            {
                "seed": seed,
                "sgd": {**scalars(m0), "test_top1": acc0["top1"]},
                "sgd+sos": {**scalars(m_sos), "test_top1": acc_sos["top1"]},
                **paired(m0, m_sos, seed),
            }
        )
        print(
            f"s{seed} trained: SGD vs SGD+SOS  top-1 {acc0['top1']:.4f} / {acc_sos['top1']:.4f}  "
            f"‖V‖ {m0['last_norm']:.3f} / {m_sos['last_norm']:.3f}  tr(H) {m0['trace']:.2f} / {m_sos['trace']:.2f} "
            f"(Δ {trained[-1]['trace_change']:+.2f} ± {trained[-1]['trace_change_stderr']:.2f})  "
            f"λ1 {m0['top_eig']:.3f} / {m_sos['top_eig']:.3f}  train-batch loss {m0['loss']:.4f} / {m_sos['loss']:.4f}",
            flush=True,
        )
    OUT.write_text(
        json.dumps(
            {
                "batch": BATCH,
                "hutchpp": {"rank": RANK, "residual_probes": RESIDUAL},
                "seeds": seeds,
                "seconds": time.time() - start_all,
                "posthoc": posthoc,
                "trained": trained,
            },
            indent=1,
        )
    )
    print(f"written {OUT}")


if __name__ == "__main__":
    main([int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "0,1,2").split(",")])
