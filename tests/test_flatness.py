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

from sos_detect.checkpoints import load_detector
from sos_detect.detect.checkpoint import capture_set_for, working_copy
from sos_detect.detect.data import load_data
from sos_detect.detect.embedded import REPO_ROOT
from sos_detect.detect.flatness import detector_params
from sos_detect.detect.plots import head_norm
from sos_detect.detect.shifting import detection_loss_tensor
from sos_detect.hessian import gradients_enabled, hessian_trace

CKPT = REPO_ROOT / "data" / "checkpoints" / "yolov5n-trees.pt"
CPU = torch.device("cpu")


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
    )
    run = tmp_path / "h"
    row = list(csv.DictReader((run / "results.csv").read_text().splitlines()))[0]
    assert all(math.isfinite(float(row[k])) for k in ("sos/trace_head", "sos/trace_all", "sos/head_norm"))
    for name in ("sos_trace.png", "sos_head_norm.png", "sos_shift_loss.png"):
        assert (run / name).stat().st_size > 1000
    # independent recomputation on the saved EMA (fp16 in the checkpoint), same images and probes
    ckpt = load_detector(run / "weights" / "last.pt")
    model = working_copy(ckpt.get("ema") or ckpt["model"], CPU, imgsz=128, batch=8)
    batches = capture_set_for(model, load_data(None)[1]).sample(2, 0)
    params = detector_params(model, "head")
    with gradients_enabled(params):
        est = hessian_trace(lambda: detection_loss_tensor(model, batches, CPU), params, max_probes=4, rtol=0.05)
    assert est.value == pytest.approx(float(row["sos/trace_head"]), rel=0.02, abs=1e-6)
    assert head_norm(model) == pytest.approx(float(row["sos/head_norm"]), rel=2e-3)


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
