"""Two real processes under torch.distributed (gloo, CPU): every rank ends with identical shifted tensors, for the
eval-pass capture and for the training-pass capture (Grams summed over ranks, rank 0's result broadcast)."""

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.slow  # two real processes under torch.distributed

WORKER = textwrap.dedent(
    """
    import copy
    import sys
    from pathlib import Path

    from sos_detect.core.runtime import configure

    configure(1)
    import torch
    import torch.distributed as dist
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from sos_detect.detect.data import load_data
    from sos_detect.detect.heads import detect_head_layers
    from sos_detect.core.apply import shift_targets
    from sos_detect.core.capture import GramCapture
    from sos_detect.core.options import ShiftConfig
    from sos_detect.detect.detector_shift import build_capture_set, shift_detector

    out = Path(sys.argv[1])
    world = int(sys.argv[2])
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=1, verbose=False)
    heads = detect_head_layers(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p) * 1e-3
    opt.step()
    g = torch.Generator().manual_seed(100 + rank)  # rank-dependent momentum: only a broadcast makes it agree
    for m in heads.values():
        opt.state[m.weight]["momentum_buffer"].add_(torch.randn(m.weight.shape, generator=g))
    _, data = load_data(None)
    capture = build_capture_set(get_cfg(overrides={"imgsz": 128, "task": "detect"}), data, 32, 4)
    batches = capture.sample(8, seed=0, rank=rank, world_size=world)
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.data.mul_(0.99)  # an EMA that differs from the model
    config = ShiftConfig(tau=1e-3, max_change=None)
    report = shift_detector(model, batches, config, device=torch.device("cpu"), optimizer=opt)
    # the training-pass path: hooks on this rank's forward passes, Grams summed over ranks, model and EMA shifted
    capture = GramCapture(detect_head_layers(ema), skip_nonfinite=True)
    ema.eval()  # eval-mode BN: per-image features do not depend on how the images are split across ranks
    with torch.no_grad(), capture:
        for b in batches:
            ema(b["img"].float() / 255)
    ema_copy = copy.deepcopy(ema)
    targets = {"ema": (detect_head_layers(ema), ema, None), "copy": (detect_head_layers(ema_copy), ema_copy, None)}
    reports = shift_targets(capture, targets, config)
    torch.save(
        {
            "weights": {n: m.weight.detach().clone() for n, m in heads.items()},
            "momentum": {n: opt.state[m.weight]["momentum_buffer"].clone() for n, m in heads.items()},
            "ema": {n: m.weight.detach().clone() for n, m in detect_head_layers(ema).items()},
            "rows": {r.name: r.rows for r in report.layers},
            "train_rows": {r.name: r.rows for r in reports["ema"].layers},
            "applied": all(r.applied for r in reports.values()),
            "images": sum(b["img"].shape[0] for b in batches),
        },
        out / f"rank{rank}_of{world}.pt",
    )
    if world > 1:
        dist.destroy_process_group()
    """
)


def test_two_process_gloo_shift_is_identical_on_both_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path),
        "2",
    ]
    # one process first: whatever it writes on first use (label caches, settings) exists before two ranks start
    for args in ([sys.executable, str(script), str(tmp_path), "1"], cmd):
        res = subprocess.run(args, timeout=300, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}_of2.pt") for r in (0, 1))
    single = torch.load(tmp_path / "rank0_of1.pt")
    assert r0["images"] == r1["images"] == 4  # each rank captured its own half of the 8 images
    for name in r0["weights"]:
        assert torch.equal(r0["weights"][name], r1["weights"][name])
        assert torch.equal(r0["momentum"][name], r1["momentum"][name])
        # the Gram is all-reduced: same rows as one process over all 8 images, and the same solution
        assert r0["rows"][name] == single["rows"][name]
        torch.testing.assert_close(r0["weights"][name], single["weights"][name], rtol=1e-4, atol=1e-6)
        # training-pass path: identical on both ranks, the same rows and result as one process
        assert torch.equal(r0["ema"][name], r1["ema"][name])
        assert r0["train_rows"][name] == single["train_rows"][name]
        torch.testing.assert_close(r0["ema"][name], single["ema"][name], rtol=1e-4, atol=1e-6)
    assert r0["applied"] and r1["applied"] and single["applied"]
