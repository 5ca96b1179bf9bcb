"""Runs side by side: each task in its own Python process, pinned to its share of the cores.

`run_tasks(function, tasks, jobs, log_dir)` calls `function(run_dir, settings)` for every task — in this process
when jobs = 1, else in up to `jobs` worker processes at a time. The cores this process may use
(os.sched_getaffinity) are split into `jobs` disjoint shares of near-equal size; a worker starts with
OMP_NUM_THREADS = its share's size and sets its own affinity to that share before it imports torch, so no two runs
spin-wait on one core (more OpenMP threads than free cores made an epoch 10× slower here). Each worker's output goes
to log_dir/RUN.log. The function itself makes a task resumable (the A/B harness's `train_run` reads a finished run
back and resumes an interrupted one), so rerunning after a failure or a kill continues where the runs stopped; a
task whose folder holds done.json is finished and only read back here, no worker started for it.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue
from typing import Any

Task = tuple[Path, dict[str, Any]]  # (run folder, settings)


def core_shares(jobs: int, cores: Sequence[int] | None = None) -> list[list[int]]:
    """`cores` (default: the ones this process may run on) split into `jobs` disjoint, contiguous shares whose
    sizes differ by at most one."""
    cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
    if not 1 <= jobs <= len(cores):
        raise ValueError(f"--jobs {jobs}: must be between 1 and the {len(cores)} cores this process may use")
    size, extra = divmod(len(cores), jobs)
    bounds = [i * size + min(i, extra) for i in range(jobs + 1)]
    return [cores[bounds[i] : bounds[i + 1]] for i in range(jobs)]


def run_tasks(
    function: Callable[[Path, dict[str, Any]], dict[str, Any]], tasks: Sequence[Task], jobs: int, log_dir: Path
) -> list[dict[str, Any]]:
    """`function(run_dir, settings)` for every task, `jobs` at a time in pinned processes (see the module); the
    records in task order. A failed worker stops new starts; the running ones finish, then its error (the last
    line of its log) is raised as ChildProcessError, naming the run and the log."""
    if jobs == 1:
        return [function(run_dir, settings) for run_dir, settings in tasks]
    finished = [t for t in tasks if (t[0] / "done.json").is_file()]
    for run_dir, settings in finished:  # read back first: one with other settings is refused before any training
        function(run_dir, settings)
    shares: Queue[list[int]] = Queue()
    for share in core_shares(jobs):
        shares.put(share)
    log_dir.mkdir(parents=True, exist_ok=True)
    target = f"{function.__module__}:{function.__qualname__}"
    failed: list[str] = []
    lock = threading.Lock()

    def work(task: Task) -> None:
        run_dir, settings = task
        if failed:
            return
        share = shares.get()
        try:
            spec = log_dir / f"{run_dir.name}.json"
            spec.write_text(json.dumps({"function": target, "run_dir": str(run_dir), "settings": settings}))
            log = log_dir / f"{run_dir.name}.log"
            env = {**os.environ, "OMP_NUM_THREADS": str(len(share)), "MKL_NUM_THREADS": str(len(share))}
            cmd = [sys.executable, "-m", __name__, ",".join(map(str, share)), str(spec)]
            with lock:
                print(f"{run_dir.name}: started on core(s) {share}, log {log}", flush=True)
            with open(log, "w") as out:
                code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
            with lock:
                if code:
                    lines = log.read_text(errors="replace").strip().splitlines() or ["(no output)"]
                    failed.append(f"{run_dir}: failed (exit {code}): {lines[-1]} (log: {log})")
                print(f"{run_dir.name}: {'failed' if code else 'finished'}", flush=True)
        finally:
            shares.put(share)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(work, [t for t in tasks if t not in finished]))
    if failed:
        raise ChildProcessError(failed[0])
    return [function(run_dir, settings) for run_dir, settings in tasks]  # finished: read back, settings checked


def _worker(cores: str, spec: str) -> int:
    """A worker process: pin to `cores` before torch loads, then call the named function on the task in `spec`."""
    os.sched_setaffinity(0, [int(c) for c in cores.split(",")])
    from sos_detect.core.runtime import configure

    threads = configure()  # offline Ultralytics, OMP_NUM_THREADS (= the share's size) torch threads
    print(f"worker: core(s) {sorted(os.sched_getaffinity(0))}, {threads} torch thread(s)", flush=True)
    task = json.loads(Path(spec).read_text())
    module, _, name = task["function"].partition(":")
    try:
        getattr(importlib.import_module(module), name)(Path(task["run_dir"]), task["settings"])
    except (ValueError, FileNotFoundError) as err:  # the harness's one-line errors: the last line of the log
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:]))
