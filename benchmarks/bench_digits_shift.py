"""Optimum shifting of a trained MLP's last layer on real data (scikit-learn digits), every mode side by side.

Guarded τ ∈ {0, 1e-4, 1e-3, 1e-2} over the full training set and paper mode with b ∈ {16, 64} sampled rows
(the last layer is 64 wide). Reports the last-layer norm before/after, the full-training-set loss change
and test accuracy.
Writes benchmarks/results/bench_digits_shift.json. Run: python benchmarks/bench_digits_shift.py
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from sos_detect.core.runtime import configure

configure()
import torch  # noqa: E402
from torch import nn  # noqa: E402

from sos_detect.classify.digits import load_digits_split, train_digits_mlp  # noqa: E402
from sos_detect.core.apply import shift_model  # noqa: E402

SETTINGS = [("guarded", t, None) for t in (0.0, 1e-4, 1e-3, 1e-2)] + [("paper", 0.0, b) for b in (16, 64)]


def main() -> None:
    x, y, xt, yt = load_digits_split(seed=0)
    trained = train_digits_mlp(x, y, seed=0)
    ce = nn.functional.cross_entropy
    rows = []
    for mode, tau, b in SETTINGS:
        model = copy.deepcopy(trained)
        with torch.no_grad():
            loss0, acc0 = float(ce(model(x), y)), float((model(xt).argmax(1) == yt).float().mean())
        report = shift_model(model, {"fc": model[5]}, x.split(256), mode=mode, tau=tau, rows=b, max_change=None, seed=0)
        with torch.no_grad():
            loss1, acc1 = float(ce(model(x), y)), float((model(xt).argmax(1) == yt).float().mean())
        r = report.layers[0]
        rows.append(
            {
                "mode": mode,
                "tau": tau,
                "rows": r.rows,
                "rank": r.rank,
                "norm_before": r.norm_before,
                "norm_after": r.norm_after,
                "train_loss_before": loss0,
                "train_loss_after": loss1,
                "train_loss_rel_change": (loss1 - loss0) / loss0,
                "test_acc_before": acc0,
                "test_acc_after": acc1,
                "out_change_on_capture": r.out_change_measured,
            }
        )
    print(
        f"{'mode':<8} {'tau':>7} {'rows':>5} {'rank':>4} {'‖V‖':>8} {'‖V′‖':>8} {'train loss':>11} "
        f"{'Δloss rel':>10} {'test acc':>15}"
    )
    for r in rows:
        print(
            f"{r['mode']:<8} {r['tau']:>7.0e} {r['rows']:>5} {r['rank']:>4} {r['norm_before']:>8.4f} "
            f"{r['norm_after']:>8.4f} {r['train_loss_after']:>11.3e} {r['train_loss_rel_change']:>+10.2%} "
            f"{r['test_acc_before']:.4f}->{r['test_acc_after']:.4f}"
        )
    out = Path(__file__).parent / "results" / "bench_digits_shift.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
