"""Process-wide runtime settings: Ultralytics offline unless the user allows downloads, and an explicit CPU
thread count (the user's OMP_NUM_THREADS when set, else every available core)."""

from __future__ import annotations

import contextlib
import os
import warnings

TRUE = {"1", "true", "yes", "on", "y", "t"}  # what Ultralytics' env_bool reads as true


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def downloads_allowed() -> bool:
    """False while YOLO_OFFLINE is true (`configure` sets it by default); YOLO_OFFLINE=0 allows downloads."""
    return os.environ.get("YOLO_OFFLINE", "").strip().lower() not in TRUE


def _user_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


# torch.func's forward-mode AD (the sensing testbed's exact Hessians) loads torch's own decompositions, which call
# the deprecated torch.jit.script: torch's internal business, not the user's.
TORCH_INTERNAL_WARNINGS = (r"`torch\.jit\.script` is deprecated",)


def configure(threads: int | None = None) -> int:
    """Offline Ultralytics unless YOLO_OFFLINE is already set, and `threads` torch threads (default: the user's
    OMP_NUM_THREADS, else all available cores); returns the count. Warnings torch raises about its own internals
    (`TORCH_INTERNAL_WARNINGS`) are filtered.

    Ultralytics resets torch to min(8, cores − 1) threads whenever it selects a CPU device (one thread on
    a 2-core machine); its module constant is set too so that the choice sticks.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    for message in TORCH_INTERNAL_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    n = threads or _user_threads() or available_cores()
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    import torch
    import ultralytics.utils.torch_utils as torch_utils

    torch.set_num_threads(n)
    torch_utils.NUM_THREADS = n
    return n


@contextlib.contextmanager
def one_thread():
    """Small matrix work (m ≤ a few hundred) on one torch thread: faster than a thread pool, and immune to the
    barrier stalls a busy CPU inflicts on multi-threaded tiny ops (measured 200× on a loaded 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
