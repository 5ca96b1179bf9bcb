"""Trace and eigenvalue estimators and the closed-form block trace against exact Hessians (torch.func.hessian)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from sos_detect.core.hessian import (
    HessianOperator,
    hutchinson,
    hutchpp,
    linear_block_diagonal,
    softmax_cross_entropy_curvature,
    top_eigenvalues,
)


def exact_hessian(model, loss_of_output, x, names):
    """Full Hessian w.r.t. the named parameters, via torch.func on a flat vector."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def f(flat):
        chunks = torch.split(flat, sizes)
        override = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return loss_of_output(functional_call(model, override, (x,)))

    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    return hessian(f)(flat).detach()


@pytest.fixture
def mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 4, (32,))
    ce = lambda out: nn.functional.cross_entropy(out, y)  # noqa: E731
    names = [n for n, _ in model.named_parameters()]
    return model, x, ce, names


def test_hutchinson_within_three_standard_errors(mlp_problem):
    model, x, ce, names = mlp_problem
    h = exact_hessian(model, ce, x, names)
    calls = []
    op = HessianOperator(lambda: ce(model(x)), model.parameters())
    est = hutchinson(op, max_probes=400, rtol=1e-3, seed=1, progress=lambda d, t: calls.append((d, t)))
    assert abs(est.value - float(torch.trace(h))) <= 3 * est.stderr
    assert est.probes == 400 and est.stderr > 0
    assert calls[0] == (1, 400) and calls[-1] == (400, 400)


def test_hutchinson_stops_early_at_rtol(mlp_problem):
    model, x, ce, _ = mlp_problem
    est = hutchinson(HessianOperator(lambda: ce(model(x)), model.parameters()), max_probes=10_000, rtol=0.05)
    assert est.probes < 10_000 and est.stderr < 0.05 * abs(est.value)


def test_hutchpp_unbiased_and_exact_at_full_rank(mlp_problem):
    model, x, ce, names = mlp_problem
    exact = float(torch.trace(exact_hessian(model, ce, x, names)))
    op = HessianOperator(lambda: ce(model(x)), model.parameters())
    est = hutchpp(op, rank=8, max_probes=200, rtol=1e-3, seed=1)
    assert abs(est.value - exact) <= 3 * est.stderr and est.probes == 200
    full = hutchpp(op, rank=op.dim, max_probes=3 * op.dim, rtol=1e-3, seed=2)  # Q spans everything
    assert full.value == pytest.approx(exact, rel=1e-10)


def test_top_eigenvalues_within_one_percent(mlp_problem):
    model, x, ce, names = mlp_problem
    exact = torch.linalg.eigvalsh(exact_hessian(model, ce, x, names)).flip(0)[:3]
    op = HessianOperator(lambda: ce(model(x)), model.parameters())
    got = top_eigenvalues(op, k=3, max_iter=100, tol=1e-6)
    assert got == sorted(got, reverse=True)
    for g, e in zip(got, exact.tolist(), strict=True):
        assert g == pytest.approx(e, rel=1e-2)


def test_last_layer_block_closed_form_is_exact(mlp_problem):
    """diag(H_VV) and tr(H_VV) of the last Linear (weight and bias) under mean softmax CE, to 1e-6 in float64."""
    model, x, ce, _ = mlp_problem
    h = exact_hessian(model, ce, x, ["2.weight", "2.bias"])
    feats = model[1](model[0](x))  # the last layer's inputs
    curv = softmax_cross_entropy_curvature(model(x), scale=1 / len(x))
    diag = linear_block_diagonal(feats, curv, bias=True)  # (4 outputs, 8 inputs + bias)
    exact = torch.cat([h.diagonal()[:32].reshape(4, 8), h.diagonal()[32:, None]], dim=1)
    torch.testing.assert_close(diag, exact, rtol=1e-6, atol=1e-12)
    assert float(diag.sum()) == pytest.approx(float(torch.trace(h)), rel=1e-6)


def test_unused_parameters_are_skipped_and_batchnorm_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)).double()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model.eval()
    unused = nn.Parameter(torch.ones(5, dtype=torch.float64))
    x, y = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    ce = lambda out: nn.functional.cross_entropy(out, y)  # noqa: E731
    names = ["0.weight", "4.weight"]
    params = [dict(model.named_parameters())[n] for n in names] + [unused]
    h = exact_hessian(model, ce, x, names)
    op = HessianOperator(lambda: ce(model(x)), params, block=4)
    assert op.dim == h.shape[0]
    top = top_eigenvalues(op, k=1, tol=1e-8)
    assert top[0] == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-2)
    est = hutchinson(op, max_probes=300, rtol=1e-4)
    assert abs(est.value - float(torch.trace(h))) <= 3 * est.stderr
    torch.testing.assert_close(op.matmat(torch.eye(op.dim)).double(), h)  # batched HVPs are exact


def test_bad_input():
    lin = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="requires_grad"):
        HessianOperator(lambda: lin(torch.ones(1, 2)).sum(), [torch.ones(2)])
    with pytest.raises(ValueError, match="second-order"):
        HessianOperator(lambda: lin(torch.ones(1, 2)).sum(), lin.parameters())  # linear loss: H = 0, no graph
    with pytest.raises(ValueError, match="curvature rows"):
        linear_block_diagonal(torch.ones(3, 2), torch.ones(4, 1))
