"""Output paths checked before the work, and run folders that exist only once a run has really started."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sos_detect.options import OptionError


def check_writable_dir(path: str | Path, typed: str) -> None:
    """`path` is a folder that takes new files, or can be created as one; nothing is left behind by the check."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OptionError(f"{typed}: {probe} is a file, not a folder")
    try:
        tempfile.TemporaryDirectory(dir=probe, prefix=".sos-write-check-").cleanup()
    except OSError as err:
        raise OptionError(f"{typed}: cannot write in {probe} ({err.strerror or err})") from None


def check_output_file(path: str | Path, typed: str, inputs: dict[str, str] | None = None) -> None:
    """`path` can be written as a new file: not a folder, not one of `inputs` ({typed: path}), in a writable folder."""
    out = Path(path)
    if out.is_dir():
        raise OptionError(f"{typed}: is a folder; give the file to write, e.g. {out / 'shifted.pt'}")
    for flag, source in (inputs or {}).items():
        if Path(source).exists() and out.exists() and out.resolve() == Path(source).resolve():
            raise OptionError(f"{typed}: is the input {flag}; inputs are never overwritten")
    check_writable_dir(out.parent, typed)


@contextlib.contextmanager
def run_folder_removed_on_failure(model: Any, project: str | Path, name: str, exist_ok: bool) -> Iterator[None]:
    """Remove the run folder Ultralytics made for `model.train()` when the run fails before its first checkpoint
    (an existing folder reused with exist_ok is left alone), so that a failed start leaves nothing behind and a
    retry gets the same name."""
    made: dict[str, Path] = {}
    reused = exist_ok and (Path(project) / name).exists()
    model.add_callback("on_pretrain_routine_start", lambda trainer: made.setdefault("dir", Path(trainer.save_dir)))
    try:
        yield
    except BaseException:
        folder = made.get("dir")
        if folder is not None and not reused and folder.is_dir() and not any(folder.rglob("*.pt")):
            shutil.rmtree(folder, ignore_errors=True)
        raise
