"""Classification companion: SAM and NSO against their definitions, each scheme on digits, SOS in the loop."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sos_detect.classify.data import read_idx
from sos_detect.classify.optim import NSO, SAM
from sos_detect.classify.train import TrainConfig, train


def quadratic():
    torch.manual_seed(0)
    a = torch.randn(4, 4, dtype=torch.float64)
    q, b = a @ a.T + torch.eye(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    return q, b, lambda w: 0.5 * w @ q @ w - b @ w, lambda w: q @ w - b  # loss, exact gradient


def closure_for(opt, loss, w):
    def closure():
        opt.zero_grad()
        value = loss(w)
        value.backward()
        return value

    return closure


def test_sam_step_equals_definition():
    q, b, loss, grad = quadratic()
    w0 = torch.randn(4, dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    opt = SAM([w], torch.optim.SGD, rho=0.1, lr=0.05)

    opt.step(closure_for(opt, loss, w))
    g = grad(w0)
    expected = w0 - 0.05 * grad(w0 + 0.1 * g / g.norm())
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)


def test_asam_step_equals_definition():
    q, b, loss, grad = quadratic()
    w0 = torch.randn(4, dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    opt = SAM([w], torch.optim.SGD, rho=0.1, adaptive=True, lr=0.05)

    opt.step(closure_for(opt, loss, w))
    g, t = grad(w0), w0.abs()
    expected = w0 - 0.05 * grad(w0 + 0.1 * t * t * g / (t * g).norm())
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)


def test_nso_update_is_the_mean_gradient_at_w_plus_minus_u():
    q, b, loss, grad = quadratic()
    w0 = torch.randn(4, dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    opt = NSO([w], torch.optim.SGD, sigma=0.3, num_perturbations=2, generator=torch.Generator().manual_seed(7), lr=0.05)

    opt.step(closure_for(opt, loss, w))
    gen = torch.Generator().manual_seed(7)
    us = [torch.randn(4, generator=gen).double() * 0.3 for _ in range(2)]
    mean_grad = sum(grad(w0 + u) + grad(w0 - u) for u in us) / 4
    torch.testing.assert_close(w.detach(), w0 - 0.05 * mean_grad, rtol=1e-12, atol=1e-12)


def digits_cfg(tmp_path, **kw):
    base = dict(model="mlp", data="digits", epochs=3, batch_size=64, lr=0.05, weight_decay=0.0, out=str(tmp_path))
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("optimizer", ["sgd", "sam", "nso"])
def test_each_scheme_trains_on_digits(tmp_path, optimizer):
    result = train(digits_cfg(tmp_path, optimizer=optimizer, sigma=0.005))
    assert len(result["rows"]) == 3
    assert result["final"]["test_top1"] > 0.8
    assert (tmp_path / "log.csv").is_file() and (tmp_path / "model.pt").is_file()


@pytest.mark.parametrize("mode", ["guarded", "paper"])
def test_sos_in_the_loop_lowers_last_norm_with_bounded_loss(tmp_path, mode):
    cfg = digits_cfg(tmp_path, sos=True, sos_mode=mode, sos_batch=32, sos_samples=1024, sos_tau=1e-3, epochs=4)
    result = train(cfg)
    entries = [json.loads(x) for x in (tmp_path / "sos_log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in entries] == [1, 2, 3, 4] and all(e["applied"] for e in entries)
    for e in entries:
        layer = e["layers"][0]
        assert layer["norm_after"] < layer["norm_before"]
        if mode == "guarded":  # the budget τ bounds the output change, hence the loss change, on the capture set
            assert abs(e["loss_after"] - e["loss_before"]) <= 5e-3 * e["loss_before"]
        else:  # τ = 0 on b = 32 < 64 sampled rows: outputs on them are kept, so is their loss
            assert e["loss_after"] == pytest.approx(e["loss_before"], rel=1e-4)
    # the logged norm is the model's final-layer norm after the shift
    final = torch.load(tmp_path / "model.pt")["model"]["5.weight"]
    assert result["final"]["last_norm"] == pytest.approx(float(final.norm()), rel=1e-6)


class InterruptAt(torch.utils.data.Dataset):
    """Delegates to a dataset and raises KeyboardInterrupt (a user's Ctrl-C) when its n-th item is read."""

    def __init__(self, ds, n):
        self.ds, self.n, self.read = ds, n, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.read += 1
        if self.read == self.n:
            raise KeyboardInterrupt
        return self.ds[i]


def without_seconds(rows):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    from dataclasses import replace

    from sos_detect.classify.data import load_classification_data

    # NSO noise, Mixup, shuffling and SOS sampling all draw random numbers: each stream must be restored
    kw = dict(optimizer="nso", sigma=0.005, mixup=0.2, sos=True, sos_mode="paper", sos_batch=32)
    straight = train(digits_cfg(tmp_path / "straight", **kw))
    cfg = digits_cfg(tmp_path / "resumed", **kw)
    data = load_classification_data("digits")
    cut = replace(data, train=InterruptAt(data.train, int(1.5 * len(data.train))))  # in the middle of epoch 2
    with pytest.raises(KeyboardInterrupt):
        train(cfg, cut)
    saved = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert [r["epoch"] for r in saved["rows"]] == [1]

    with pytest.raises(ValueError, match=r"last\.pt.*lr 0\.05 → 0\.1"):
        train(replace(cfg, lr=0.1))  # other settings are refused, nothing is touched
    resumed = train(cfg)
    assert without_seconds(resumed["rows"]) == without_seconds(straight["rows"])
    a = torch.load(tmp_path / "straight" / "model.pt")["model"]
    b = torch.load(tmp_path / "resumed" / "model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [
        without_seconds([json.loads(x) for x in (tmp_path / d / "sos_log.jsonl").read_text().splitlines()])
        for d in ("straight", "resumed")
    ]
    assert [e["epoch"] for e in logs[1]] == [1, 2, 3] and logs[0] == logs[1]
    assert not (tmp_path / "resumed" / "last.pt").exists()  # a finished run leaves model.pt only

    fresh = train(replace(cfg, lr=0.1, resume=False))  # --no-resume starts over in the same folder
    assert [r["epoch"] for r in fresh["rows"]] == [1, 2, 3]


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    (tmp_path / "a-idx3-ubyte").write_bytes(raw)
    with gzip.open(tmp_path / "b-idx3-ubyte.gz", "wb") as f:
        f.write(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "b-idx3-ubyte.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x09\x01" + raw[4:])
    with pytest.raises(ValueError, match="not a uint8 IDX"):
        read_idx(tmp_path / "bad")


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sos_detect.cli", "classify", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_missing_dataset_root(tmp_path):
    res = cli("train", "--data", "cifar10", "--root", tmp_path / "nope", "--epochs", 1, "--out", tmp_path / "o")
    assert res.returncode == 2 and "nope" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_weights_with_wrong_class_count(tmp_path):
    from sos_detect.classify.models import small_cnn

    torch.save(small_cnn(num_classes=7).state_dict(), tmp_path / "w.pt")
    res = cli("shift", "--model", "smallcnn", "--data", "digits", "--weights", tmp_path / "w.pt")
    assert res.returncode == 2
    assert "w.pt" in res.stderr and "class count" in res.stderr
    assert Path(tmp_path / "w.pt").is_file()


def test_model_that_cannot_take_the_inputs(tmp_path):
    res = cli("train", "--model", "vgg16_bn", "--data", "digits", "--epochs", 1, "--out", tmp_path / "o")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "--model vgg16_bn cannot take --data digits inputs of shape (1, 8, 8)" in res.stderr
    assert not (tmp_path / "o" / "last.pt").exists()


@pytest.mark.parametrize(
    "name,last", [("resnet18", "fc"), ("resnet50", "fc"), ("vgg16_bn", "classifier.3"), ("densenet201", "classifier")]
)
def test_cifar_models_take_32px_and_end_in_the_shifted_linear(name, last):
    from sos_detect.classify.models import build_model, final_linear

    model = build_model(name, num_classes=100).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    layer_name, layer = final_linear(model)
    assert layer_name == last and layer.out_features == 100


def test_imagenet_model_weights_from_a_local_file(tmp_path):
    from sos_detect.classify.models import build_model

    source = build_model("shufflenet_v2_x1_0", num_classes=1000)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "shufflenet.pt")
    loaded = build_model("shufflenet_v2_x1_0", num_classes=1000, weights=tmp_path / "shufflenet.pt")
    for (k, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="class count"):
        build_model("shufflenet_v2_x1_0", num_classes=10, weights=tmp_path / "shufflenet.pt")
    with pytest.raises(ValueError, match="missing.pt: file not found"):
        build_model("resnet50_imagenet", num_classes=1000, weights=tmp_path / "missing.pt")
