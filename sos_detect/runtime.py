"""Process-wide runtime settings: offline Ultralytics and an explicit CPU thread count."""

from __future__ import annotations

import contextlib
import os


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def configure(threads: int | None = None) -> int:
    """Offline Ultralytics and `threads` torch threads (default: all available cores); returns the count.

    Ultralytics resets torch to min(8, cores − 1) threads whenever it selects a CPU device (one thread on
    a 2-core machine); its module constant is set too so that the choice sticks.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    n = threads or available_cores()
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
