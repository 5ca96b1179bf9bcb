"""Flatness on detectors: Hessian logging inside training, the `hessian` command, Figure 2."""

import csv
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_train

from sos_detect.core.hessian import HessianOperator, gradients_enabled, hutchinson
from sos_detect.detect.checkpoints import load_detector
from sos_detect.detect.data import load_data
from sos_detect.detect.detector_shift import detection_loss_tensor
from sos_detect.detect.embedded import REPO_ROOT
from sos_detect.detect.flatness import cls_head_diagonal, detector_params, output_space_diagonal
from sos_detect.detect.heads import detect_head, detect_head_layers
from sos_detect.detect.plots import head_norm
from sos_detect.detect.posthoc import capture_set_for, working_copy

CKPT = REPO_ROOT / "data" / "checkpoints" / "yolov5n-trees.pt"
CPU = torch.device("cpu")


@pytest.mark.slow  # trains
def test_trainer_logs_trace_and_norm_and_plots(tmp_path):
    tiny_train(
        tmp_path,
        "h",
        epochs=1,
        imgsz=128,
        sos_start=0,
        sos_images=8,
        sos_hessian_every=1,
        sos_hessian_images=2,
        sos_hessian_probes=4,
        plots=True,
    )
    run = tmp_path / "h"
    row = {
        k.strip(): float(v) for k, v in list(csv.DictReader((run / "results.csv").read_text().splitlines()))[0].items()
    }
    blocks = ("cls", "box", "head", "all")
    assert all(math.isfinite(row[f"sos/trace_{k}{se}"]) for k in blocks for se in ("", "_se"))
    assert row["sos/trace_cls_se"] == row["sos/trace_box_se"] == row["sos/trace_head_se"] == 0  # exact blocks
    assert row["sos/trace_head"] == pytest.approx(row["sos/trace_cls"] + row["sos/trace_box"], rel=1e-4)
    assert row["sos/trace_all_se"] > 0
    for name in ("sos_trace.png", "sos_head_norm.png", "sos_shift_loss.png"):
        assert (run / name).stat().st_size > 1000
    # independent recomputation on the saved EMA (fp16 in the checkpoint), same images: the cls block's exact
    # trace from unit-vector HVPs, the box block's by Hutchinson
    ckpt = load_detector(run / "weights" / "last.pt")
    model = working_copy(ckpt.get("ema") or ckpt["model"], CPU, imgsz=128, batch=8)
    batches = capture_set_for(model, load_data(None)[1]).sample(2, 0)
    loss_fn = lambda: detection_loss_tensor(model, batches, CPU)  # noqa: E731
    cls = [m.weight for m in detect_head_layers(model, "cls").values()]
    with gradients_enabled(cls):
        op = HessianOperator(loss_fn, cls, block=64)
        exact = float(op.matmat(torch.eye(op.dim)).diagonal().sum())
    assert exact == pytest.approx(row["sos/trace_cls"], rel=0.02)
    box = [m.weight for m in detect_head_layers(model, "box").values()]
    with gradients_enabled(box):
        est = hutchinson(HessianOperator(loss_fn, box, block=16), max_probes=64, rtol=0)
    assert abs(est.value - row["sos/trace_box"]) < 4 * est.stderr + 0.02 * abs(est.value)
    assert head_norm(model) == pytest.approx(row["sos/head_norm"], rel=2e-3)


def tiny_float64_detector(nc: int | None):
    """The shipped YOLOv5n tree detector in float64 on 4 real embedded images at 64 px in batches of 2; with nc,
    its cls convs replaced by fresh nc-class ones, cls gain 1.7 and class weights, the boxes spread over classes."""
    ckpt = load_detector(CKPT)
    model = working_copy(ckpt.get("ema") or ckpt["model"], CPU, imgsz=64, batch=2, **({"cls": 1.7} if nc else {}))
    batches = capture_set_for(model, load_data(None)[1]).sample(4, 0)
    if nc:
        torch.manual_seed(0)
        head = detect_head(model)
        head.nc, head.no = nc, nc + 4 * head.reg_max
        for seq in head.cv3:
            seq[-1] = torch.nn.Conv2d(seq[-1].in_channels, nc, 1)
        model.class_weights = torch.linspace(0.5, 2.0, nc)
        for b in batches:
            b["cls"] = (torch.arange(len(b["cls"])) % nc).float().view(-1, 1)
    return model.double(), batches


@pytest.mark.slow  # unit-vector HVPs of a float64 detector (~5 s each)
@pytest.mark.parametrize("nc", [None, 3])
def test_head_block_diagonals_match_exact_hessian(nc):
    """The cls closed form (full block trace) and the output-space box diagonal (64 sampled entries) against
    unit-vector HVPs of the float64 loss, to 1e-6 relative."""
    model, batches = tiny_float64_detector(nc)
    loss_fn = lambda: detection_loss_tensor(model, batches, CPU)  # noqa: E731
    closed = cls_head_diagonal(model, batches, CPU)
    for kind, sample in (("cls", None), ("box", 64)):
        params = [m.weight for m in detect_head_layers(model, kind).values()]
        diag = torch.cat([d.reshape(-1) for d in output_space_diagonal(model, batches, CPU, kind)])
        with gradients_enabled(params):
            op = HessianOperator(loss_fn, params, block=64)
            idx = torch.arange(op.dim) if sample is None else torch.randperm(op.dim)[:sample]
            unit = torch.zeros(len(idx), op.dim, dtype=torch.float64)
            unit[torch.arange(len(idx)), idx] = 1.0
            exact = op.matmat(unit)[torch.arange(len(idx)), idx]
        torch.testing.assert_close(diag[idx], exact, rtol=1e-6, atol=1e-9 * float(exact.abs().max()))
        if kind == "cls":
            assert float(exact.sum()) > 1e-3  # a real curvature, not the near-zero of saturated logits
            torch.testing.assert_close(torch.cat([d.reshape(-1) for d in closed]), exact, rtol=1e-6, atol=0)
            assert float(sum(d.sum() for d in closed)) == pytest.approx(float(exact.sum()), rel=1e-6)


def power_iteration(loss_fn, params, iters=60):
    """Top eigenvalue by plain power iteration on autograd HVPs (independent of the Lanczos code)."""
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) for p in params]
    lam = 0.0
    for _ in range(iters):
        norm = math.sqrt(sum(float((x * x).sum()) for x in v))
        v = [x / norm for x in v]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        lam = sum(float((h * x).sum()) for h, x in zip(hv, v, strict=True))
        v = [h.detach() for h in hv]
    return lam


@pytest.mark.slow  # a real hessian process
def test_hessian_command_before_after(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "sos_detect.cli",
        "hessian",
        "--weights",
        str(CKPT),
        "--images",
        "2",
        "--k",
        "2",
        "--probes",
        "16",
        "--imgsz",
        "160",
        "--device",
        "cpu",
        "--before-after",
        "--sos-tau",
        "1e-2",
        "--out",
        str(tmp_path),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    found = dict(re.findall(r"^(before|after): loss ([0-9.e+-]+)", res.stdout, re.M))
    eigs = {
        k: [float(x) for x in v.split(",")]
        for k, v in re.findall(r"^(before|after):.*top eigenvalues \[([^\]]+)\]", res.stdout, re.M)
    }
    assert set(found) == set(eigs) == {"before", "after"}
    assert eigs["before"][0] >= eigs["before"][1]
    assert Path(tmp_path / "fig2_top_eigenvalues.png").stat().st_size > 1000
    # independent check of the reported top eigenvalue before the shift
    ckpt = load_detector(CKPT)
    model = working_copy(ckpt.get("ema") or ckpt["model"], CPU, imgsz=160, batch=16)
    batches = capture_set_for(model, load_data(None)[1]).sample(2, 0)
    params = detector_params(model, "head")
    with gradients_enabled(params):
        lam = power_iteration(lambda: detection_loss_tensor(model, batches, CPU), params)
    assert eigs["before"][0] == pytest.approx(lam, rel=0.02)
