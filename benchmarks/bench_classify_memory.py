"""Peak memory and time of `classify train` on a real 32×32 ImageFolder (scikit-learn's digits, upscaled).

Each run is a child process: its peak RSS is the kernel's (`os.wait4` → ru_maxrss), while /proc is polled and the
child is killed once its RSS passes --limit-gb, so that a runaway run never takes the shared machine down.
With --before DIR the same command first runs from that checkout (e.g. `git worktree add /tmp/old main`), then
from this one. Writes benchmarks/results/bench_classify_memory.json.

Run: python benchmarks/bench_classify_memory.py [--before DIR] [--limit-gb 4] [--epochs 3] [--batch N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def watch(cmd: list[str], limit_bytes: int, cwd: str | Path | None = None, poll_s: float = 0.05) -> dict:
    """Run cmd, kill it (SIGKILL) once its RSS passes limit_bytes; peak RSS from the kernel, wall seconds, output,
    and the polled RSS once a second (seconds, bytes)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err)
        polled, killed, done, trace = [0], [False], threading.Event(), []

        def poll() -> None:
            while not done.is_set():
                rss = _rss_bytes(proc.pid)
                polled[0] = max(polled[0], rss)
                if not trace or time.perf_counter() - start >= trace[-1][0] + 1:
                    trace.append((time.perf_counter() - start, rss))
                if rss > limit_bytes:
                    killed[0] = True
                    os.kill(proc.pid, signal.SIGKILL)
                    return
                done.wait(poll_s)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage (ru_maxrss in KiB on Linux)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        thread.join()
        out.seek(0), err.seek(0)
        return {
            "returncode": proc.returncode,
            "killed_at_limit": killed[0],
            "peak_rss_bytes": max(usage.ru_maxrss * 1024, polled[0]),
            "seconds": seconds,
            "rss_trace": trace,
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=None, help="an older checkout to run the same command from first")
    ap.add_argument("--limit-gb", type=float, default=4.0, help="kill a run whose RSS passes this (default 4)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="--batch for classify train (default: its default)")
    ap.add_argument("--images", type=int, default=1200, help="training images (the rest of 1797 validate)")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from sos_detect.classify.digits import write_digits_imagefolder

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_digits_imagefolder(Path(tmp) / "digits", size=32, n_train=a.images)
        args = ["--model", "resnet18", "--data", "imagefolder", "--root", str(root), "--optimizer", "sam", "--sos"]
        args += ["--epochs", str(a.epochs), "--device", "cpu"] + (["--batch", str(a.batch)] if a.batch else [])
        for label, code in (("before", a.before), ("after", str(REPO))):
            if code is None:
                continue
            out = Path(tmp) / f"runs_{label}"
            # the old CLI writes to --out, the new one to --project/--name: give both a fresh folder
            where = ["--out", str(out)] if label == "before" else ["--project", str(out), "--name", "train"]
            cmd = [sys.executable, "-m", "sos_detect.cli", "classify", "train", *args, *where]
            res = watch(cmd, int(a.limit_gb * 2**30), cwd=code)
            last = [line for line in res["stdout"].splitlines() if "top-1" in line][-1:]
            rows.append(
                {
                    "label": label,
                    "code": code,
                    "args": args,
                    "returncode": res["returncode"],
                    "killed_at_limit": res["killed_at_limit"],
                    "peak_rss_gb": res["peak_rss_bytes"] / 2**30,
                    "seconds": res["seconds"],
                    # growth check: the largest RSS in each third of the run
                    "peak_rss_gb_by_third": [
                        max(
                            (
                                r
                                for t, r in res["rss_trace"]
                                if k * res["seconds"] / 3 <= t < (k + 1) * res["seconds"] / 3
                            ),
                            default=0,
                        )
                        / 2**30
                        for k in range(3)
                    ],
                    "final_line": last[0].strip() if last else res["stderr"].strip()[-300:],
                }
            )
    print(f"{'run':<7} {'rc':>4} {'killed':>6} {'peak RSS (GB)':>13} {'by third (GB)':>16} {'seconds':>8}  final line")
    for r in rows:
        thirds = "/".join(f"{g:.2f}" for g in r["peak_rss_gb_by_third"])
        print(
            f"{r['label']:<7} {r['returncode']:>4} {r['killed_at_limit']!s:>6} {r['peak_rss_gb']:>13.2f} {thirds:>16} "
            f"{r['seconds']:>8.1f}  {r['final_line']}"
        )
    result = {"images": a.images, "epochs": a.epochs, "limit_gb": a.limit_gb, "runs": rows}
    path = REPO / "benchmarks" / "results" / "bench_classify_memory.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
