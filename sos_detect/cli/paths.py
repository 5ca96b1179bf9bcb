"""Output paths checked before the work, and run folders that exist only once a run has really started."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sos_detect.core.options import OptionError


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


def check_figure_file(path: str | Path, typed: str) -> None:
    """`path` is a new file of a format matplotlib writes (.png, .pdf, .svg, …; no suffix: PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix and suffix not in formats:
        raise OptionError(f"{typed}: .{suffix} is not a figure format; use one of .{', .'.join(sorted(formats))}")
    check_output_file(path, typed)


RUN_MARKER = ".sos-starting"  # in a run folder until its first checkpoint: "HOST PID" of the process training it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def killed_before_checkpoint(folder: Path) -> bool:
    """`folder` is what a run killed before its first checkpoint leaves (args.yaml, an empty weights/, label
    plots): it holds the marker of a process of this host that is gone, no checkpoint and no results.csv. Folders
    without the marker are never judged."""
    try:
        host, _, pid = (folder / RUN_MARKER).read_text().partition(" ")
        started = (folder / "results.csv").exists() or any(folder.rglob("*.pt"))
    except (OSError, UnicodeDecodeError):
        return False
    if host != socket.gethostname() or not pid.strip().isdigit():
        return False
    return not started and not _alive(int(pid))


def clear_killed_starts(project: str | Path, name: str) -> list[Path]:
    """Remove the folders project/name, name2, name3, … (Ultralytics' names) that runs killed before their first
    checkpoint left (`killed_before_checkpoint`), so that the next run takes the name again; returns them."""
    base = Path(project)
    if not base.is_dir():
        return []
    found = [f for f in base.glob(f"{glob.escape(name)}*") if f.name[len(name) :].isdigit() or f.name == name]
    removed = [f for f in sorted(found) if f.is_dir() and not f.is_symlink() and killed_before_checkpoint(f)]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


@contextlib.contextmanager
def run_folder_removed_on_failure(model: Any, project: str | Path, name: str, exist_ok: bool) -> Iterator[None]:
    """The run folder Ultralytics makes for `model.train()` exists only once the run has a checkpoint: a run that
    fails before it removes the folder (an existing folder reused with exist_ok is left alone), and one killed
    before it (SIGKILL, power loss) is recognised by the next run by its marker and removed, so that a retry gets
    the same name."""
    for folder in clear_killed_starts(project, name):
        print(f"removed {folder}: left by a run killed before its first checkpoint")
    made: dict[str, Path] = {}
    reused = exist_ok and (Path(project) / name).exists()

    def started(trainer: Any) -> None:
        made.setdefault("dir", Path(trainer.save_dir))
        if not reused:
            (made["dir"] / RUN_MARKER).write_text(f"{socket.gethostname()} {os.getpid()}")

    model.add_callback("on_pretrain_routine_start", started)
    model.add_callback("on_model_save", lambda trainer: (Path(trainer.save_dir) / RUN_MARKER).unlink(missing_ok=True))
    try:
        yield
    except BaseException:
        folder = made.get("dir")
        if folder is not None and not reused and folder.is_dir() and not any(folder.rglob("*.pt")):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        if made.get("dir") is not None:
            (made["dir"] / RUN_MARKER).unlink(missing_ok=True)


@contextlib.contextmanager
def fresh_build(out: str | Path, typed: str, force: bool) -> Iterator[Path]:
    """A folder to build a dataset in, swapped in as `out` only once the build is complete.

    A non-empty `out` is refused unless `force`; with `force` the new build replaces the old one by two renames
    (old aside, new in: `out` is the old dataset or the new one, never a mix), entries of the old folder that the
    build does not make (a NOTICE, the user's own files) are moved into the new one, and the old build is deleted
    last. A failed or interrupted build removes its temporary folder and leaves `out` as it was."""
    out = Path(out).absolute()
    out = out.resolve() if out.is_symlink() else out  # a linked --out: the build replaces the folder it points to
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
