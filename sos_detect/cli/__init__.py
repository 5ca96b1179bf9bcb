"""The `sos-detect` command: one module per command family, each registering its subcommands.

Adding a command: in its family's `register`, `p = command(sub, "name", run, help=...)`, then its flags
(`add_options` for option-table rows, `p.add_argument` for the rest); `run(args)` returns the exit code.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from sos_detect.cli import classify, data, detect, reproduce
from sos_detect.cli.arguments import Parser, apply_key_values, check_args, parse

FAMILIES = (detect, data, classify, reproduce)
ERRORS = (OSError, ValueError, TypeError, SyntaxError)  # OSError: missing files, folders, permissions


def build_parser() -> Parser:
    parser = Parser(prog="sos-detect", description="Stochastic Optimum Shifting for YOLO detectors and classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for family in FAMILIES:
        family.register(sub)
    return parser


def _line_buffered() -> None:
    """Output appears as it is printed, also when stdout is a file or a pipe (long runs are watched that way)."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True)


def main(argv: list[str] | None = None) -> int:
    from sos_detect.core.runtime import configure

    _line_buffered()
    configure()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = "sos-detect"
    try:
        args, extras = parse(parser, argv)
        prog = args.cli_parser.prog
        apply_key_values(args, extras)
        check_args(args)
        return args.cli_run(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except ERRORS as err:
        print(f"{prog}: error: {one_line(str(err)) if str(err) else repr(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - anything else is a bug: one line, the traceback in a file
        report = _write_traceback(argv)
        where = f"traceback in {report}" if report else "no traceback file could be written"
        print(
            f"{prog}: internal error (a bug in sos-detect, please report it): "
            f"{type(err).__name__}: {one_line(str(err))}; {where}",
            file=sys.stderr,
        )
        return 1


def one_line(message: str) -> str:
    """A message on one line: line breaks (a path may hold one) written as \\n, not cut."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def _write_traceback(argv: list[str]) -> Path | None:
    """The current exception's traceback and the command line, in a new file in the temporary folder."""
    try:
        fd, name = tempfile.mkstemp(prefix=f"sos-detect-bug-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(f"sos-detect {' '.join(map(repr, argv))}\n\n{traceback.format_exc()}")
        return Path(name)
    except OSError:
        return None
