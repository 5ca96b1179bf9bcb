"""Offline by default, not by force: the user's YOLO_OFFLINE and OMP_NUM_THREADS win (real processes)."""

import os
import subprocess
import sys

import pytest

from sos_detect.detect.embedded import REPO_ROOT

pytestmark = pytest.mark.slow  # real interpreters (~8 s each): the environment is read at start-up

PROBE = (
    "import os, torch; from sos_detect.core.runtime import configure, downloads_allowed; n = configure(); "
    "import ultralytics.utils as u, ultralytics.utils.torch_utils as t; "
    "print(n, torch.get_num_threads(), t.NUM_THREADS, os.environ['YOLO_OFFLINE'], downloads_allowed(), u.ONLINE)"
)


@pytest.mark.parametrize(
    "user,expected",
    [
        ({}, f"{len(os.sched_getaffinity(0))} {len(os.sched_getaffinity(0))} {len(os.sched_getaffinity(0))} 1 False"),
        ({"OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "0"}, "1 1 1 0 True"),
        ({"YOLO_OFFLINE": "true"}, None),
    ],
)
def test_configure_respects_the_users_settings(user, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "YOLO_OFFLINE")}
    env.update(user, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    fields = out.stdout.split()
    if expected is None:  # the user's own spelling of "offline" is kept and read as offline
        assert fields[3:6] == ["true", "False", "False"]
    else:
        assert " ".join(fields[:5]) == expected
    if fields[3] != "0":
        assert fields[5] == "False"  # Ultralytics itself sees no network: nothing is downloaded
