"""Output paths checked before the work, and run folders that exist only once a run has really started."""

from __future__ import annotations

import contextlib
import os
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


@contextlib.contextmanager
def fresh_build(out: str | Path, typed: str, force: bool) -> Iterator[Path]:
    """A folder to build a dataset in, swapped in as `out` only once the build is complete.

    A non-empty `out` is refused unless `force`; with `force` the new build replaces the old one by two renames
    (old aside, new in: `out` is the old dataset or the new one, never a mix), entries of the old folder that the
    build does not make (a NOTICE, the user's own files) are moved into the new one, and the old build is deleted
    last. A failed or interrupted build removes its temporary folder and leaves `out` as it was."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise OptionError(f"{typed}: {out} is a file, not a folder")
    check_writable_dir(out.parent, typed)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not force:
        shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
        raise OptionError(
            f"{typed}: not empty ({shown}); a build never writes into an existing folder: pass --force to replace "
            "what the build makes there once the new build is complete (other files are kept), or choose another --out"
        )
    made = out.parent
    while not made.parent.exists():
        made = made.parent
    made = None if made.exists() else made  # the first folder this build creates, removed if the build fails
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    try:
        yield work
        old = work.with_name(work.name.replace(".building-", ".old-"))
        if out.is_dir():
            os.replace(out, old)
        os.replace(work, out)
        if old.is_dir():
            for entry in old.iterdir():
                kept = out / entry.name
                if not kept.exists() and not kept.is_symlink():
                    os.replace(entry, kept)
            shutil.rmtree(old)
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
