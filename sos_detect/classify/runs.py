"""A classification run's folder: where a run goes, which interrupted run a resume continues, and the guard that a
resumed run has its own settings.

Runs land in project/name, auto-incremented like Ultralytics' (train, train-2, …); a finished run (model.pt) is
never overwritten. An interrupted run's last.pt holds everything needed to continue it bit-exactly.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from sos_detect.classify.config import TrainConfig
from sos_detect.core.runs import changed_settings

CHECKPOINT = "last.pt"  # written after every epoch, removed when the run finishes
FINISHED = "model.pt"  # a finished run: never overwritten
RESUME_FREE = ("project", "name", "exist_ok", "resume", "device", "workers")  # settings a resumed run may change


def unfinished_runs(project: str | Path, name: str) -> list[Path]:
    """Run folders project/name, project/name-2, … holding a last.pt, the most recently written first."""
    base = Path(project) / name
    found = [base] + [p for p in base.parent.glob(f"{name}-*") if p.name[len(name) + 1 :].isdigit()]
    runs = [p for p in found if (p / CHECKPOINT).is_file()]
    return sorted(runs, key=lambda p: (p / CHECKPOINT).stat().st_mtime, reverse=True)


def resume_folder(resume: bool | str, project: str | Path, name: str) -> Path:
    """The run that resume=… continues: the given folder (or its last.pt), or the latest unfinished project/name."""
    if resume is True:
        runs = unfinished_runs(project, name)
        if not runs:
            raise FileNotFoundError(f"{Path(project) / name}: no unfinished run of this name to resume (no last.pt)")
        return runs[0]
    path = Path(resume)
    folder = path.parent if path.name == CHECKPOINT else path
    if not (folder / CHECKPOINT).is_file():
        state = "a finished run, nothing to resume" if (folder / FINISHED).is_file() else "no last.pt"
        raise FileNotFoundError(f"{path}: {state} (--resume)")
    return folder


def resume_config(resume: bool | str, project: str, name: str, given: dict[str, Any]) -> TrainConfig:
    """The saved settings of the run to resume, `given` on top; train() refuses those that differ (RESUME_FREE aside).

    This is what `classify train --resume` runs: options the user typed are checked against the run's own.
    """
    folder = resume_folder(resume, project, name)
    saved = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=True)["config"]
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in saved.items() if k in known}, **given, "resume": str(folder)})


def run_folder(cfg: TrainConfig) -> Path:
    """Where the run goes: the resumed folder, project/name with exist_ok, else project/name auto-incremented."""
    if cfg.resume:
        return resume_folder(cfg.resume, cfg.project, cfg.name)
    from ultralytics.utils.files import increment_path

    folder = increment_path(Path(cfg.project) / cfg.name, exist_ok=cfg.exist_ok)
    if (folder / FINISHED).is_file():
        raise ValueError(f"{folder}: holds a finished run ({FINISHED}), never overwritten; drop --exist-ok or rename")
    return folder


def load_checkpoint(cfg: TrainConfig, folder: Path) -> dict[str, Any]:
    """folder/last.pt of an interrupted run with the same settings as cfg (RESUME_FREE aside)."""
    path = folder / CHECKPOINT
    state = torch.load(path, map_location="cpu", weights_only=True)
    changed = changed_settings(state["config"], asdict(cfg), RESUME_FREE)  # settings the run predates aside
    if changed:
        raise ValueError(
            f"{path}: an unfinished run with other settings ({', '.join(changed)}); resume it with its own "
            "settings or start a new run without --resume"
        )
    return state


def open_run(cfg: TrainConfig) -> tuple[Path, dict[str, Any] | None]:
    """The run's folder (run_folder; not created here) and, when resuming, its last.pt state (load_checkpoint); a
    fresh run names the latest other unfinished run of project/name, which --resume would continue."""
    from ultralytics.utils import LOGGER

    folder = run_folder(cfg)
    state = load_checkpoint(cfg, folder) if cfg.resume else None
    if state is None:
        for other in unfinished_runs(cfg.project, cfg.name)[:1]:
            if other != folder:
                LOGGER.info(f"{other} holds an unfinished run; --resume continues it")
    return folder, state
