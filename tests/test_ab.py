"""A/B harness end to end on a tiny fashion-det (built from scikit-learn digits): statistics recomputed from the
runs' own results.csv with scipy, reuse only with equal settings, resume after a kill, the shared pretrained start
of the fine-tuning regime, and `compare` plotting exactly the CSV columns."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_main
from scipy import stats
from test_synthetic import digits_idx
from ultralytics.utils.patches import torch_load

from sos_detect.core.stats import sign_test, t_interval, t_quantile
from sos_detect.detect.synthetic import SynthSpec, build_fashion_det
from sos_detect.reproduce.ab import run_ab
from sos_detect.reproduce.ab_presets import (
    PRESETS,
    ABConfig,
    Pretrain,
    ab_config,
    check_arms,
    parse_arm,
    parse_options,
)
from sos_detect.reproduce.ab_report import aggregate
from sos_detect.reproduce.jobs import core_shares

COMMON = [
    "epochs=2",
    "imgsz=64",
    "batch=8",
    "workers=0",
    "device=cpu",
    "amp=False",
    "plots=False",
    "optimizer=SGD",
    "lr0=0.01",
    "warmup_epochs=0",
    "sos_start=0",
    "sos_images=8",
]
ARMS = ["base:sos=False", "guarded:sos_tau=1e-2"]
SEEDS = (0, 1, 2)


def _cli(*args, timeout=1800):
    cmd = [sys.executable, "-m", "sos_detect.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _ab_cmd(data, out, extra=(), arms=ARMS, seeds=SEEDS):
    opts = [x for o in COMMON for x in ("--opt", o)]
    arms = [x for a in arms for x in ("--arm", a)]
    return ["reproduce", "ab", "--data", data, *arms, "--seeds", ",".join(map(str, seeds)), *opts, *extra, "--out", out]


def _column(run_dir: Path, name: str) -> list[float]:
    rows = list(csv.DictReader((run_dir / "results.csv").read_text().splitlines()))
    return [float(r[k]) for r in rows for k in r if k.strip() == name]


def _best_pt_metrics(run_dir: Path) -> dict[str, float]:
    """results.csv's mAPs at the epoch best.pt says it holds, checked against the metrics stored in it."""
    ckpt = torch_load(run_dir / "weights" / "best.pt", map_location="cpu")
    values = {}
    for key, column in (("best_map50", "metrics/mAP50(B)"), ("best_map5095", "metrics/mAP50-95(B)")):
        values[key] = _column(run_dir, column)[ckpt["epoch"]]
        assert values[key] == pytest.approx(ckpt["train_metrics"][column], abs=1e-5)  # results.csv rounds
    return values


KEYS = ("map50", "map5095", "best_map50", "best_map5095", "head_norm")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    build_fashion_det(root, SynthSpec(train=24, val=8, min_size=64, max_size=80), digits_idx(root / "idx"), False)
    return root / "fashion-det.yaml"


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("ab")
    res = _cli(*_ab_cmd(tiny_data, out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_t_interval_and_sign_test_match_scipy():
    for df in (1, 2, 3, 4, 7, 12, 30):
        assert t_quantile(0.95, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-10)
    for values in ([0.3, -0.1, 0.5, 0.2, 0.4], [1.0, 2.5], [-0.02, -0.01, 0.0, -0.03, 0.01, -0.05]):
        lo, hi = t_interval(values)
        ref = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
        assert (lo, hi) == pytest.approx(ref, rel=1e-10)
        pos, neg, p = sign_test(values)
        assert p == pytest.approx(stats.binomtest(pos, pos + neg, 0.5).pvalue, rel=1e-12)
    assert sign_test([0.1] * 5) == (5, 0, pytest.approx(0.0625))
    assert all(math.isnan(v) for v in t_interval([0.3]))


def test_aggregate_published_column_and_ties():
    results = [
        {"model": "m", "seed": s, "arm": arm, "map50": v, "map5095": v / 2, "head_norm": 1.0, "voc07": math.nan}
        for s, (b, t) in enumerate([(0.80, 0.81), (0.82, 0.82), (0.84, 0.90)])
        for arm, v in (("base", b), ("sos", t))
    ]
    rows, md = aggregate(results, ["base", "sos"], {"m": {"base": 83.4}})
    diff = next(r for r in rows if r["row"] == "sos - base" and r["metric"] == "map50")
    assert (diff["n_pos"], diff["n_neg"], diff["sign_p"]) == (2, 0, pytest.approx(0.5))  # the tie is dropped
    assert json.loads(diff["per_seed"]) == pytest.approx({"0": 0.01, "1": 0.0, "2": 0.06})
    assert next(r for r in rows if r["row"] == "base")["reference_map50"] == 83.4
    assert "83.4" in md and "voc07" not in md  # not measured: no column, no row


@pytest.mark.slow  # the study: 6 tiny trainings
def test_study_statistics_recomputed_from_the_runs(study):
    out, _ = study
    final = {
        (arm, s): {
            "map50": _column(out / "runs" / f"yolov5n_s{s}_{arm}", "metrics/mAP50(B)")[-1],
            "map5095": _column(out / "runs" / f"yolov5n_s{s}_{arm}", "metrics/mAP50-95(B)")[-1],
            "head_norm": _column(out / "runs" / f"yolov5n_s{s}_{arm}", "sos/head_norm")[-1],
            **_best_pt_metrics(out / "runs" / f"yolov5n_s{s}_{arm}"),
        }
        for arm in ("base", "guarded")
        for s in SEEDS
    }
    rows = list(csv.DictReader((out / "ab.csv").read_text().splitlines()))
    for arm in ("base", "guarded"):
        row = next(r for r in rows if r["row"] == arm)
        for key in KEYS:
            values = [final[arm, s][key] for s in SEEDS]
            assert float(row[f"{key}_mean"]) == pytest.approx(np.mean(values), rel=1e-9, abs=1e-12)
            assert float(row[f"{key}_std"]) == pytest.approx(np.std(values, ddof=1), rel=1e-6, abs=1e-12)
    t_ps = {}
    for key in KEYS:
        d = [final["guarded", s][key] - final["base", s][key] for s in SEEDS]
        row = next(r for r in rows if r["row"] == "guarded - base" and r["metric"] == key)
        assert float(row["mean"]) == pytest.approx(np.mean(d), rel=1e-9, abs=1e-12)
        if np.std(d) > 0:
            ref = stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=stats.sem(d))
            assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx(ref, rel=1e-6, abs=1e-12)
        pos, neg = sum(x > 0 for x in d), sum(x < 0 for x in d)
        assert (int(row["n_pos"]), int(row["n_neg"])) == (pos, neg)
        p = stats.binomtest(pos, pos + neg, 0.5).pvalue if pos + neg else 1.0
        assert float(row["sign_p"]) == pytest.approx(p)
        mde = (stats.t.ppf(0.975, len(d) - 1) + stats.t.ppf(0.8, len(d) - 1)) * np.std(d, ddof=1) / np.sqrt(len(d))
        assert float(row["mde80"]) == pytest.approx(mde, rel=1e-6, abs=1e-12)
        # scipy's t-test; with no spread (equal differences) the test is decided: p = 1 at 0, else 0
        t_ps[key] = stats.ttest_1samp(d, 0.0).pvalue if np.std(d) > 0 else float(np.mean(d) == 0)
        assert float(row["t_p"]) == pytest.approx(t_ps[key], rel=1e-6)
    # Holm across the study's arm × metric family (one arm here: its five metrics), as the procedure defines it
    ranked = sorted(t_ps, key=t_ps.get)
    adjusted = {
        k: min(1.0, max((len(ranked) - j) * t_ps[ranked[j]] for j in range(i + 1))) for i, k in enumerate(ranked)
    }
    for key, value in adjusted.items():
        row = next(r for r in rows if r["row"] == "guarded - base" and r["metric"] == key)
        assert float(row["holm_p"]) == pytest.approx(value, rel=1e-6)
    assert "MDE (80 %)" in (out / "ab.md").read_text() and "Holm p" in (out / "ab.md").read_text()
    assert (out / "runs" / "yolov5n_s0_guarded" / "sos_log.jsonl").is_file()
    assert not (out / "runs" / "yolov5n_s0_base" / "sos_log.jsonl").exists()
    for name in ("ab.md", "ab_effect.png", "ab_curves_yolov5n.png"):
        assert (out / name).stat().st_size > 0
    assert not (out / "runs" / "yolov5n_s1_guarded" / "sos_head_norm.png").exists()  # plots=False is obeyed


@pytest.mark.slow  # the study
def test_finished_runs_reused_only_with_equal_settings(study, tiny_data, capsys):
    out, _ = study
    before = (out / "ab.csv").read_text()
    again = _cli(*_ab_cmd(tiny_data, out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Starting training" not in again.stdout + again.stderr and (out / "ab.csv").read_text() == before
    code, _, err = cli_main(capsys, *_ab_cmd(tiny_data, out, ["--epochs", "3"]))  # refused in this process
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "done.json: a finished run with other settings (epochs 2 → 3)" in err


@pytest.mark.slow  # the study
def test_compare_plots_the_csv_columns(study, tmp_path):
    from sos_detect.detect.compare import compare_runs

    out, _ = study
    base, sos = out / "runs" / "yolov5n_s0_base", out / "runs" / "yolov5n_s0_guarded"
    data = compare_runs({"base": [base], "guarded": [sos]}, tmp_path / "two.png")
    assert (tmp_path / "two.png").stat().st_size > 0
    for column in ("metrics/mAP50(B)", "metrics/mAP50-95(B)", "sos/head_norm"):
        assert data[column]["base"].values == _column(base, column)
        assert data[column]["guarded"].values == _column(sos, column)
    log = [json.loads(x) for x in (sos / "sos_log.jsonl").read_text().splitlines()]
    assert data["sos/head_norm"]["guarded"].shifts == sorted({e["epoch"] for e in log if e["target"] == "model"})
    assert data["sos/head_norm"]["base"].shifts == []
    groups = {arm: [out / "runs" / f"yolov5n_s{s}_{arm}" for s in SEEDS] for arm in ("base", "guarded")}
    mean = compare_runs(groups, tmp_path / "groups.png")["metrics/mAP50(B)"]["guarded"]
    columns = np.array([_column(r, "metrics/mAP50(B)") for r in groups["guarded"]])
    assert mean.values == pytest.approx(columns.mean(0).tolist()) and mean.runs == 3
    assert mean.error == pytest.approx(columns.std(0, ddof=1).tolist())
    res = _cli("compare", base, sos, "--out", tmp_path / "cli.png", timeout=300)
    assert res.returncode == 0 and (tmp_path / "cli.png").is_file(), res.stderr[-2000:]


@pytest.mark.slow  # trainings in worker processes
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--jobs 2 needs two cores to pin")
def test_jobs_side_by_side_give_the_sequential_table(tmp_path, tiny_data):
    # one thread per run both ways: one after another with OMP_NUM_THREADS=1, side by side on one core each
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmds = {
        jobs: [sys.executable, "-m", "sos_detect.cli", *_ab_cmd(tiny_data, tmp_path / f"j{jobs}", seeds=(0, 1))]
        + ["--epochs", "1", "--jobs", str(jobs)]
        for jobs in (1, 2)
    }
    for cmd in cmds.values():
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "j2" / "ab.csv").read_text() == (tmp_path / "j1" / "ab.csv").read_text()
    logs = sorted(p.name for p in (tmp_path / "j2" / "logs").glob("*.log"))
    assert logs == [f"yolov5n_s{s}_{arm}.log" for s in (0, 1) for arm in ("base", "guarded")]
    # every worker ran pinned to one core with one torch thread, as its first log line says (read from the process)
    cores = sorted(os.sched_getaffinity(0))
    first = [(tmp_path / "j2" / "logs" / name).read_text().splitlines()[0] for name in logs]
    assert set(first) <= {f"worker: core(s) [{c}], 1 torch thread(s)" for c in cores[:2]}
    assert core_shares(2, [0, 1, 2, 3, 4]) == [[0, 1, 2], [3, 4]]
    again = subprocess.run(cmds[2], capture_output=True, text=True, timeout=1800, env=env)
    assert again.returncode == 0 and "started on" not in again.stdout  # finished runs are read back, not retrained
    too_many = subprocess.run(
        [*cmds[2][:-1], str(len(os.sched_getaffinity(0)) + 1)], capture_output=True, text=True, env=env
    )
    assert too_many.returncode == 2 and too_many.stderr.strip().endswith("cores this process may use")
    assert len(too_many.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # a worker process
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--jobs 2 needs two cores to pin")
def test_a_failed_worker_is_one_error_naming_the_run_and_its_log(tmp_path):
    from sos_detect.reproduce.ab_runs import train_run
    from sos_detect.reproduce.jobs import run_tasks

    task = (tmp_path / "runs" / "m_s0_a", {"model": "missing.yaml", "data": "none.yaml", "seed": 0})
    with pytest.raises(ChildProcessError) as err:
        run_tasks(train_run, [task], 2, tmp_path / "logs")
    log = tmp_path / "logs" / "m_s0_a.log"
    assert str(err.value) == f"{task[0]}: failed (exit 2): error: 'missing.yaml' does not exist (log: {log})"
    assert not (tmp_path / "runs" / "m_s0_a" / "done.json").exists()


@pytest.mark.slow  # trainings, a killed process
def test_interrupted_run_resumes(tmp_path, tiny_data):
    from sos_detect.reproduce.ab_runs import _checkpoint_epoch

    args = _ab_cmd(tiny_data, tmp_path, ["--epochs", "3"], arms=["base:sos=False"], seeds=[0])
    cmd = [sys.executable, "-m", "sos_detect.cli", *map(str, args)]
    run = tmp_path / "runs" / "yolov5n_s0_base"
    last = run / "weights" / "last.pt"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 1200
    while time.time() < deadline:  # until a complete mid-training checkpoint exists
        epoch = _checkpoint_epoch(last) if last.is_file() else None
        if epoch is not None and epoch >= 0:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "done.json").exists() and len(_column(run, "epoch")) < 3
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Resuming training" in res.stdout + res.stderr
    assert _column(run, "epoch") == [1.0, 2.0, 3.0]


@pytest.mark.slow  # trainings
def test_finetune_regime_pretrains_one_shared_start(tmp_path, tiny_data):
    common = dict(epochs=1, imgsz=64, batch=8, workers=0, device="cpu", amp=False, plots=False, warmup_epochs=0)
    hessian = dict(sos_images=8, sos_hessian_every=1, sos_hessian_images=2, sos_hessian_probes=4)
    cfg = ABConfig(
        data=str(tiny_data),
        train={**common, **hessian},
        arms={
            "base": {"sos": False},
            "paper": {"sos_mode": "paper", "sos_rows": 8, "sos_start": 0, "sos_max_change": None},
        },
        seeds=(0,),
        pretrain=Pretrain(images=(0, 16), options={"sos_hessian_every": 0}),
        train_images=(16, 8),
        val_images=4,
    )
    run_ab(cfg, tmp_path, name="ft")
    start = tmp_path / "runs" / "yolov5n_pretrain" / "weights" / "last.pt"
    pretrain_data = json.loads((tmp_path / "runs" / "yolov5n_pretrain" / "done.json").read_text())["settings"]["data"]
    assert len(Path(pretrain_data.replace(".yaml", "_train.txt")).read_text().splitlines()) == 16
    for arm in ("base", "paper"):
        done = json.loads((tmp_path / "runs" / f"yolov5n_s0_{arm}" / "done.json").read_text())
        assert done["settings"]["pretrained"] == str(start) and done["epochs"] == 1
        listed = Path(done["settings"]["data"].replace(".yaml", "_train.txt")).read_text().splitlines()
        assert [Path(f).name for f in listed] == [f"train_{i:05d}.jpg" for i in range(16, 24)]
        assert done["trace_head"] == _column(tmp_path / "runs" / f"yolov5n_s0_{arm}", "sos/trace_head")[-1]
    paper = tmp_path / "runs" / "yolov5n_s0_paper"
    log = [json.loads(x) for x in (paper / "sos_log.jsonl").read_text().splitlines()]
    assert log and all(layer["rows"] == 8 for e in log for layer in e["layers"])
    rows = list(csv.DictReader((tmp_path / "ft.csv").read_text().splitlines()))
    assert {r["metric"] for r in rows if r["row"] == "paper - base"} >= {"map50", "head_norm", "trace_head"}
    from sos_detect.detect.plots import plot_run

    assert not (paper / "sos_head_norm.png").exists()  # plots=False is obeyed; the plots are one call away
    assert {p.name for p in plot_run(paper)} == {"sos_trace.png", "sos_head_norm.png", "sos_shift_loss.png"}
    from sos_detect.detect.compare import compare_runs

    data = compare_runs({"base": [tmp_path / "runs" / "yolov5n_s0_base"], "paper": [paper]}, tmp_path / "c.png")
    trace = data["sos/trace_head"]["paper"]
    assert trace.epochs == [1] and trace.values == _column(paper, "sos/trace_head") and trace.shifts == [1]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_fit_the_default_fashion_det_build(name):
    """Every study preset's arms pass the SOS option checks, and the image slices it trains, pretrains and validates
    on exist in a default `sos-detect data fashion-det` build (3,000 train / 1,000 val), without overlap."""
    cfg, spec = PRESETS[name], SynthSpec()
    check_arms(cfg)
    assert next(iter(cfg.arms.values())) == {"sos": False}
    first, count = cfg.train_images
    assert first >= 0 and first + count <= spec.train
    assert 1 <= cfg.val_images <= spec.val
    if cfg.pretrain:
        p_first, p_count = cfg.pretrain.images
        assert p_first >= 0 and p_first + p_count <= spec.train
        assert p_first + p_count <= first or first + count <= p_first  # the arms fine-tune on unseen images


def test_arm_values_read_as_yolo_reads_them():
    """`--arm` / `--opt` values: numbers, booleans and None as Ultralytics' key=value parser reads them, so the
    study's paper arm (no rollback: sos_max_change=None) can be written on the command line and passes the checks."""
    name, options = parse_arm("paper-b32:sos_mode=paper,sos_rows=32,sos_max_change=None,sos_order=start")
    expected = {"sos_mode": "paper", "sos_rows": 32, "sos_max_change": None, "sos_order": "start"}
    assert (name, options) == ("paper-b32", expected)
    assert options == PRESETS["synth-scratch"].arms["paper-b32"]
    assert parse_options(["sos_tau=1e-3", "sos=False", "imgsz=160"]) == {"sos_tau": 1e-3, "sos": False, "imgsz": 160}
    check_arms(ABConfig(data="x.yaml", train={}, arms={"base": {"sos": False}, name: options}))


def test_an_arm_left_out_by_arms_can_be_given_anew():
    """The committed studies' paper arm ran in the end order with the EMA shifted on the model's Grams: `--arms`
    leaving the preset's paper-b32 out and `--arm paper-b32:…` giving it those values reproduces them; an arm the
    study keeps cannot be given twice."""
    legacy = "paper-b32:sos_mode=paper,sos_rows=32,sos_max_change=None,sos_order=end,sos_ema=grams"
    kept = ["base", "guarded-1e-4", "guarded-1e-3", "guarded-1e-2"]
    cfg = ab_config("synth-finetune", data="mine.yaml", arms=kept, arm_specs=[legacy])
    assert list(cfg.arms) == [*kept, "paper-b32"]
    assert cfg.arms["paper-b32"] == {
        **PRESETS["synth-finetune"].arms["paper-b32"],
        "sos_order": "end",
        "sos_ema": "grams",
    }
    with pytest.raises(ValueError, match="already an arm"):
        ab_config("synth-finetune", data="mine.yaml", arm_specs=[legacy])


def test_a_preset_on_data_too_small_for_its_slices_is_refused_before_anything_is_written(tmp_path, tiny_data, capsys):
    """The image ranges a preset trains, pretrains and validates on are checked with the data, before --out exists."""
    out = tmp_path / "out"
    code, _, err = cli_main(capsys, "reproduce", "ab", "--preset", "synth-finetune", "--data", tiny_data, "--out", out)
    assert code == 2 and err.strip().endswith(f"{tiny_data}: 24 training images; images 0..2399 requested")
    assert not out.exists()
