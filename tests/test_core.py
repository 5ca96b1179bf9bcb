"""Fast unit tests of core/: the frozen ShiftConfig built from the option table, the shift record and its log, the
finished-run guard and atomic writes."""

import csv
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sos_detect.core.apply import shift_model
from sos_detect.core.options import SOS_OPTIONS, OptionError, ShiftConfig, sos_options
from sos_detect.core.record import keep_log_epochs, log_table, results_columns
from sos_detect.core.runs import changed_settings, finished_record, save_atomic, write_csv, write_text_atomic


def test_shift_config_has_a_field_per_shift_row_with_its_default_and_is_frozen():
    rows = sos_options("shift", "capture")
    config = ShiftConfig()
    assert {f.name: getattr(config, f.name) for f in dataclasses.fields(config)} == {
        o.key.removeprefix("sos_"): o.default for o in rows
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tau = 0.5
    assert len(rows) < len(SOS_OPTIONS)  # schedule and Hessian rows stay the trainer's


def test_shift_config_is_checked_once_by_the_table_rows():
    with pytest.raises(OptionError, match=r"^sos_tau=1: must be a number in \[0, 1\)$"):
        ShiftConfig(tau=1)
    with pytest.raises(OptionError, match=r"^sos_mode=paper: needs sos_rows="):
        ShiftConfig(mode="paper")
    with pytest.raises(OptionError, match=r"^sos_heads=neck: must be"):
        ShiftConfig(heads="neck")
    paper = ShiftConfig.of({"sos_mode": "paper", "sos_rows": 8, "epochs": 3}, tau=0.3)
    assert (paper.solve_tau, paper.sampled_rows, paper.tau) == (0.0, 8, 0.3)
    guarded = ShiftConfig.of(SimpleNamespace(sos_tau=1e-3, sos_rows=8, lr0=0.01))  # an args namespace
    assert (guarded.solve_tau, guarded.sampled_rows) == (1e-3, None)


def test_results_columns_and_the_log_table_come_from_the_reports(tmp_path):
    g = torch.Generator().manual_seed(0)
    nets = {t: nn.Linear(6, 3).double() for t in ("model", "ema")}
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    reports = {t: shift_model(n, [n], [x], tau=0.2, max_change=None) for t, n in nets.items()}
    reports["ema"].applied = False
    cols = results_columns(reports)
    w = {t: n.weight.detach() for t, n in nets.items()}
    assert cols["sos/shifted"] == 0.0 and cols["sos/ema_norm_ratio"] == 1.0
    assert cols["sos/norm_ratio"] == pytest.approx(float(w["model"].norm() / reports["model"].layers[0].norm_before))
    assert cols["sos/out_change"] == reports["model"].layers[0].out_change_measured
    log = tmp_path / "sos_log.jsonl"
    log.write_text(
        "".join(
            json.dumps({"epoch": e, "target": t} | r.to_dict()) + "\n" for e in (1, 2, 3) for t, r in reports.items()
        )
    )
    keep_log_epochs(log, 2)
    table = log_table(log).splitlines()
    assert len(table) == 5 and table[1].split()[:3] == ["1", "model", f"{reports['model'].norm_ratio:.4f}"]
    assert "rolled back" in table[2]


def test_finished_run_guard(tmp_path):
    assert changed_settings({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4, "device": "0"}, free=("device",)) == ["b 2 → 3"]
    done = tmp_path / "done.json"
    assert finished_record(done, {"a": 1}) is None
    done.write_text(json.dumps({"settings": {"a": 1, "device": "cpu"}, "map50": 0.5}))
    assert finished_record(done, {"a": 1, "device": "0"}, free=("device",))["map50"] == 0.5
    with pytest.raises(ValueError, match=r"done.json: a finished run with other settings \(a 1 → 2\); choose another"):
        finished_record(done, {"a": 2})


def test_atomic_writes_leave_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "t.pt"
    save_atomic({"x": torch.ones(2)}, path)
    with pytest.raises(AttributeError):
        save_atomic({"f": lambda: 0}, path)  # cannot be pickled: the write fails half-way
    assert torch.equal(torch.load(path)["x"], torch.ones(2)) and [p.name for p in tmp_path.iterdir()] == ["t.pt"]
    write_text_atomic(tmp_path / "a.txt", "x\r\ny\n")
    assert (tmp_path / "a.txt").read_bytes() == b"x\r\ny\n"
    write_csv(tmp_path / "t.csv", [{"k": 1, "v": "a,b"}, {"k": 2, "v": ""}])
    assert list(csv.DictReader((tmp_path / "t.csv").open())) == [{"k": "1", "v": "a,b"}, {"k": "2", "v": ""}]
