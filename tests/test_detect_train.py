"""Real Ultralytics training with SOS on the embedded tree data (tiny model, tiny images, 2 epochs)."""

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, tiny_train
from ultralytics import YOLO
from ultralytics.utils.patches import torch_load

from sos_detect.detect import SOSDetectionTrainer, detect_head_layers
from sos_detect.detect.shifting import images_forward
from sos_detect.layers import as_v, capture_grams
from sos_detect.shift import solve_shift


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
            assert layer["out_change"] <= 1e-4 * 1.001 + 1e-6
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


def test_trainer_shift_maps_weights_and_momentum_by_the_same_matrix(tmp_path):
    """Inside training: V' = M·V and momentum' = M·momentum, with M recomputed from the trainer's capture set."""
    seen = {}

    class Probe(SOSDetectionTrainer):
        def sos_shift(self, epoch):
            heads = detect_head_layers(self.model)
            before = {
                n: (as_v(m.weight.detach()).clone(), as_v(self.optimizer.state[m.weight]["momentum_buffer"]).clone())
                for n, m in heads.items()
            }
            reports = super().sos_shift(epoch)
            batches = self._capture.sample(self.args.sos_images, self.args.seed + epoch)
            grams = capture_grams(self.model, heads, batches, forward=images_forward(self.device))
            for n, m in heads.items():
                v0, b0 = before[n]
                v_new, info = solve_shift(grams[n].gram, v0, tau=self.args.sos_tau)
                seen[n] = (
                    as_v(m.weight.detach()),
                    v_new,
                    as_v(self.optimizer.state[m.weight]["momentum_buffer"]),
                    info.apply(b0),
                    b0,
                )
            return reports

    YOLO("yolov5n.yaml").train(
        trainer=Probe, project=str(tmp_path), name="m", **{**TINY, "epochs": 1, "sos_start": 0, "sos_images": 8}
    )
    assert len(seen) == 6
    for w, w_expected, mom, mom_expected, mom_before in seen.values():
        torch.testing.assert_close(w, w_expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mom, mom_expected, rtol=1e-5, atol=1e-7)
        assert not torch.equal(mom, mom_before)
