"""Shared command-line machinery: one-line parser errors, flags built from option tables, Ultralytics-style
`key=value` arguments beside the flags, and the option checks every command runs before it reads or writes.

A command is a subparser made by `command()`; its options come from `Option` rows (`add_options`) or plain
`add_argument` calls. After parsing, `args.cli_names[key]` is how the user spelled each option they gave
(`--sos-tau`, `sos_tau=`, `--opt sos_tau=`), so that every error names the option as typed.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from sos_detect.core.options import MAX_IMGSZ, Option, OptionError, at_least, between, check_options, spell

_POSITIVE = at_least(1)
IMGSZ = Option("imgsz", int, 320, "image size in pixels", *between(32, MAX_IMGSZ))
BATCH = Option("batch", int, 16, "batch size", *_POSITIVE)
EPOCHS = Option("epochs", int, 30, "training epochs", *_POSITIVE)
SEED = Option("seed", int, 0, "random seed", *at_least(0))
# val, shift and hessian take these from the checkpoint unless given
CKPT_IMGSZ = replace(IMGSZ, default=None, optional=True, help="image size (default: the checkpoint's, else 640)")
CKPT_BATCH = replace(BATCH, default=None, optional=True, help="batch size (default: the checkpoint's, else 16)")
DEVICE_HELP = "cpu, 0, 0,1, cuda, … (default: the first CUDA GPU if there is one, else cpu)"


class HelpFormatter(argparse.HelpFormatter):
    """States every option's default in its help (unless the help already says what the default is)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unstated = action.default is None or action.default is False or action.default in (argparse.SUPPRESS, [])
        if not action.option_strings or "default" in text or unstated:
            return text
        return f"{text} (default %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and no abbreviated flags (errors name the flag as typed)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def command(
    sub: argparse._SubParsersAction,
    name: str,
    run: Callable[[argparse.Namespace], int],
    *,
    help: str,
    description: str | None = None,
    aliases: dict[str, str] | None = None,
    passthrough: bool = False,
    required: Iterable[str] = (),
) -> Parser:
    """A subcommand running `run(args)`. `aliases` maps Ultralytics keys to this command's options
    (`model` → `cfg`); `passthrough` accepts every other Ultralytics training key as `key=value` or `--opt`;
    `required` options may come as flags or as `key=value`."""
    p = sub.add_parser(name, help=help, description=description or help)
    p.set_defaults(
        cli_run=run,
        cli_parser=p,
        cli_table=(),
        cli_aliases=aliases or {},
        cli_passthrough=passthrough,
        cli_required=tuple(required),
        cli_sos_mode="guarded",  # --sos-mode when not given (classify's commands: paper)
    )
    return p


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option], title: str | None = None) -> None:
    """One flag per option row (`--sos-tau`, `--sos/--no-sos`), its help and default from the row."""
    options = tuple(options)
    group = parser.add_argument_group(title) if title else parser
    for o in options:
        kw: dict[str, Any] = dict(dest=o.key, default=o.default, help=o.help.replace("%", "%%"))
        if o.type is bool:
            group.add_argument(o.flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            group.add_argument(o.flag, type=o.type, choices=o.choices, metavar=o.key.upper().split("_")[-1], **kw)
    parser.set_defaults(cli_table=parser.get_default("cli_table") + options)


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help=DEVICE_HELP)


def _given_twice(args: argparse.Namespace, dest: str, typed: str) -> OptionError | None:
    """An option already given (in any form: `--epochs 0 epochs=1`, `--sos --no-sos`) is refused, not overridden."""
    if dest not in args.cli_names:
        return None
    first = args.cli_names[dest]
    first = spell(first, args.cli_texts[dest]) if dest in args.cli_texts else first
    return OptionError(f"{typed}: {first} was given too; give each option once")


def _typed_flags(args: argparse.Namespace, argv: list[str]) -> None:
    """Record, for every flag of the command in argv, the flag as typed and its value's text."""
    skip = False
    for i, token in enumerate(argv):
        if skip:  # the value of the flag before, even when it looks like a flag
            skip = False
            continue
        flag, eq, text = token.partition("=")
        action = args.cli_parser._option_string_actions.get(flag) if token.startswith("--") else None
        if action is not None:
            skip = not eq and action.nargs is None
            if not isinstance(action, argparse._AppendAction) and action.dest != "help":
                value = text if eq else argv[i + 1] if skip and i + 1 < len(argv) else ""
                twice = _given_twice(args, action.dest, spell(flag, value) if value else flag)
                if twice:
                    raise twice
            args.cli_names[action.dest] = flag
            if eq or (action.nargs != 0 and i + 1 < len(argv)):
                args.cli_texts[action.dest] = text if eq else argv[i + 1]


def _coerce(action: argparse.Action, raw: str, typed: str) -> Any:
    """A `key=value` text as the flag's type: numbers and booleans as Ultralytics reads them (`smart_value`),
    paths, names and devices verbatim."""
    from ultralytics.cfg import smart_value

    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        value = smart_value(raw)
        if not isinstance(value, bool):
            raise OptionError(f"{typed}: must be True or False")
    elif action.type in (None, str):
        value = None if raw.lower() == "none" else raw
    else:
        value = smart_value(raw)
        if action.type is int and isinstance(value, float) and value.is_integer():
            value = int(value)  # as Ultralytics reads epochs=1e2
        elif action.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is not None and (isinstance(value, bool) or not isinstance(value, action.type)):
            raise OptionError(f"{typed}: must be {'an integer' if action.type is int else 'a number'}")
    if action.choices is not None and value not in action.choices:
        raise OptionError(f"{typed}: must be one of {', '.join(map(str, action.choices))}")
    return value


def _unknown(token: str, known: Iterable[str]) -> OptionError:
    key = token.split("=", 1)[0]
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f" (similar: {', '.join(close)})" if close else ""
    return OptionError(f"{token}: unknown argument{hint}")


def _apply_pair(args: argparse.Namespace, token: str, prefix: str, overrides: dict[str, Any]) -> None:
    """Set one `key=value` (or `--opt key=value`) on args, or into the Ultralytics overrides."""
    from ultralytics.utils import DEFAULT_CFG_DICT

    parser = args.cli_parser
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "opt")}
    ultra = args.cli_passthrough
    known = [*actions, *args.cli_aliases, *(DEFAULT_CFG_DICT if ultra else ())]
    if token.startswith("-") or not token.split("=", 1)[0].isidentifier():
        raise _unknown(prefix + token, [a for act in actions.values() for a in act.option_strings])
    if "=" not in token:
        raise (OptionError(f"{prefix}{token}: needs a value ({token}=…)") if token in known else _unknown(token, known))
    key, raw = (s.strip() for s in token.split("=", 1))
    if not raw:
        raise OptionError(f"{prefix}{token}: missing value")
    dest = args.cli_aliases.get(key, key)
    typed = f"{prefix}{key}={raw}"
    twice = _given_twice(args, dest, typed)
    if twice:
        raise twice
    if dest in actions:
        setattr(args, dest, _coerce(actions[dest], raw, typed))
        args.cli_names[dest], args.cli_texts[dest] = f"{prefix}{key}=", raw
    elif ultra and key in DEFAULT_CFG_DICT and key != "mode":
        from ultralytics.cfg import smart_value

        overrides[key] = smart_value(raw)
        args.cli_names[key], args.cli_texts[key] = f"{prefix}{key}=", raw
    else:
        raise _unknown(prefix + token, known)


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(args from the flags, the other arguments: `key=value` or unknown); see `apply_key_values`."""
    args, extras = parser.parse_known_args(argv)
    args.cli_names, args.cli_texts, args.cli_overrides, args.cli_argv = {}, {}, {}, list(argv)
    return args, extras


def apply_key_values(args: argparse.Namespace, extras: list[str]) -> None:
    """Record how each flag was typed, then apply `key=value` arguments and `--opt KEY=VALUE` on top of the flags;
    `args.cli_overrides` gets the Ultralytics training arguments that are not options of the command. Anything
    else is an unknown argument; an option given twice, in any form, is refused."""
    from ultralytics.cfg import merge_equals_args

    _typed_flags(args, args.cli_argv)
    try:
        tokens = merge_equals_args(extras)
    except SyntaxError as err:
        raise OptionError(str(err)) from None
    for token in tokens:
        _apply_pair(args, token, "", args.cli_overrides)
    for token in getattr(args, "opt", None) or []:
        _apply_pair(args, token, "--opt ", args.cli_overrides)


def name(args: argparse.Namespace, key: str) -> str:
    """How the user spelled option `key` (its flag when not given)."""
    return args.cli_names.get(key, "--" + key.replace("_", "-"))


def typed(args: argparse.Namespace, key: str) -> str:
    """Option `key` with its value, as typed: `--imgsz 0`, `imgsz=0`."""
    return spell(name(args, key), args.cli_texts.get(key, getattr(args, key)))


def check_args(args: argparse.Namespace) -> None:
    """The command's required options, its table's checks, and Ultralytics' own type checks of pass-through keys."""
    for key in args.cli_required:
        if getattr(args, key, None) is None:
            alias = next((k for k, v in args.cli_aliases.items() if v == key), key)
            raise OptionError(f"the following arguments are required: --{key.replace('_', '-')} (or {alias}=)")
    check_options(vars(args), args.cli_table, lambda key: name(args, key), args.cli_texts)
    _check_ignored(args)
    _check_run_name(args)
    if args.cli_overrides:
        from ultralytics.cfg import check_cfg

        try:
            check_cfg(dict(args.cli_overrides))
        except (TypeError, ValueError) as err:
            raise OptionError(str(err).splitlines()[0]) from None


# options that only one --sos-mode uses (detection: sos_rows, sos_tau; classification: sos_batch, sos_samples)
MODE_ONLY = {"sos_rows": "paper", "sos_batch": "paper", "sos_tau": "guarded", "sos_samples": "guarded"}
UNSHIFTED_OK = ("sos", "sos_hessian_every", "sos_hessian_images", "sos_hessian_probes")  # used without shifts too


def _check_ignored(args: argparse.Namespace) -> None:
    """An option the command would ignore is refused: SOS options where no shift happens (train --no-sos,
    classify train without --sos, hessian without --before-after) and options of the other --sos-mode.
    A resumed run takes its saved settings, so its options are left to the resume check."""
    given = [k for k in args.cli_names if k.startswith("sos_") and k not in UNSHIFTED_OK and hasattr(args, k)]
    if not given or getattr(args, "resume", None):
        return
    sos = getattr(args, "before_after", getattr(args, "sos", True))
    switch = name(args, "sos") if name(args, "sos").startswith("--") else typed(args, "sos")
    off = {
        None: "without --sos (SOS is off by default here)",
        False: f"with {switch}" if hasattr(args, "sos") else "without --before-after",
    }.get(sos)
    if off:
        raise OptionError(f"{typed(args, given[0])}: has no effect {off} (no shift is made)")
    if not hasattr(args, "sos_mode"):  # a command without modes (reproduce classify's --sos-batch sweep)
        return
    mode = args.sos_mode or args.cli_sos_mode
    for key in given:
        if MODE_ONLY.get(key, mode) != mode:
            raise OptionError(f"{typed(args, key)}: only --sos-mode {MODE_ONLY[key]} uses it (here: {mode})")


def _check_run_name(args: argparse.Namespace) -> None:
    """--name is a folder inside --project: relative, without `..`, not the project itself."""
    run = getattr(args, "name", None)
    if not isinstance(run, str) or not hasattr(args, "project"):
        return
    parts = Path(run).parts
    if Path(run).is_absolute() or ".." in parts or not [p for p in parts if p != "."]:
        project = f"--project ({args.project})" if args.project else "the project folder"
        raise OptionError(f"{typed(args, 'name')}: must be a folder name inside {project}, without '..'")


def resolve_device(args: argparse.Namespace) -> str:
    """The --device value as Ultralytics takes it ('cpu', '0', '0,1'), refused in one line when that device is
    not here (a CUDA request without a GPU, an index beyond the GPUs present)."""
    import torch

    value = args.device
    if value is None:
        return "0" if torch.cuda.is_available() else "cpu"
    text = str(value).strip().lower().removeprefix("cuda:")
    if text in ("cpu", "mps"):
        if text == "mps" and not torch.backends.mps.is_available():
            raise OptionError(f"{typed(args, 'device')}: no Apple MPS device here; use --device cpu")
        return text
    text = "0" if text == "cuda" else text
    indices = text.split(",")
    if not all(i.strip().isdigit() for i in indices):
        raise OptionError(f"{typed(args, 'device')}: must be cpu, cuda, or GPU indices such as 0 or 0,1")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise OptionError(
            f"{typed(args, 'device')}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
            "use --device cpu"
        )
    missing = [i for i in indices if int(i) >= count]
    if missing:
        raise OptionError(f"{typed(args, 'device')}: GPU {missing[0]} is not here ({count} visible)")
    return ",".join(i.strip() for i in indices)


def torch_device(device: str) -> str:
    """The torch device of a resolved --device: 'cpu', 'mps' or the first listed GPU."""
    return device if device in ("cpu", "mps") else f"cuda:{device.split(',')[0]}"
