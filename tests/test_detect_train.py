"""Real Ultralytics training with SOS on the embedded tree data (tiny model, tiny images, 2 epochs)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, cli_main, run_cli, tiny_train
from torch.nn.modules.module import register_module_forward_hook
from ultralytics import YOLO
from ultralytics.utils.patches import torch_load
from ultralytics.utils.torch_utils import unwrap_model

from sos_detect.core.capture import as_v
from sos_detect.core.solver import solve_shift
from sos_detect.detect import SOSDetectionTrainer, detect_head_layers
from sos_detect.detect.embedded import REPO_ROOT

pytestmark = pytest.mark.slow  # every test trains (the session fixture `runs`: two trainings)


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    project = tmp_path_factory.mktemp("runs")
    return {
        "sos": tiny_train(project, "sos", sos=True, sos_start=0, sos_every=1, sos_images=16),
        "base": tiny_train(project, "base", sos=False),
    }


def head_norms(ckpt_path) -> dict[str, float]:
    ckpt = torch_load(ckpt_path, map_location="cpu")
    model = ckpt.get("ema") or ckpt["model"]
    return {n: float(m.weight.float().norm()) for n, m in detect_head_layers(model).items()}


def test_results_csv_has_sos_columns(runs):
    rows = list(csv.DictReader(Path(runs["sos"] / "results.csv").read_text().splitlines()))
    assert len(rows) == 2
    for col in ("sos/shifted", "sos/norm_ratio", "sos/ema_norm_ratio", "sos/out_change", "sos/seconds"):
        assert col in rows[0]
    assert all(float(r["sos/shifted"]) == 1.0 for r in rows)
    assert all(0 < float(r["sos/norm_ratio"]) < 1 for r in rows)
    base_rows = list(csv.DictReader(Path(runs["base"] / "results.csv").read_text().splitlines()))
    assert all(float(r["sos/shifted"]) == 0.0 for r in base_rows)


def test_sos_log_covers_model_and_ema_for_all_six_heads(runs):
    entries = [json.loads(line) for line in Path(runs["sos"] / "sos_log.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["target"]) for e in entries] == [(1, "model"), (1, "ema"), (2, "model"), (2, "ema")]
    for e in entries:
        assert e["applied"] and e["seconds"] > 0
        names = [layer["name"] for layer in e["layers"]]
        assert names == ["box.0", "box.1", "box.2", "cls.0", "cls.1", "cls.2"]
        for layer in e["layers"]:
            assert layer["norm_after"] <= layer["norm_before"]
            assert layer["out_change"] <= 1e-4 * (1 + 1e-3)
            assert layer["budget"] == 1e-4
    assert not (runs["base"] / "sos_log.jsonl").exists()


def test_saved_ema_heads_are_shifted_and_smaller_than_baseline(runs):
    sos, base = head_norms(runs["sos"] / "weights" / "last.pt"), head_norms(runs["base"] / "weights" / "last.pt")
    assert sum(v**2 for v in sos.values()) < sum(v**2 for v in base.values())
    # the checkpoint holds the EMA as it was after the last (EMA) shift, up to fp16 storage
    last_ema = [json.loads(line) for line in Path(runs["sos"] / "sos_log.jsonl").read_text().splitlines()][-1]
    assert last_ema["target"] == "ema"
    for layer in last_ema["layers"]:
        assert sos[layer["name"]] == pytest.approx(layer["norm_after"], rel=2e-3)


class Interrupt(Exception):
    pass


def test_resume_continues_schedule(tmp_path):
    """Shift at epochs 0 and 2 (every 2) + final; stop after 2 epochs, resume, and the schedule goes on."""
    model = YOLO("yolov5n.yaml")

    def stop_after_second_epoch(trainer):
        if trainer.epoch == 1:
            raise Interrupt

    model.add_callback("on_fit_epoch_end", stop_after_second_epoch)
    with pytest.raises(Interrupt):
        model.train(
            trainer=SOSDetectionTrainer,
            project=str(tmp_path),
            name="r",
            **{**TINY, "epochs": 4, "sos_start": 0, "sos_every": 2, "sos_images": 8, "sos_tau": 2e-4},
        )
    run = tmp_path / "r"
    assert [json.loads(x)["epoch"] for x in Path(run / "sos_log.jsonl").read_text().splitlines()] == [1, 1]
    resumed = YOLO(str(run / "weights" / "last.pt"))
    resumed.train(trainer=SOSDetectionTrainer, resume=True)
    entries = [json.loads(x) for x in Path(run / "sos_log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in entries] == [1, 1, 3, 3, 4, 4]
    assert all(e["tau"] == 2e-4 for e in entries)  # options came back from the checkpoint's args
    rows = list(csv.DictReader(Path(run / "results.csv").read_text().splitlines()))
    assert [float(r["sos/shifted"]) for r in rows] == [1.0, 0.0, 1.0, 1.0]


def gram_of_inputs(xs) -> torch.Tensor:
    """Σ X Xᵀ over NCHW inputs X of a 1×1 conv (rows are positions), float64: independent of sos_detect."""
    g = 0
    for x in xs:
        a = x.double().permute(1, 0, 2, 3).reshape(x.shape[1], -1)
        g = g + a @ a.T
    return g


def test_training_pass_capture_is_exact_and_costs_no_forward_pass(tmp_path):
    """sos_capture=train: the Gram is AᵀA of the head inputs of the epoch's last training batches (train mode,
    augmented; recorded here independently), the model runs no forward pass beyond training, the model's weights
    and momentum and the EMA's weights are each mapped by the solver on that Gram, and the EMA's logged held-out
    change is its output change on the validation images, recomputed."""
    seen = {"batches": 0}

    class Probe(SOSDetectionTrainer):
        def _setup_train(self):
            super()._setup_train()
            self.records = {"train": [], "ema": []}
            train = {id(m): n for n, m in detect_head_layers(unwrap_model(self.model)).items()}
            ema = {id(m): n for n, m in detect_head_layers(self.ema.ema).items()}

            def record(mod, inp, out):  # a global hook: nothing is attached to the modules that get pickled
                if id(mod) in train:
                    entry = (self.epoch, self._batch - 1, self.model.training, train[id(mod)], inp[0].detach().clone())
                    self.records["train"].append(entry)
                elif id(mod) in ema:
                    self.records["ema"].append((self.epoch, ema[id(mod)], inp[0].detach().clone()))

            seen["hook"] = register_module_forward_hook(record)

        def run_callbacks(self, event):
            if event == "on_train_batch_start":
                seen["batches"] += 1
            super().run_callbacks(event)

        def sos_shift(self, epoch, capture=None):
            model_heads, ema_heads = detect_head_layers(self.model), detect_head_layers(self.ema.ema)
            before = {
                n: (
                    as_v(m.weight.detach()).clone(),
                    as_v(self.optimizer.state[m.weight]["momentum_buffer"]).clone(),
                    as_v(ema_heads[n].weight.detach()).clone(),
                )
                for n, m in model_heads.items()
            }
            reports = super().sos_shift(epoch, capture)
            seen[epoch] = {
                "before": before,
                "after": {
                    n: (
                        as_v(m.weight.detach()).clone(),
                        as_v(self.optimizer.state[m.weight]["momentum_buffer"]).clone(),
                        as_v(ema_heads[n].weight.detach()).clone(),
                    )
                    for n, m in model_heads.items()
                },
                "images": capture.images,
            }
            return reports

    model = YOLO("yolov5n.yaml")
    try:
        settings = {**TINY, "sos_start": 0, "sos_images": 8, "sos_ema": "grams"}
        model.train(trainer=Probe, project=str(tmp_path), name="p", **settings)
    finally:
        if "hook" in seen:
            seen["hook"].remove()
    trainer = model.trainer
    nb, per_epoch = len(trainer.train_loader), len(trainer.train_loader.dataset)
    assert (nb, per_epoch) == (5, 37)  # batches of 8, 8, 8, 8, 5: the last 8 images are in the last two batches
    train_forwards = [r for r in trainer.records["train"] if r[3] == "box.0"]
    assert len(train_forwards) == seen["batches"] == 2 * nb  # no forward pass but the training ones
    assert all(r[2] for r in train_forwards)  # train mode
    log = [json.loads(x) for x in (trainer.save_dir / "sos_log.jsonl").read_text().splitlines()]
    for epoch in (0, 1):
        rows = {n: [r[4] for r in trainer.records["train"] if r[0] == epoch and r[1] >= nb - 2 and r[3] == n]
                for n in seen[epoch]["before"]}  # fmt: skip
        assert seen[epoch]["images"] == 13
        for name, (v0, mom0, ema0) in seen[epoch]["before"].items():
            g = gram_of_inputs(rows[name])
            v1, mom1, ema1 = seen[epoch]["after"][name]
            expected, info = solve_shift(g, v0, tau=1e-4)
            torch.testing.assert_close(v1, expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mom1, info.apply(mom0), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(ema1, solve_shift(g, ema0, tau=1e-4)[0], rtol=1e-5, atol=1e-6)
            assert float(v1.norm()) < float(v0.norm()) and float(ema1.norm()) < float(ema0.norm())
            # the budget on the captured rows, measured from the recorded inputs themselves
            for a, b in ((v0, v1), (ema0, ema1)):
                outs = [x.double().permute(0, 2, 3, 1).reshape(-1, x.shape[1]) for x in rows[name]]
                num = sum(float((o @ (b.double() - a.double())).square().sum()) for o in outs)
                den = sum(float((o @ a.double()).square().sum()) for o in outs)
                assert (num / den) ** 0.5 <= 1e-4 * (1 + 1e-3)
        # held-out: the EMA's output change on the validation images (all 9 in one batch), recomputed
        val = {n: [r[2] for r in trainer.records["ema"] if r[0] == epoch and r[1] == n] for n in seen[epoch]["before"]}
        changes = []
        for name, (_, _, ema0) in seen[epoch]["before"].items():
            g = gram_of_inputs(val[name][:1])
            d = seen[epoch]["after"][name][2].double() - ema0.double()
            changes.append(float(torch.trace(d.T @ g @ d) / torch.trace(ema0.double().T @ g @ ema0.double())) ** 0.5)
        entry = next(e for e in log if e["epoch"] == epoch + 1 and e["target"] == "ema")
        assert entry["heldout_change"] == pytest.approx(max(changes), rel=1e-6)
        assert entry["capture"] == "train" and entry["images"] == 13
    rows_csv = list(csv.DictReader((trainer.save_dir / "results.csv").read_text().splitlines()))
    assert [float(r["sos/ema_heldout_change"]) for r in rows_csv] == pytest.approx(
        [e["heldout_change"] for e in log if e["target"] == "ema"], rel=1e-5
    )


def ema_state(run) -> dict[str, torch.Tensor]:
    ckpt = torch_load(run / "weights" / "last.pt", map_location="cpu")
    model = ckpt.get("ema") or ckpt["model"]  # the final last.pt holds the EMA as "model"
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def test_rolled_back_shifts_leave_the_run_bit_identical_to_the_baseline(runs, tmp_path):
    """Paper mode on b = 4 rows changes the head outputs on all captured rows far beyond sos_max_change (5 %): every
    shift is rolled back and logged with its reason, and the run ends bit for bit where the sos=False run ends."""
    run = tiny_train(
        tmp_path, "rb", sos=True, sos_start=0, sos_mode="paper", sos_rows=4, sos_images=8, sos_heldout_images=4
    )
    log = [json.loads(line) for line in (run / "sos_log.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["target"]) for e in log] == [(1, "model"), (1, "ema"), (2, "model"), (2, "ema")]
    for e in log:
        assert not e["applied"] and "max_change 0.05" in e["reason"]
        assert max(layer["out_change_all"] for layer in e["layers"]) > 0.05
        # the rows left out of the solve carry the change; rolled back, the validation images see none
        assert all(layer["out_change_unsampled"] >= layer["out_change_all"] for layer in e["layers"])
        assert all(layer["heldout_change"] == 0.0 for layer in e["layers"])
    base, rolled = ema_state(runs["base"]), ema_state(run)
    assert base.keys() == rolled.keys()
    assert all(torch.equal(base[k], rolled[k]) for k in base)


def test_eval_capture_option_shifts_on_separate_passes(tmp_path):
    run = tiny_train(
        tmp_path, "ev", epochs=1, sos=True, sos_start=0, sos_capture="eval", sos_images=8, sos_heldout_images=4
    )
    log = [json.loads(line) for line in (run / "sos_log.jsonl").read_text().splitlines()]
    assert [(e["target"], e["capture"], e["images"], e["applied"]) for e in log] == [
        ("model", "eval", 8, True),
        ("ema", "eval", 8, True),
    ]
    assert all(layer["out_change"] <= 1e-4 * (1 + 1e-3) for e in log for layer in e["layers"])
    assert 0 <= log[1]["heldout_change"] < 1  # measured on the validation images
    # sos_heldout_images: every layer of both networks has its change on 4 validation images; guarded mode solves on
    # every captured row, so none is left unsampled
    assert all(0 < layer["heldout_change"] < 1 for e in log for layer in e["layers"])
    assert all(layer["out_change_unsampled"] is None for e in log for layer in e["layers"])


def test_resume_both_ways_keeps_logs_consistent_with_the_checkpoint(tmp_path, monkeypatch, capsys):
    """Interrupted after epoch 2's metrics and log were written but before its checkpoint: the copied run resumes in
    its own folder with every epoch logged once; plain Ultralytics resumes, validates, predicts and fine-tunes the
    checkpoints (their train_args hold no sos_* key; the SOS options ride on the model as sos_args)."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    class CutAfterMetrics(SOSDetectionTrainer):
        def save_metrics(self, metrics):
            super().save_metrics(metrics)
            if self.epoch == 1:
                raise Interrupt

    settings = {**TINY, "epochs": 3, "sos_start": 0, "sos_images": 8, "sos_tau": 3e-4}
    with pytest.raises(Interrupt):
        YOLO("yolov5n.yaml").train(trainer=CutAfterMetrics, project=str(tmp_path), name="r", **settings)
    run, copy = tmp_path / "r", tmp_path / "copy"
    ckpt = torch_load(run / "weights" / "last.pt", map_location="cpu")
    assert ckpt["epoch"] == 0 and not any(k.startswith("sos") for k in ckpt["train_args"])
    assert ckpt["ema"].sos_args["sos_tau"] == 3e-4
    shutil.copytree(run, copy)
    original = {f: (run / f).read_bytes() for f in ("results.csv", "sos_log.jsonl")}
    proc = run_cli("train", "--resume", copy / "weights" / "last.pt", "--project", tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "elsewhere").exists()  # the run continues in its own folder
    rows = list(csv.DictReader((copy / "results.csv").read_text().splitlines()))
    assert [int(float(r["epoch"])) for r in rows] == [1, 2, 3]
    log = [json.loads(line) for line in (copy / "sos_log.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["target"]) for e in log] == [(e, t) for e in (1, 2, 3) for t in ("model", "ema")]
    assert all(e["tau"] == 3e-4 for e in log)
    assert {f: (run / f).read_bytes() for f in original} == original  # the original run was not touched
    plain = YOLO(str(run / "weights" / "last.pt"))
    plain.train(trainer=DetectionTrainer, resume=True)  # plain Ultralytics: no SOS, but it resumes
    assert int(float(list(csv.DictReader((run / "results.csv").read_text().splitlines()))[-1]["epoch"])) == 3
    best = YOLO(str(copy / "weights" / "best.pt"))
    metrics = best.val(data=TINY["data"], imgsz=160, device="cpu", plots=False, verbose=False, project=str(tmp_path))
    assert 0 <= metrics.box.map50 <= 1
    image = next((REPO_ROOT / "data" / "deepforest" / "images" / "val").glob("*.jpg"))
    assert len(best.predict(str(image), imgsz=160, device="cpu", verbose=False, save=False)) == 1
    best.train(data=TINY["data"], epochs=1, imgsz=160, device="cpu", workers=0, plots=False, project=str(tmp_path),
               name="ft", exist_ok=True, verbose=False)  # fmt: skip
    assert (tmp_path / "ft" / "weights" / "last.pt").is_file()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()  # what the trainings above printed
    code, _, err = cli_main(capsys, "train", "--resume", copy / "weights" / "last.pt")  # finished: nothing to resume
    assert code != 0 and "--resume" in err and "--weights" in err
    assert len(err.strip().splitlines()) == 1


TENSORBOARD_RUN = """
import sys
from ultralytics import YOLO
from ultralytics.utils import SETTINGS
SETTINGS.update({"tensorboard": True})
from sos_detect.core.runtime import configure
configure()
from sos_detect.detect import SOSDetectionTrainer
from sos_detect.detect.embedded import EMBEDDED_YAML
YOLO("yolov5n.yaml").train(trainer=SOSDetectionTrainer, data=str(EMBEDDED_YAML), epochs=2, imgsz=128, batch=8,
    device="cpu", amp=False, workers=0, plots=False, project=sys.argv[1], name="tb", sos_start=0, sos_images=8)
"""


def test_sos_figures_reach_ultralytics_loggers(tmp_path):
    """With TensorBoard on (in a settings folder of the test's own), Ultralytics' logger writes every sos/ column of
    results.csv as a scalar, epoch by epoch, with the CSV's values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # Ultralytics mutes loggers in pytest
    env["YOLO_CONFIG_DIR"] = str(tmp_path / "config")
    subprocess.run([sys.executable, "-c", TENSORBOARD_RUN, str(tmp_path)], check=True, env=env, capture_output=True)
    run = tmp_path / "tb"
    events = EventAccumulator(str(run))
    events.Reload()
    rows = list(csv.DictReader((run / "results.csv").read_text().splitlines()))
    columns = [k.strip() for k in rows[0] if k.strip().startswith("sos/")]
    assert {"sos/norm_ratio", "sos/ema_heldout_change", "sos/head_norm"} <= set(columns)
    for column in columns:
        key = next(k for k in rows[0] if k.strip() == column)
        logged = {e.step: e.value for e in events.Scalars(column)}
        assert logged == pytest.approx({int(float(r["epoch"])): float(r[key]) for r in rows}, rel=1e-5, nan_ok=True)
