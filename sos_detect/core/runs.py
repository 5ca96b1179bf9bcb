"""Runs on disk: writes that an interruption never leaves half-done (write to a hidden file beside the target, then
rename it over the target, atomic on POSIX), and the one guard that reuses a finished run only when its settings are
the ones asked for."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` atomically."""
    import torch

    _atomic(path, lambda tmp: torch.save(obj, tmp))


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, byte for byte (no newline translation)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            f.write(text)

    _atomic(path, write)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of one set of keys (the first row's, in its order) as a CSV file with a header, written atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def changed_settings(saved: Mapping[str, Any], now: Mapping[str, Any], free: Collection[str] = ()) -> list[str]:
    """'key saved → now' for every setting of `now` that differs from the saved run's; `free` ones (where a run may
    differ: device, workers, …) and those the saved run predates (absent from it) aside."""
    return [f"{k} {saved[k]!r} → {v!r}" for k, v in now.items() if k not in free and k in saved and saved[k] != v]


def finished_record(
    done: Path, now: Mapping[str, Any], *, key: str = "settings", free: Collection[str] = ()
) -> dict[str, Any] | None:
    """The record a finished run left in `done` (JSON; its settings under `key`), None when there is none; a run
    with other settings is refused in one line naming the file and what differs."""
    if not done.is_file():
        return None
    record = json.loads(done.read_text())
    changed = changed_settings(record[key], now, free)
    if changed:
        raise ValueError(f"{done}: a finished run with other settings ({', '.join(changed)}); choose another --out")
    return record
