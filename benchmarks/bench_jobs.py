"""Wall time of one study run one after another and with --jobs N side by side, and whether both write one table.

Usage (from the folder holding datasets/, after `sos-detect data fashion-det`, nothing else running):
    python benchmarks/bench_jobs.py [--jobs 2] [--studies detect,classify]
detect: `reproduce ab --preset synth-scratch --seeds 0 --epochs 2` (5 runs: the baseline and four SOS arms on 700
training and 400 validation images at 160 px); classify: `reproduce classify --preset terminal --seeds 0` (6 runs
of the digits MLP, 200 epochs each). Each study runs three times into fresh folders, one form after another:
sequential with the default threads (every core: what a user gets), sequential with one thread, and --jobs N
(N processes, each pinned to 1/N of the cores with that many threads). Prints the wall seconds and the speed-up
of --jobs over each sequential form, and whether --jobs wrote the same table as the one-thread sequential run (one
thread per run both ways: the same arithmetic, so the same bits); writes results/bench_jobs.json.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sos_detect.reproduce.jobs import core_shares  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STUDIES = {  # name → (the command's arguments, the table it writes)
    "detect": (["reproduce", "ab", "--preset", "synth-scratch", "--seeds", "0", "--epochs", "2"], "ab.csv"),
    "classify": (["reproduce", "classify", "--preset", "terminal", "--seeds", "0"], "classify.csv"),
}


def timed(args: list[str], out: Path, threads: int | None) -> dict[str, float]:
    """Run `sos-detect ARGS --out OUT` in a fresh process; its wall seconds and the 1-minute load average before."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "sos_detect.cli", *args, "--out", str(out)], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(args)}: failed: {(done.stderr or done.stdout).strip().splitlines()[-1]}")
    return {"wall_s": round(wall, 1), "load_before": round(load, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--studies", default="detect,classify", help="comma-separated: " + ", ".join(STUDIES))
    a = parser.parse_args()
    unknown = set(a.studies.split(",")) - set(STUDIES)
    if unknown:
        parser.error(f"--studies: unknown {', '.join(sorted(unknown))}; choose from {', '.join(STUDIES)}")
    try:
        core_shares(a.jobs)  # before the sequential runs, not after them
    except ValueError as err:
        parser.error(str(err))
    cores = len(os.sched_getaffinity(0))
    report: dict = {"cores": cores, "jobs": a.jobs, "studies": {}}
    print(f"{cores} cores; sequential (default = {cores} threads, and 1 thread) vs --jobs {a.jobs}\n")
    print("| study | sequential, default threads (s) | sequential, 1 thread (s) | --jobs (s) | speed-up | same table |")
    print("|---|---|---|---|---|---|")
    for study in a.studies.split(","):
        args, table = STUDIES[study]
        with tempfile.TemporaryDirectory() as tmp:
            forms = {
                "sequential": timed(args, Path(tmp, "seq"), None),
                "sequential_1_thread": timed(args, Path(tmp, "seq1"), 1),
                "jobs": timed([*args, "--jobs", str(a.jobs)], Path(tmp, "jobs"), None),
            }
            same = filecmp.cmp(Path(tmp, "seq1", table), Path(tmp, "jobs", table), shallow=False)
        jobs = forms["jobs"]["wall_s"]
        speedup = {k: round(v["wall_s"] / jobs, 2) for k, v in forms.items() if k != "jobs"}
        report["studies"][study] = {"command": ["sos-detect", *args], **forms, "speedup": speedup, "same_table": same}
        print(
            f"| {study} | {forms['sequential']['wall_s']} | {forms['sequential_1_thread']['wall_s']} | {jobs} | "
            f"{speedup['sequential']}× / {speedup['sequential_1_thread']}× | {same} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_jobs.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwritten: {RESULTS / 'bench_jobs.json'}")


if __name__ == "__main__":
    main()
