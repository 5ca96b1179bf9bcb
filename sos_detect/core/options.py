"""Every `sos_*` training option in one table: name, type, default, help and the check it must pass.

The detection trainer takes its defaults and its argument check from `SOS_OPTIONS`; the command line builds
its flags and `--help` from the same rows and checks every command's options against them before anything is
read or written. An error names the option as the user spelled it (`--sos-tau 1`, `sos_tau=1`). What a shift
does (the rows of groups shift and capture) travels as one frozen `ShiftConfig`, checked once when it is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, make_dataclass
from typing import Any

HEAD_KINDS = ("box", "cls", "mask", "kpt", "angle")  # a Detect head's output convs: every task's, then each task's own


class OptionError(ValueError):
    """A bad option value; the one-line message names the option as typed."""


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    """(check, rule) for an integer >= low."""
    return (lambda v: _int(v) and v >= low), f"an integer >= {low}"


MAX_IMGSZ = 4096  # image side: a 4096 px batch of 16 is already 3 GB of float input; 100000 px asks cv2 for 28 GB


def between(low: int, high: int) -> tuple[Callable[[Any], bool], str]:
    """(check, rule) for an integer in [low, high]."""
    return (lambda v: _int(v) and low <= v <= high), f"an integer in [{low}, {high}]"


def parse_heads(which: str | Iterable[str]) -> tuple[str, ...]:
    """'box,cls' or ('box', 'cls') → a checked tuple of HEAD_KINDS."""
    kinds = tuple(k.strip() for k in (which.split(",") if isinstance(which, str) else which) if k.strip())
    bad = [k for k in kinds if k not in HEAD_KINDS]
    if bad or not kinds:
        raise ValueError(f"sos_heads must be a comma-separated subset of {HEAD_KINDS}, got {which!r}")
    return kinds


def _heads_ok(v: Any) -> bool:
    try:
        return isinstance(v, str) and bool(parse_heads(v))
    except ValueError:
        return False


@dataclass(frozen=True)
class Option:
    """One option: `key` is its name in Ultralytics' args (`sos_tau`), `flag` its command-line spelling."""

    key: str
    type: type  # int, float, str or bool: how a flag's text is read
    default: Any
    help: str
    check: Callable[[Any], bool] = lambda v: True
    rule: str = ""  # what `check` demands, in words ("an integer >= 1")
    optional: bool = False  # None is allowed (and then means what `help` says)
    group: str = "shift"  # shift | capture | schedule (training only) | hessian: which commands take it
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def validate(self, value: Any, typed: str) -> None:
        """Raise OptionError `"<typed>: must be <rule>"` unless `value` passes (`typed`: the option as given)."""
        if value is None and self.optional:
            return
        if self.type is bool:
            ok = isinstance(value, bool)
        elif self.type is float:
            ok = _number(value) and self.check(value)
        elif self.type is int:
            ok = _int(value) and self.check(value)
        else:
            ok = isinstance(value, str) and (self.choices is None or value in self.choices) and self.check(value)
        if not ok:
            rule = self.rule or ("True or False" if self.type is bool else f"one of {', '.join(self.choices or ())}")
            raise OptionError(f"{typed}: must be {rule}")


def _option(key: str, type_: type, default: Any, help_: str, group: str, **kw: Any) -> Option:
    return Option(key, type_, default, help_, group=group, **kw)


_POSITIVE, _ONE = at_least(1)
_NONNEG, _ZERO = at_least(0)

SOS_OPTIONS: tuple[Option, ...] = (
    _option("sos", bool, True, "shift the head convs during training (--no-sos: the baseline)", "schedule"),
    _option(
        "sos_mode",
        str,
        "guarded",
        "guarded: min ‖V'‖ with output change ≤ τ on the capture set; paper: τ = 0 on --sos-rows sampled rows "
        "(the paper's SOS)",
        "shift",
        choices=("guarded", "paper"),
    ),
    _option(
        "sos_tau",
        float,
        1e-4,
        "guarded mode's relative output-change budget τ: ‖A(V'−V)‖ ≤ τ‖AV‖ on the capture set, 0 ≤ τ < 1",
        "shift",
        check=lambda v: 0 <= v < 1,
        rule="a number in [0, 1)",
    ),
    _option(
        "sos_rows",
        int,
        None,
        "paper mode: rows b sampled per head conv, below its input width (required with --sos-mode paper)",
        "shift",
        check=_POSITIVE,
        rule=_ONE,
        optional=True,
    ),
    _option(
        "sos_heads",
        str,
        "box,cls",
        "head convs to shift: box, cls, and a task's own output convs (mask for segment, kpt for pose, angle for "
        "OBB), comma-separated",
        "shift",
        check=_heads_ok,
        rule="a comma-separated subset of box, cls, mask, kpt, angle",
    ),
    _option(
        "sos_loss_tol",
        float,
        None,
        "roll a shift back if the capture-set loss rises by more than this fraction (default: off)",
        "shift",
        check=lambda v: v >= 0,
        rule="a finite number >= 0",
        optional=True,
    ),
    _option(
        "sos_max_change",
        float,
        0.05,
        "roll a shift back if it changes a head conv's outputs on all captured rows (not only the sampled ones) by "
        "more than this relative amount ‖A(V'−V)‖/‖AV‖ (sos_max_change=None: never; the paper's SOS changes "
        "outputs on unsampled rows by far more)",
        "shift",
        check=lambda v: v > 0,
        rule="a number > 0",
        optional=True,
    ),
    _option(
        "sos_capture",
        str,
        "train",
        "where the Grams come from: train = hooks on the last --sos-images training passes before a shift "
        "(augmented, no extra forward pass); eval = a separate pass over --sos-images letterboxed training images",
        "schedule",
        choices=("train", "eval"),
    ),
    _option(
        "sos_images",
        int,
        64,
        "training images captured per shift (see --sos-capture)",
        "capture",
        check=_POSITIVE,
        rule=_ONE,
    ),
    _option(
        "sos_ema",
        str,
        "own",
        "how the EMA (the network validated and saved) is shifted: own = on its own eval pass over --sos-ema-images "
        "letterboxed training images (its output change on unseen images stays near τ); grams = on the model's "
        "training-pass Grams (no extra pass; its change on unseen images reaches tens of τ); follow = not shifted, "
        "it follows the shifted model through its updates",
        "schedule",
        choices=("own", "grams", "follow"),
    ),
    _option(
        "sos_ema_images",
        int,
        8,
        "letterboxed training images of the EMA's own capture pass (--sos-ema own)",
        "schedule",
        check=_POSITIVE,
        rule=_ONE,
    ),
    _option(
        "sos_order",
        str,
        "end",
        "end = shift after an epoch's training, before its validation and checkpoint; start = the paper's Algorithm 1: "
        "shift at the start of the next epoch (on the Grams captured at the end of the last), then train it, so every "
        "validation follows a full epoch of training after a shift (the EMA's held-out change is then not logged: "
        "its validation measures training too)",
        "schedule",
        choices=("end", "start"),
    ),
    _option(
        "sos_heldout_images",
        int,
        0,
        "letterboxed validation images on which each shift's per-layer output change is measured and logged "
        "(sos_log.jsonl: heldout_change of every layer, model and EMA; an extra eval pass per network); 0 = off",
        "schedule",
        check=_NONNEG,
        rule=_ZERO,
    ),
    _option("sos_every", int, 1, "shift every N epochs", "schedule", check=_POSITIVE, rule=_ONE),
    _option(
        "sos_start",
        int,
        None,
        "0-based first epoch after which a shift may happen (default: the warm-up epochs, rounded up)",
        "schedule",
        check=_NONNEG,
        rule=_ZERO,
        optional=True,
    ),
    _option(
        "sos_final",
        bool,
        True,
        "shift once more after the final epoch, before the last validation (--sos-order end only)",
        "schedule",
    ),
    _option(
        "sos_hessian_every",
        int,
        0,
        "log the EMA's Hessian traces (cls and box head convs, head, whole model) every N epochs; 0 = off",
        "hessian",
        check=_NONNEG,
        rule=_ZERO,
    ),
    _option(
        "sos_hessian_images",
        int,
        8,
        "training images in the Hessian's loss batch (the same images every time)",
        "hessian",
        check=_POSITIVE,
        rule=_ONE,
    ),
    _option(
        "sos_hessian_probes",
        int,
        32,
        "Hessian-vector products at most per Hutch++ trace estimate (stops earlier at 5 % standard error)",
        "hessian",
        check=_POSITIVE,
        rule=_ONE,
    ),
)
SOS_DEFAULTS: dict[str, Any] = {o.key: o.default for o in SOS_OPTIONS}


def sos_options(*groups: str) -> tuple[Option, ...]:
    """The rows of the given groups, in table order."""
    return tuple(o for o in SOS_OPTIONS if o.group in groups)


def spell(name: str, value: Any) -> str:
    """An option with its value as typed: `--sos-tau 1`, `sos_tau=1`, `--opt sos_tau=1`."""
    return f"{name}{value}" if name.endswith("=") else f"{name} {value}"


def check_options(
    values: dict[str, Any],
    options: Iterable[Option],
    name: Callable[[str], str] | None = None,
    texts: dict[str, str] | None = None,
) -> None:
    """Check every option of `options` present in `values`. `name(key)` spells an option as the user gave it
    (`--sos-tau`, `sos_tau=`; default Ultralytics' `key=`), `texts[key]` its value as typed (default: the value)."""
    name = name or (lambda key: f"{key}=")
    texts = texts or {}
    options = list(options)
    for o in options:
        if o.key in values:
            o.validate(values[o.key], spell(name(o.key), texts.get(o.key, values[o.key])))
    keys = {o.key for o in options}
    if {"sos_mode", "sos_rows"} <= keys and values.get("sos_mode") == "paper" and values.get("sos_rows") is None:
        mode, rows = name("sos_mode"), name("sos_rows")
        if mode.endswith("sos_mode=") and not rows.endswith("="):  # key=value style: answer in that style
            rows = mode.removesuffix("sos_mode=") + "sos_rows="
        raise OptionError(f"{spell(mode, 'paper')}: needs {rows} (the number b of sampled rows, below the layer width)")


def check_sos_args(args: Any) -> None:
    """Validate the sos_* options of an args namespace against `SOS_OPTIONS`; errors name the option."""
    check_options({o.key: getattr(args, o.key) for o in SOS_OPTIONS if hasattr(args, o.key)}, SOS_OPTIONS)


def check_rows_below_width(rows: int | None, widths: dict[str, int], typed: str) -> None:
    """Paper mode samples b rows per layer; b must be below every shifted layer's input width."""
    if rows is None or not widths:
        return
    name, width = min(widths.items(), key=lambda kv: kv[1])
    if rows >= width:
        raise OptionError(f"{typed}: must be below the layer width ({name} of this model takes {width} inputs)")


SHIFT_GROUPS = ("shift", "capture")  # the rows a ShiftConfig holds: what a shift does, on how many images


def _check_config(config: Any) -> None:
    check_options({f"sos_{f}": getattr(config, f) for f in config.__dataclass_fields__}, sos_options(*SHIFT_GROUPS))


def _solve_tau(config: Any) -> float:
    """The budget the solver is given: τ in guarded mode, 0 in paper mode (exact on the sampled rows)."""
    return 0.0 if config.mode == "paper" else float(config.tau)


def _sampled_rows(config: Any) -> int | None:
    """Rows b sampled per layer (paper mode), None when every captured row is solved on (guarded mode)."""
    return config.rows if config.mode == "paper" else None


def _from_values(cls: type, values: Any = None, **options: Any) -> Any:
    """A ShiftConfig from sos_* keys (an args namespace or a mapping; others ignored), then `options` by field."""
    values = vars(values) if values is not None and not isinstance(values, dict) else (values or {})
    given = {o.key.removeprefix("sos_"): values[o.key] for o in sos_options(*SHIFT_GROUPS) if o.key in values}
    return cls(**{**given, **options})


ShiftConfig = make_dataclass(
    "ShiftConfig",
    [(o.key.removeprefix("sos_"), Any, field(default=o.default)) for o in sos_options(*SHIFT_GROUPS)],
    frozen=True,
    namespace={
        "__doc__": "What one shift does, built once from the option table's shift and capture rows (a field per row, "
        "named without sos_, with its default) and checked when built (errors name the option as sos_key=value).",
        "__post_init__": _check_config,
        "solve_tau": property(_solve_tau),
        "sampled_rows": property(_sampled_rows),
        "of": classmethod(_from_values),
    },
)
ShiftConfig.__module__ = __name__
