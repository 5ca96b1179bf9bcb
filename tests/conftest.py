"""Shared test set-up: offline Ultralytics, explicit CPU threads, small real fixtures."""

from sos_detect.core.runtime import configure

configure()

import pytest  # noqa: E402
import torch  # noqa: E402

from sos_detect.detect.embedded import EMBEDDED_YAML  # noqa: E402

# A tiny real Ultralytics run: YOLOv5n on the embedded tree data at 128-160 px on CPU.
TINY = dict(
    data=str(EMBEDDED_YAML),
    epochs=2,
    imgsz=160,
    batch=8,
    device="cpu",
    amp=False,
    workers=0,
    seed=0,
    plots=False,
    optimizer="SGD",
    lr0=0.01,
    exist_ok=True,
    verbose=False,
)


def tiny_train(project, name, trainer=None, **kw):
    """Train YOLOv5n with SOSDetectionTrainer (or a subclass) and TINY settings; returns the run folder."""
    from ultralytics import YOLO

    from sos_detect.detect import SOSDetectionTrainer

    model = YOLO("yolov5n.yaml")
    model.train(trainer=trainer or SOSDetectionTrainer, project=str(project), name=name, **{**TINY, **kw})
    return model.trainer.save_dir


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


def low_rank_rows(
    rows: int, m: int, rank: int, noise: float, generator: torch.Generator, dtype=torch.float64
) -> torch.Tensor:
    """rows×m features of the given rank plus isotropic noise (the regime of real YOLO head inputs)."""
    b = torch.randn(rows, rank, generator=generator, dtype=torch.float64)
    c = torch.randn(rank, m, generator=generator, dtype=torch.float64)
    a = b @ c + noise * torch.randn(rows, m, generator=generator, dtype=torch.float64)
    return a.to(dtype)


def run_cli(*args, cwd=None, env=None, timeout=600):
    """`python -m sos_detect.cli ARGS` in a real process (cwd: where stray output would land)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sos_detect.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def cli_main(capsys, *args) -> tuple[int, str, str]:
    """`sos-detect ARGS` in this process (no interpreter start): (exit code, stdout, stderr). argparse's own errors
    leave through SystemExit; its code is the exit code a real process would have."""
    from sos_detect.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_error(capsys, *args) -> str:
    """The single stderr line of `sos-detect ARGS` run in this process, asserting exit code 2 and one line (errors
    found before anything runs; `run_cli` where the real process is what is tested)."""
    code, _, err = cli_main(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err[-3000:])
    return lines[0]


def snapshot(*roots):
    """{file: sha256} of every file under `roots` (to show that nothing changed and nothing appeared)."""
    import hashlib
    from pathlib import Path

    out = {}
    for root in map(Path, roots):
        for f in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
            elif f.is_dir():
                out[str(f)] = "dir"
    return out
