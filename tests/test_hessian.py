"""Trace and eigenvalue estimators against exact Hessians (torch.func.hessian) of small models."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from sos_detect.hessian import hessian_trace, top_eigenvalues


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


def test_trace_within_three_standard_errors(mlp_problem):
    model, x, ce, names = mlp_problem
    h = exact_hessian(model, ce, x, names)
    est = hessian_trace(lambda: ce(model(x)), model.parameters(), max_probes=400, rtol=1e-3, seed=1)
    assert abs(est.value - float(torch.trace(h))) <= 3 * est.stderr
    assert est.probes == 400 and est.stderr > 0


def test_trace_stops_early_at_rtol(mlp_problem):
    model, x, ce, _ = mlp_problem
    est = hessian_trace(lambda: ce(model(x)), model.parameters(), max_probes=10_000, rtol=0.05)
    assert est.probes < 10_000 and est.stderr < 0.05 * abs(est.value)


def test_top_eigenvalues_within_one_percent(mlp_problem):
    model, x, ce, names = mlp_problem
    exact = torch.linalg.eigvalsh(exact_hessian(model, ce, x, names)).flip(0)[:3]
    got = top_eigenvalues(lambda: ce(model(x)), model.parameters(), k=3, max_iter=100, tol=1e-6)
    assert got == sorted(got, reverse=True)
    for g, e in zip(got, exact.tolist(), strict=True):
        assert g == pytest.approx(e, rel=1e-2)


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
    top = top_eigenvalues(lambda: ce(model(x)), params, k=1, tol=1e-8)
    assert top[0] == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-2)
    est = hessian_trace(lambda: ce(model(x)), params, max_probes=300, rtol=1e-4)
    assert abs(est.value - float(torch.trace(h))) <= 3 * est.stderr


def test_bad_input():
    lin = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="requires_grad"):
        hessian_trace(lambda: lin(torch.ones(1, 2)).sum(), [torch.ones(2)])
    with pytest.raises(ValueError, match="second-order"):
        hessian_trace(lambda: lin(torch.ones(1, 2)).sum(), lin.parameters())  # linear loss: H = 0, no graph
