"""Matrix sensing testbed: exact optimum shifting of W_L, exact Hessian diagnostics, the trainers' steps against
their definitions, and `reproduce sensing` end to end with its statistics recomputed here."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from sos_detect.core.hessian import HessianOperator, hutchpp, top_eigenvalues
from sos_detect.sensing.compare import reproduce_sensing
from sos_detect.sensing.diagnostics import diagnose
from sos_detect.sensing.problem import SensingConfig, SensingProblem, measure, product
from sos_detect.sensing.shifting import last_factor_rows, shift_last_factor
from sos_detect.sensing.trainers import Method, TrainSettings, train


def setup(d=6, r=2, n=20, depth=3, init=0.6, seed=0):
    problem = SensingProblem.generate(SensingConfig(d=d, r=r, n=n, depth=depth, init=init), seed)
    return problem, problem.initial_factors(seed)


def autograd_grads(problem, factors):
    params = [w.detach().clone().requires_grad_(True) for w in factors]
    return torch.autograd.grad(problem.loss(params), params)


def test_problem_is_rank_r_and_underdetermined():
    problem, _ = setup(d=8, r=3, n=40)
    assert torch.linalg.matrix_rank(problem.x_star) == 3 and problem.a.shape == (40, 8, 8)
    assert torch.allclose(problem.y, torch.einsum("nij,ij->n", problem.a, problem.x_star))
    with pytest.raises(ValueError, match="n < d²"):
        SensingConfig(d=4, r=1, n=16, depth=2)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_closed_form_gradients_equal_autograd(depth):
    problem, factors = setup(depth=depth)
    loss, grads = problem.loss_and_grads(factors)
    assert float(loss) == pytest.approx(float(problem.loss(factors)), rel=1e-14)
    for g, ref in zip(grads, autograd_grads(problem, factors), strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("depth,tau", [(2, 0.0), (3, 0.0), (3, 1e-2)])
def test_shift_keeps_measurements_and_never_raises_last_norm(depth, tau):
    problem, factors = setup(depth=depth)
    before = measure(problem.a, product(factors))
    w_before = factors[-1].clone()
    info = shift_last_factor(problem, factors, tau=tau)
    after = measure(problem.a, product(factors))
    assert torch.linalg.norm(factors[-1]) <= torch.linalg.norm(w_before)
    assert float(torch.linalg.norm(factors[-1])) == pytest.approx(info.norm_after, rel=1e-10)
    if tau == 0:
        assert float((after - before).abs().max()) <= 1e-8
        # independent: the minimum-norm solution of R w = R w_L is the projection pinv(R) R w_L
        rows = last_factor_rows(problem, factors)
        expected = torch.linalg.pinv(rows) @ (rows @ w_before.reshape(-1))
        torch.testing.assert_close(factors[-1].reshape(-1), expected, rtol=0, atol=1e-10)
        assert info.norm_after < 0.9 * info.norm_before  # n = 20 of d² = 36 directions constrained
    else:
        change = float(torch.linalg.norm(after - before) / torch.linalg.norm(before))
        assert change <= tau * (1 + 1e-9) and change == pytest.approx(info.out_change, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(factors[:-1], setup(depth=depth)[1][:-1], strict=True))


def test_shift_during_training_after_every_kth_step():
    problem, init = setup(depth=2, init=0.3)
    settings = TrainSettings(steps=20, lr=0.1, shift_every=10)
    shifted = train(problem, init, Method("os", "os", 0.0), settings)
    # by hand: 10 GD steps, shift, 10 GD steps, shift
    manual = [w.clone() for w in init]
    for _ in range(2):
        manual = train(problem, manual, Method("gd", "gd"), TrainSettings(steps=10, lr=0.1))
        shift_last_factor(problem, manual)
    for a, b in zip(shifted, manual, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_exact_trace_matches_closed_form_and_hutchinson():
    problem, factors = setup(depth=3, init=0.8)
    diag = diagnose(problem, factors)
    # X is linear in each entry of each factor, so diag(∇²L) = (1/n) Σ_i (∂⟨A_i, X⟩/∂θ)²: tr(H) in closed form
    ws, n = factors, problem.a.shape[0]
    closed = 0.0
    for j in range(len(ws)):
        above = product(ws[j + 1 :]) if j + 1 < len(ws) else torch.eye(6, dtype=torch.float64)
        below = product(ws[:j]) if j > 0 else torch.eye(6, dtype=torch.float64)
        closed += float(sum(torch.linalg.norm(above.T @ a @ below.T) ** 2 for a in problem.a)) / n
    assert diag.trace == pytest.approx(closed, rel=1e-10)
    params = [w.clone().requires_grad_(True) for w in factors]
    op = HessianOperator(lambda: problem.loss(params), params)
    est = hutchpp(op, max_probes=300, rtol=1e-3, seed=3)
    assert abs(est.value - diag.trace) <= 3 * est.stderr + 1e-9 * diag.trace and est.stderr < 0.1 * diag.trace
    assert diag.lambda_max == pytest.approx(top_eigenvalues(op, tol=1e-8)[0], 1e-4)
    assert diag.nuclear == pytest.approx(float(torch.linalg.svdvals(product(factors)).sum()), rel=1e-12)
    assert diag.test_error == pytest.approx(
        float(torch.linalg.norm(product(factors) - problem.x_star) / torch.linalg.norm(problem.x_star)), rel=1e-12
    )


def test_nso_noise_and_sam_steps_equal_their_definitions():
    problem, init = setup(depth=2, init=0.5)
    settings = TrainSettings(steps=1, lr=0.1, perturbations=3)
    seed, sigma, rho = 7, 0.05, 0.1
    gen = torch.Generator().manual_seed(20_000 + seed)  # the trainers' noise stream for this seed
    # (NSO draws float32 normals cast to the parameters' dtype; noise injection draws them the same way)

    def shifted(sign, us):
        return [w + sign * u for w, u in zip(init, us, strict=True)]

    # NSO: W − lr·(1/2m) Σ_i [∇L(W + U_i) + ∇L(W − U_i)], U_i ~ N(0, σ²I)
    total = [torch.zeros_like(w) for w in init]
    for _ in range(3):
        us = [torch.randn(w.shape, generator=gen).to(w) * sigma for w in init]
        for sign in (1, -1):
            total = [t + g for t, g in zip(total, autograd_grads(problem, shifted(sign, us)), strict=True)]
    expected = [w - 0.1 * t / 6 for w, t in zip(init, total, strict=True)]
    got = train(problem, init, Method("nso", "nso", sigma), settings, seed)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)

    # noise injection: the same gradient budget, 2m one-sided draws
    gen = torch.Generator().manual_seed(20_000 + seed)
    total = [torch.zeros_like(w) for w in init]
    for _ in range(6):
        us = [torch.randn(w.shape, generator=gen).to(w) * sigma for w in init]
        total = [t + g for t, g in zip(total, autograd_grads(problem, shifted(1, us)), strict=True)]
    expected = [w - 0.1 * t / 6 for w, t in zip(init, total, strict=True)]
    for a, b in zip(train(problem, init, Method("noise", "noise", sigma), settings, seed), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)

    # SAM: W − lr·∇L(W + ρ g/‖g‖)
    g = autograd_grads(problem, init)
    norm = torch.sqrt(sum((x * x).sum() for x in g))
    g_adv = autograd_grads(problem, shifted(1, [rho * x / norm for x in g]))
    expected = [w - 0.1 * x for w, x in zip(init, g_adv, strict=True)]
    for a, b in zip(train(problem, init, Method("sam", "sam", rho), settings, seed), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.slow  # a real reproduce process
def test_reproduce_sensing_end_to_end(tmp_path):
    cmd = [sys.executable, "-m", "sos_detect.cli", "reproduce", "sensing", "--preset", "tiny", "--seeds", "0,1,2"]
    res = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    runs = list(csv.DictReader((tmp_path / "runs.csv").read_text().splitlines()))
    rows = list(csv.DictReader((tmp_path / "sensing.csv").read_text().splitlines()))
    table = {(r["method"], r["baseline"]): r for r in rows}
    methods = ["gd", "gd+os", "gd+os_tau", "gd+noise", "nso", "sam", "posthoc_os", "posthoc_os_tau"]
    assert list(table) == [(m, "gd") for m in methods] + [("nso", "gd+noise")] and len(runs) == 3 * len(methods)
    per = {(r["method"], int(r["seed"])): r for r in runs}
    for m in methods:
        for key in ("test_error", "trace", "nuclear", "train_loss"):
            x = np.array([float(per[(m, s)][key]) for s in (0, 1, 2)])
            assert float(table[(m, "gd")][f"{key}_mean"]) == pytest.approx(x.mean(), rel=1e-12)
            assert float(table[(m, "gd")][f"{key}_std"]) == pytest.approx(x.std(ddof=1), rel=1e-9, abs=1e-300)
    # paired differences and their 95 % t-intervals, recomputed with scipy from the per-run records
    for m, base in [(m, "gd") for m in methods[1:]] + [("nso", "gd+noise")]:
        row = table[(m, base)]
        for key in ("test_error", "trace", "nuclear", "train_loss"):
            d = np.array([float(per[(m, s)][key]) - float(per[(base, s)][key]) for s in (0, 1, 2)])
            lo, hi = stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d)) if d.std() > 0 else (d[0], d[0])
            assert float(row[f"d_{key}_mean"]) == pytest.approx(d.mean(), abs=1e-15)
            assert float(row[f"d_{key}_lo"]) == pytest.approx(lo, rel=1e-9, abs=1e-15)
            assert float(row[f"d_{key}_hi"]) == pytest.approx(hi, rel=1e-9, abs=1e-15)
            assert int(row[f"d_{key}_lower"]) == int((d < 0).sum())
    # Pearson r over all runs, pooled and with each seed's mean removed
    corr = {(c["x"], c["y"]): c for c in csv.DictReader((tmp_path / "correlations.csv").read_text().splitlines())}
    x, y = (np.array([float(r[k]) for r in runs]) for k in ("trace", "nuclear"))
    seed = np.array([int(r["seed"]) for r in runs])
    xc, yc = (v - np.array([v[seed == s].mean() for s in seed]) for v in (x, y))
    assert float(corr[("trace", "nuclear")]["pooled_r"]) == pytest.approx(stats.pearsonr(x, y)[0], rel=1e-9)
    assert float(corr[("trace", "nuclear")]["within_seed_r"]) == pytest.approx(stats.pearsonr(xc, yc)[0], rel=1e-9)
    # post-hoc τ = 0 keeps the GD solution's training loss: the measurements are kept exactly
    for s in (0, 1, 2):
        assert float(per[("posthoc_os", s)]["train_loss"]) == pytest.approx(float(per[("gd", s)]["train_loss"]), 1e-6)
        assert float(per[("posthoc_os", s)]["last_norm"]) <= float(per[("gd", s)]["last_norm"])
    tuning = list(csv.DictReader((tmp_path / "tuning.csv").read_text().splitlines()))
    for m in ("gd+noise", "nso", "sam", "gd+os_tau", "posthoc_os_tau"):
        trials = [t for t in tuning if t["method"] == m]
        best = min(trials, key=lambda t: float(t["test_error"]))
        assert float(table[(m, "gd")]["value"]) == float(best["value"]) and best["chosen"] == "True"
    md = (tmp_path / "sensing.md").read_text()
    assert "## d5_r1_n12_L2_a0.1" in md and "within-seed r" in md and (tmp_path / "sensing.png").stat().st_size > 0

    # a rerun reads the finished case back; other seeds in the same folder are refused, naming the file
    saved = tmp_path / "runs" / "d5_r1_n12_L2_a0.1.json"
    stamp = saved.stat().st_mtime_ns
    reproduce_sensing("tiny", tmp_path, [0, 1, 2])
    assert saved.stat().st_mtime_ns == stamp and json.loads(saved.read_text())["key"]["seeds"] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"a finished run with other settings \(seeds \[0, 1, 2\] → \[0, 1\]\)") as err:
        reproduce_sensing("tiny", tmp_path, [0, 1])
    assert str(err.value).startswith(str(saved))
