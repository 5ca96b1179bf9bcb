"""The solver against independent computations: SciPy constrained solves, exact projections, Grams."""

import math

import numpy as np
import pytest
import torch
from conftest import low_rank_rows
from scipy.optimize import brentq, minimize

from sos_detect.core.solver import GramAccumulator, default_rtol, output_change, solve_shift


def gram_of(a: torch.Tensor) -> torch.Tensor:
    acc = GramAccumulator(a.shape[1])
    acc.update(a)
    return acc.gram


def rel_out_change(a, v, v_new) -> float:
    a, v, v_new = a.double(), v.double(), v_new.double()
    return float((a @ (v_new - v)).norm() / (a @ v).norm())


CASES = [  # rows, m, rank, noise
    (64, 128, 5, 1e-7),  # measured regime of a YOLOv5s classification head
    (40, 16, 16, 0.0),  # over-determined, full rank
    (10, 32, 10, 0.0),  # under-determined (paper mode)
    (200, 24, 6, 1e-3),  # nearly low rank
]


@pytest.mark.parametrize("rows,m,rank,noise", CASES)
@pytest.mark.parametrize("tau", [0.0, 1e-4, 1e-2, 0.3])
def test_guarantees(rows, m, rank, noise, tau, rng):
    a = low_rank_rows(rows, m, rank, noise, rng)
    v = torch.randn(m, 7, generator=rng, dtype=torch.float64)
    v_new, info = solve_shift(gram_of(a), v, tau=tau)
    measured = rel_out_change(a, v, v_new)
    assert float(v_new.norm()) <= float(v.norm()) * (1 + 1e-12)
    assert info.norm_after == pytest.approx(float(v_new.norm()), rel=1e-9)
    assert info.norm_before == pytest.approx(float(v.norm()), rel=1e-12)
    assert measured == pytest.approx(info.out_change, rel=1e-6, abs=1e-7)
    assert measured <= tau + 1e-6
    if tau == 0.0:
        assert measured < 1e-6


def test_naive_closed_form_increases_norm_but_solver_does_not(rng):
    g = torch.Generator().manual_seed(1)
    a = low_rank_rows(64, 128, 5, 1e-7, g)
    v = torch.randn(128, 20, generator=g, dtype=torch.float64)
    naive = a.T @ torch.linalg.solve(a @ a.T, a @ v)  # the paper's Aᵀ(AAᵀ)⁻¹AV
    v_new, info = solve_shift(gram_of(a), v, tau=0.0)
    assert float(naive.norm()) > 1.5 * float(v.norm())
    assert float(v_new.norm()) < float(v.norm())
    assert info.rank == 5
    assert rel_out_change(a, v, v_new) < 1e-6


def test_tau_zero_is_pseudoinverse_projection(rng):
    a = low_rank_rows(12, 30, 12, 0.0, rng)  # well-conditioned, under-determined
    v = torch.randn(30, 4, generator=rng, dtype=torch.float64)
    v_new, _ = solve_shift(gram_of(a), v, tau=0.0)
    ref = np.linalg.pinv(a.numpy()) @ (a.numpy() @ v.numpy())
    np.testing.assert_allclose(v_new.numpy(), ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("tau", [1e-3, 0.05, 0.2, 0.6])
def test_matches_scipy_constrained_solve(tau, rng):
    """SLSQP on min ‖V'‖² s.t. ‖A(V'−V)‖² ≤ τ²‖AV‖², an independent numerical optimiser.

    Analytic gradients and the constraint divided by its budget: without them SciPy ≥ 1.17's SLSQP stops at its
    iteration limit. Status 8 ("positive directional derivative") is its stop at the optimum to working precision.
    """
    a = low_rank_rows(9, 6, 4, 1e-2, rng).numpy()
    v = torch.randn(6, 3, generator=rng, dtype=torch.float64).numpy()
    budget = tau**2 * np.sum((a @ v) ** 2)
    cons = {
        "type": "ineq",
        "fun": lambda x: 1 - np.sum((a @ (x.reshape(6, 3) - v)) ** 2) / budget,
        "jac": lambda x: -2 / budget * (a.T @ (a @ (x.reshape(6, 3) - v))).ravel(),
    }
    res = minimize(
        lambda x: x @ x, v.ravel(), jac=lambda x: 2 * x, constraints=[cons], method="SLSQP", options={"ftol": 1e-12}
    )
    assert res.success or res.status == 8, res.message
    assert np.sum((a @ (res.x.reshape(6, 3) - v)) ** 2) <= budget * (1 + 1e-6)  # the reference is feasible
    v_new, _ = solve_shift(torch.from_numpy(a.T @ a), torch.from_numpy(v), tau=tau)
    ours = v_new.numpy()
    assert np.sum((a @ (ours - v)) ** 2) <= budget * (1 + 1e-8)  # feasible
    assert np.linalg.norm(ours) <= np.linalg.norm(res.x) * (1 + 1e-7)  # no worse than SLSQP's optimum
    np.testing.assert_allclose(ours, res.x.reshape(6, 3), atol=1e-6)


def test_mu_matches_secular_equation_root(rng):
    """μ from Brent's method on the KKT form V'(μ) = (G+μI)⁻¹GV, independent of the eigenbasis."""
    a = low_rank_rows(50, 10, 10, 0.0, rng).numpy()
    v = np.random.default_rng(0).standard_normal((10, 2))
    g = a.T @ a
    tau = 0.1

    def excess(mu):
        vp = np.linalg.solve(g + mu * np.eye(10), g @ v)
        return np.linalg.norm(a @ (vp - v)) / np.linalg.norm(a @ v) - tau

    mu_ref = brentq(excess, 1e-12, 1e12, xtol=1e-14, rtol=1e-13)
    v_new, info = solve_shift(torch.from_numpy(g), torch.from_numpy(v), tau=tau)
    assert info.mu == pytest.approx(mu_ref, rel=1e-6)
    np.testing.assert_allclose(v_new.numpy(), np.linalg.solve(g + mu_ref * np.eye(10), g @ v), rtol=1e-6)


def test_tau_one_or_more_gives_zero(rng):
    a = low_rank_rows(20, 5, 5, 0.0, rng)
    v = torch.randn(5, 2, generator=rng, dtype=torch.float64)
    v_new, info = solve_shift(gram_of(a), v, tau=1.0)
    assert float(v_new.abs().max()) == 0.0 and info.out_change == pytest.approx(1.0)


def test_float32_keeps_dtype_and_accumulates_in_float64(rng):
    a = low_rank_rows(64, 128, 5, 1e-7, rng, dtype=torch.float32)
    v = torch.randn(128, 20, generator=rng).float()
    acc = GramAccumulator(128)
    acc.update(a)
    assert acc.gram.dtype == torch.float64
    torch.testing.assert_close(acc.gram, a.double().T @ a.double(), rtol=1e-12, atol=1e-12)
    v_new, info = solve_shift(acc.gram, v, tau=1e-4)
    assert v_new.dtype == torch.float32
    assert float(v_new.norm()) < float(v.norm())
    assert rel_out_change(a, v, v_new) == pytest.approx(info.out_change, abs=2e-6)


def test_merge_equals_single_accumulator(rng):
    a = torch.randn(100, 8, generator=rng)
    one, left, right = GramAccumulator(8), GramAccumulator(8), GramAccumulator(8)
    one.update(a)
    left.update(a[:37])
    right.update(a[37:])
    left.merge(right)
    assert left.rows == one.rows == 100
    torch.testing.assert_close(left.gram, one.gram, rtol=1e-12, atol=1e-12)


def test_blocks_of_rows_equal_their_stacked_rows(rng):
    feats = torch.randn(3, 8, 11, generator=rng)  # 3 images' (m, positions) features: blocks as transposed views
    blocks = feats.mT
    acc = GramAccumulator(8)
    acc.update(blocks)
    stacked = np.concatenate([f.numpy().T for f in feats]).astype(np.float64)
    assert acc.rows == 33
    np.testing.assert_allclose(acc.gram.numpy(), stacked.T @ stacked, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.update(torch.full((2, 4, 8), math.nan))


def test_output_change_from_gram_equals_direct(rng):
    a = torch.randn(30, 6, generator=rng, dtype=torch.float64)
    v, w = torch.randn(6, 3, generator=rng, dtype=torch.float64), torch.randn(6, 3, generator=rng, dtype=torch.float64)
    assert output_change(gram_of(a), v, w) == pytest.approx(rel_out_change(a, v, w), rel=1e-10)


def test_apply_equals_matrix(rng):
    a = low_rank_rows(30, 8, 3, 1e-3, rng)
    v = torch.randn(8, 4, generator=rng, dtype=torch.float64)
    v_new, info = solve_shift(gram_of(a), v, tau=0.01)
    torch.testing.assert_close(info.apply(v), v_new)
    torch.testing.assert_close(info.matrix @ v, v_new)


def test_bad_input(rng):
    acc = GramAccumulator(4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.update(torch.tensor([[1.0, math.nan, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="shape"):
        acc.update(torch.ones(3, 5))
    acc.update(torch.randn(10, 4, generator=rng))
    with pytest.raises(ValueError, match=r"V must have shape"):
        solve_shift(acc.gram, torch.ones(5, 2))
    with pytest.raises(ValueError, match="tau"):
        solve_shift(acc.gram, torch.ones(4, 2), tau=-1)
    bad = acc.gram.clone()
    bad[0, 0] = math.inf
    with pytest.raises(ValueError, match="not finite"):
        solve_shift(bad, torch.ones(4, 2))
    with pytest.raises(ValueError, match="zero"):
        solve_shift(torch.zeros(4, 4, dtype=torch.float64), torch.ones(4, 2))
    with pytest.raises(ValueError, match="widths"):
        acc.merge(GramAccumulator(3))


def near_null_case(dtype: torch.dtype, seed: int = 0):
    """Rows whose Gram has 5 strong directions and 59 below the rank tolerance, and a V whose components in those
    59 directions are so large that they carry far more than τ² of the output energy ‖AV‖²."""
    g = torch.Generator().manual_seed(seed)
    m, n = 64, 6
    q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    tiny, big = (1e-11, 1e3) if dtype == torch.float32 else (1e-15, 1e6)
    lam = torch.cat([torch.rand(5, generator=g, dtype=torch.float64) + 0.5, torch.full((m - 5,), tiny)])
    rows = (lam.sqrt()[:, None] * q.T).to(dtype)  # A = diag(√λ) Qᵀ: G = Q diag(λ) Qᵀ
    scale = torch.cat([torch.ones(5), torch.full((m - 5,), big)]).double()
    v = (q @ (scale[:, None] * torch.randn(m, n, generator=g, dtype=torch.float64))).to(dtype)
    return rows, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [1e-7, 1e-4, 1e-3])
def test_budget_holds_when_near_null_directions_carry_the_energy(dtype, tau):
    rows, v = near_null_case(dtype)
    gram = gram_of(rows)
    spec_rtol = default_rtol(64, dtype)
    # the premise: dropping the numerically-zero directions alone would break the budget many times over
    a64, v64 = rows.double(), v.double()
    lam, u = torch.linalg.eigh(gram)
    null = lam <= spec_rtol * lam.max()
    assert int(null.sum()) == 59
    dropped = float((a64 @ (u[:, null] @ (u[:, null].T @ v64))).norm() / (a64 @ v64).norm())
    assert dropped > 2 * tau  # they carry more than τ² of the output energy
    v_new, info = solve_shift(gram, v, tau=tau)
    assert v_new.dtype == dtype  # stored as the layer would store it
    measured = rel_out_change(rows, v, v_new)  # from the rows themselves, float64
    assert info.budget == tau and info.out_change <= tau
    assert measured <= tau * (1 + 1e-3)
    if tau > 100 * torch.finfo(dtype).eps:  # a budget float32 storage can resolve: the shift really shrinks V
        assert float(v_new.double().norm()) < float(v64.norm())
