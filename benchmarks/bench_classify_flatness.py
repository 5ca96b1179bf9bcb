"""Does optimum shifting flatten a trained classifier? Hessian trace and top eigenvalue, before and after.

Models: the Fashion-MNIST small CNNs of `sos-detect reproduce classify --preset mini --epochs 30 --schemes
sgd,sgd+sos --out benchmarks/results/classify_mini_30ep` (trained here if that folder lacks them).
A. Post-hoc shifts of each SGD model's final layer (width 128): paper mode (τ = 0) on b ∈ {32, 64, 100} sampled
   training samples, guarded τ ∈ {1e-4, 1e-3, 1e-2} on all 10,000 training samples.
B. The final SGD and SGD+SOS models of the same seeds, side by side.
Flatness is measured on a fixed batch of training samples (no augmentation, BatchNorm in eval mode):
  - tr(H) of the whole network by Hutchinson with the same Rademacher probes before and after, so the
    change has the standard error of the paired per-probe differences;
  - the top Hessian eigenvalue (Lanczos);
  - the last layer's own block, tr(H_VV) = (1/n) Σ_i Σ_k p_ik(1 − p_ik)·(‖x_i‖² + 1), in closed form: it
    depends on V only through the softmax outputs, which OS keeps.
Writes benchmarks/results/bench_classify_flatness.json. Run: python benchmarks/bench_classify_flatness.py
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

from sos_detect.runtime import configure

configure()
import torch  # noqa: E402
from torch import nn  # noqa: E402

from sos_detect.classify.data import load_classification_data  # noqa: E402
from sos_detect.classify.models import build_model, final_linear  # noqa: E402
from sos_detect.classify.train import evaluate, sos_step, train  # noqa: E402
from sos_detect.hessian import HessianOperator, top_eigenvalues  # noqa: E402
from sos_detect.reproduce.classify import PRESETS  # noqa: E402

RUNS = Path(__file__).parent / "results" / "classify_mini_30ep" / "runs"
OUT = Path(__file__).parent / "results" / "bench_classify_flatness.json"
SETTINGS = [("paper", 0.0, b) for b in (32, 64, 100)] + [("guarded", t, None) for t in (1e-4, 1e-3, 1e-2)]
EPOCHS = 30  # as in the reproduce command above
BATCH = 1024  # training samples in the loss whose Hessian is measured
PROBES = 48


def load_model(scheme: str, seed: int, data) -> nn.Module:
    cfg = replace(PRESETS["mini"], epochs=EPOCHS, optimizer="sgd", sos=scheme == "sgd+sos", seed=seed)
    run = RUNS / f"{scheme.replace('+', '_')}_s{seed}"
    if not (run / "model.pt").is_file():
        train(replace(cfg, out=str(run)), data)
    model = build_model(cfg.model, data.num_classes, data.in_ch)
    model.load_state_dict(torch.load(run / "model.pt")["model"])
    return model.eval()


class Flatness:
    """Loss, whole-network trace with fixed probes, top eigenvalue and the last layer's block trace on one batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
        self.x, self.y, self.seed = x, y, seed
        self.probes: torch.Tensor | None = None  # drawn at the first measurement, reused for every later one

    def loss_fn(self, model: nn.Module):
        return lambda: nn.functional.cross_entropy(model(self.x), self.y)

    def measure(self, model: nn.Module) -> dict:
        model.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        op = HessianOperator(self.loss_fn(model), params)
        if self.probes is None:
            gen = torch.Generator().manual_seed(self.seed)
            self.probes = torch.randint(0, 2, (PROBES, op.dim), generator=gen).float() * 2 - 1
        quad = torch.cat([(v * op.matmat(v)).sum(dim=1) for v in self.probes.split(8)])
        eig = top_eigenvalues(self.loss_fn(model), params, k=1, max_iter=40, tol=1e-3, seed=self.seed)[0]
        return {"loss": op.loss, "quad": quad, "trace": float(quad.mean()), "top_eig": eig, **self.last_block(model)}

    def last_block(self, model: nn.Module) -> dict:
        _, layer = final_linear(model)
        feats = []
        hook = layer.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
        with torch.no_grad():
            p = model(self.x).softmax(dim=1).double()
        hook.remove()
        x = feats[0].double()
        trace = float(((p * (1 - p)).sum(dim=1) * (x.square().sum(dim=1) + 1)).mean())
        return {"last_trace": trace, "last_norm": float(layer.weight.detach().norm())}


def paired(before: dict, after: dict) -> dict:
    d = after["quad"] - before["quad"]
    return {"trace_change": float(d.mean()), "trace_change_stderr": float(d.std() / math.sqrt(len(d)))}


def scalars(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "quad"}


def main(seeds: list[int]) -> None:
    cpu = torch.device("cpu")
    posthoc, trained = [], []
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
                **paired(m0, m1),
                "seconds": time.time() - t0,
            }
            posthoc.append(row)
            print(
                f"s{seed} {mode:<7} {'b=' + str(b) if b else f'τ={tau:.0e}':>7}  ‖V′‖/‖V‖ {row['norm_ratio']:.4f}  "
                f"train loss {fit0['loss']:.5f}→{fit1['loss']:.5f}  "
                f"top-1 {acc0['top1']:.4f}→{acc1['top1']:.4f}  "
                f"tr(H) {m0['trace']:.2f}→{m1['trace']:.2f} (Δ {row['trace_change']:+.3f} ± "
                f"{row['trace_change_stderr']:.3f})  λ1 {m0['top_eig']:.3f}→{m1['top_eig']:.3f}  "
                f"tr(H_VV) {m0['last_trace']:.4f}→{m1['last_trace']:.4f}",
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
                **paired(m0, m_sos),
            }
        )
        print(
            f"s{seed} trained: SGD vs SGD+SOS  top-1 {acc0['top1']:.4f} / {acc_sos['top1']:.4f}  "
            f"‖V‖ {m0['last_norm']:.3f} / {m_sos['last_norm']:.3f}  tr(H) {m0['trace']:.2f} / {m_sos['trace']:.2f}  "
            f"λ1 {m0['top_eig']:.3f} / {m_sos['top_eig']:.3f}  train-batch loss {m0['loss']:.4f} / {m_sos['loss']:.4f}",
            flush=True,
        )
    OUT.write_text(json.dumps({"batch": BATCH, "probes": PROBES, "posthoc": posthoc, "trained": trained}, indent=1))
    print(f"written {OUT}")


if __name__ == "__main__":
    main([int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "0,1,2").split(",")])
