"""Layer adapters, capture, optimiser state, rollback and a real network on real data (digits)."""

import copy

import pytest
import torch
from conftest import low_rank_rows
from torch import nn

from sos_detect.classify.digits import load_digits_split, train_digits_mlp
from sos_detect.core.apply import apply_shift, shift_model
from sos_detect.core.capture import GramCapture, as_v, capture_grams, layer_rows
from sos_detect.core.solver import solve_shift


@pytest.fixture(scope="module")
def digits():
    x, y, xt, yt = load_digits_split(seed=0)
    return x, y, xt, yt, train_digits_mlp(x, y, seed=0)


def test_conv1x1_equals_per_position_linear(rng):
    conv = nn.Conv2d(6, 4, 1, stride=2)
    lin = nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.copy_(conv.weight[:, :, 0, 0])
        lin.bias.copy_(conv.bias)
    x = torch.randn(3, 6, 9, 7, generator=rng)
    rows = layer_rows(conv, x).reshape(-1, 6)  # one block per image, stacked
    out = conv(x).permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(rows @ as_v(conv.weight) + conv.bias, out)
    torch.testing.assert_close(lin(rows), out)
    conv_g = capture_grams(conv, [conv], [x])
    lin_g = capture_grams(lin, [lin], [rows])
    assert conv_g["layer0"].rows == rows.shape[0] == 3 * 5 * 4
    torch.testing.assert_close(next(iter(conv_g.values())).gram, next(iter(lin_g.values())).gram)
    # the same shift on both: the conv's outputs change exactly as the Linear's
    rc = shift_model(conv, [conv], [x], tau=0.05, max_change=None)
    rl = shift_model(lin, [lin], [rows], tau=0.05, max_change=None)
    torch.testing.assert_close(conv.weight[:, :, 0, 0], lin.weight)
    assert rc.layers[0].out_change_measured == pytest.approx(rl.layers[0].out_change_measured, rel=1e-6)


def test_paper_mode_draws_requested_rows_and_keeps_outputs_on_them(rng):
    lin = nn.Linear(32, 5).double()
    batches = [low_rank_rows(50, 32, 32, 0.0, rng) for _ in range(4)]
    grams = capture_grams(lin, {"fc": lin}, batches, rows=20, seed=3)
    assert grams["fc"].rows == 20
    assert torch.linalg.matrix_rank(grams["fc"].gram) == 20
    # the sample is uniform over all 200 rows: every batch contributes, and the seed fixes it
    again = capture_grams(lin, {"fc": lin}, batches, rows=20, seed=3)
    torch.testing.assert_close(grams["fc"].gram, again["fc"].gram)
    a = torch.cat(batches)
    w0 = lin.weight.detach().clone()
    report = shift_model(lin, {"fc": lin}, batches, mode="paper", rows=20, max_change=None)
    assert report.applied and report.tau == 0.0 and report.layers[0].rank == 20
    assert report.layers[0].norm_after < report.layers[0].norm_before
    # outputs on the sampled rows are preserved; full-data outputs are not (over-determined overall)
    assert report.layers[0].out_change_measured < 1e-8
    full_change = float((a @ (lin.weight.detach() - w0).T).norm() / (a @ w0.T).norm())
    assert full_change > 1e-2
    # the change on the 180 rows left out of the solve, from the rows themselves: the sampled ones are those whose
    # outputs did not move
    moved = (a @ (lin.weight.detach() - w0).T).norm(dim=1) > 1e-9 * (a @ w0.T).norm(dim=1)
    assert int(moved.sum()) == 180
    off = a[moved]
    direct = float((off @ (lin.weight.detach() - w0).T).norm() / (off @ w0.T).norm())
    assert report.layers[0].out_change_unsampled == pytest.approx(direct, rel=1e-6)
    assert (
        shift_model(lin, {"fc": lin}, batches, tau=1e-3, max_change=None).layers[0].out_change_unsampled is None
    )  # guarded


def test_layer_changes_on_held_out_images_match_the_outputs(rng):
    """layer_inputs + layer_changes: each 1×1 conv's relative output change on images, against its outputs."""
    from sos_detect.detect.detector_shift import layer_changes, layer_inputs

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    layers = {"2": net[2]}
    batches = [{"img": torch.randint(0, 256, (2, 3, 6, 5), generator=rng, dtype=torch.uint8)} for _ in range(3)]
    grams = layer_inputs(net, layers, batches, torch.device("cpu"))
    before = {"2": as_v(net[2].weight.detach()).clone()}
    x = torch.cat([b["img"] for b in batches]).float() / 255
    with torch.no_grad():
        y0 = net(x) - net[2].bias[:, None, None]
        net[2].weight.mul_(1.1).add_(0.01)
        y1 = net(x) - net[2].bias[:, None, None]
    assert layer_changes(layers, grams, before)["2"] == pytest.approx(float((y1 - y0).norm() / y0.norm()), rel=1e-4)


def test_capture_restores_modes_also_on_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.train()
    model[1].eval()  # a mixed state must come back as it was
    with pytest.raises(RuntimeError):
        capture_grams(model, [model[2]], [torch.randn(3, 5)])
    assert model.training and model[0].training and not model[1].training and model[2].training
    before = model[1].running_mean.clone()
    capture_grams(model, [model[2]], [torch.randn(8, 4)])
    torch.testing.assert_close(model[1].running_mean, before)  # eval mode: BN statistics untouched


@pytest.mark.parametrize("opt_cls,key", [(torch.optim.SGD, "momentum_buffer"), (torch.optim.Adam, "exp_avg")])
def test_optimizer_first_moment_is_mapped(opt_cls, key, rng):
    lin = nn.Linear(16, 3)
    kwargs = {"momentum": 0.9} if opt_cls is torch.optim.SGD else {}
    opt = opt_cls(lin.parameters(), lr=0.01, **kwargs)
    x = low_rank_rows(40, 16, 4, 1e-4, rng, dtype=torch.float32)
    for _ in range(3):
        opt.zero_grad()
        lin(x).square().mean().backward()
        opt.step()
    state = opt.state[lin.weight]
    buf_before = state[key].clone()
    second = state.get("exp_avg_sq")
    second_before = second.clone() if second is not None else None
    grams = capture_grams(lin, [lin], [x])
    v_new, info = solve_shift(grams["layer0"].gram, as_v(lin.weight.detach()), tau=0.01)
    apply_shift(lin, v_new, optimizer=opt, info=info)
    expected = (info.matrix.float() @ buf_before.T).T
    torch.testing.assert_close(state[key], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lin.weight.T, v_new)
    if second_before is not None:
        assert torch.equal(second, second_before)


def test_weight_is_written_in_place(rng):
    lin = nn.Linear(8, 2)
    param, data_ptr = lin.weight, lin.weight.data_ptr()
    shift_model(lin, [lin], [torch.randn(20, 8, generator=rng)], tau=0.1, max_change=None)
    assert lin.weight is param and lin.weight.data_ptr() == data_ptr


def test_rollback_is_bit_exact(rng):
    lin = nn.Linear(16, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(40, 16, generator=rng)
    opt.zero_grad()
    lin(x).square().mean().backward()
    opt.step()
    w, buf = lin.weight.detach().clone(), opt.state[lin.weight]["momentum_buffer"].clone()
    y = lin(x).detach()  # the loss is 0 now: any output change raises it
    loss = lambda m: float((m(x) - y).square().mean().detach())  # noqa: E731
    report = shift_model(lin, [lin], [x], tau=0.5, optimizer=opt, loss_fn=loss, loss_tol=0.0, max_change=None)
    assert not report.applied and "loss_tol" in report.reason
    assert report.loss_after > report.loss_before
    assert torch.equal(lin.weight, w)
    assert torch.equal(opt.state[lin.weight]["momentum_buffer"], buf)


@pytest.mark.slow  # the `digits` fixture trains an MLP
def test_digits_mlp_guarded_shift(digits):
    """Real network, real data: full-training-set guarded shift of the last layer with τ = 1e-4."""
    x, y, xt, yt, trained = digits
    model = copy.deepcopy(trained)
    ce = nn.functional.cross_entropy
    with torch.no_grad():
        loss0, acc0 = float(ce(model(x), y)), (model(xt).argmax(1) == yt).float().mean()
    report = shift_model(model, {"fc": model[5]}, x.split(256), tau=1e-4, max_change=None)
    with torch.no_grad():
        loss1, acc1 = float(ce(model(x), y)), (model(xt).argmax(1) == yt).float().mean()
    r = report.layers[0]
    assert report.applied and r.rows == len(x)
    assert r.norm_after < r.norm_before
    assert r.norm_after == pytest.approx(float(model[5].weight.detach().norm()), rel=1e-6)
    assert r.out_change_measured <= 1e-4 * (1 + 1e-3)
    # measured output change on the real outputs, computed directly from the features
    with torch.no_grad():
        feats = model[:5](x).double()
    w0 = trained[5].weight.detach().double()
    direct = float((feats @ (model[5].weight.detach().double() - w0).T).norm() / (feats @ w0.T).norm())
    assert direct == pytest.approx(r.out_change_measured, rel=1e-3, abs=1e-7)
    assert abs(loss1 - loss0) / loss0 <= 1e-3
    assert acc1 == acc0


def test_bad_input(rng):
    lin = nn.Linear(4, 2)
    with pytest.raises(TypeError, match="Conv2d with kernel"):
        shift_model(lin, [nn.Conv2d(3, 3, 3)], [torch.randn(2, 4)], max_change=None)
    with pytest.raises(TypeError, match="grouped"):
        shift_model(lin, [nn.Conv2d(4, 4, 1, groups=2)], [torch.randn(2, 4)], max_change=None)
    with pytest.raises(TypeError, match="BatchNorm1d cannot be shifted"):
        shift_model(lin, [nn.BatchNorm1d(4)], [torch.randn(2, 4)], max_change=None)
    with pytest.raises(ValueError, match="needs sos_rows"):
        shift_model(lin, [lin], [torch.randn(2, 4)], mode="paper", max_change=None)
    with pytest.raises(ValueError, match="tau"):
        shift_model(lin, [lin], [torch.randn(2, 4)], tau=-1, max_change=None)
    with pytest.raises(ValueError, match="sos_mode=exact: must be one of"):
        shift_model(lin, [lin], [torch.randn(2, 4)], mode="exact", max_change=None)
    with pytest.raises(ValueError, match="NaN or Inf"):
        shift_model(lin, [lin], [torch.full((2, 4), float("nan"))], max_change=None)
    with pytest.raises(ValueError, match="shape"):
        apply_shift(lin, torch.zeros(5, 2))
    unused = nn.Linear(4, 2)
    w = unused.weight.detach().clone()
    with pytest.raises(ValueError, match="no input rows"):
        shift_model(lin, {"unused": unused}, [torch.randn(2, 4)], max_change=None)
    assert torch.equal(unused.weight, w)


def test_gram_capture_in_training_passes_under_autocast_skips_nonfinite_batches(rng):
    """Hooks in a train-mode forward + backward under bf16 autocast: the Gram is the float64 AᵀA of the bf16 inputs
    the layer really received; a batch with an Inf is left out and counted; nothing is captured once stopped."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))  # no BN: it runs in fp32
    head = model[2]
    received = []
    probe = head.register_forward_hook(lambda m, inp, out: received.append(inp[0].detach().clone()))
    capture = GramCapture({"head": head}, skip_nonfinite=True)
    model.train()
    with capture:
        for i in range(3):
            x = torch.randn(2, 3, 5, 5, generator=rng)
            if i == 1:
                x[0, 0, 0, 0] = float("inf")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            out.float().square().mean().backward()
    model(torch.randn(2, 3, 5, 5, generator=rng))  # after stop: not captured
    probe.remove()
    assert len(received) == 4 and all(r.dtype == torch.bfloat16 for r in received[:3])
    assert capture.skipped["head"] == 1 and capture.images == 4
    kept = [r for r in received[:3] if torch.isfinite(r).all()]
    expected = sum(r.double().permute(0, 2, 3, 1).reshape(-1, 8).T @ r.double().permute(0, 2, 3, 1).reshape(-1, 8)
                   for r in kept)  # fmt: skip
    torch.testing.assert_close(capture.full["head"].gram, expected, rtol=1e-12, atol=1e-12)
    assert capture.full["head"].rows == 2 * 2 * 25
    limited = GramCapture({"head": head}, max_images=3)
    with limited, torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 3, 5, 5, generator=rng))
    assert limited.images == 4  # batches are taken whole until the limit is reached
