"""The `sos-detect` command: one module per command family, each registering its subcommands.

Adding a command: in its family's `register`, `p = command(sub, "name", run, help=...)`, then its flags
(`add_options` for option-table rows, `p.add_argument` for the rest); `run(args)` returns the exit code.
"""

from __future__ import annotations

import io
import sys

from sos_detect.cli import classify, data, detect, reproduce
from sos_detect.cli.options import Parser, apply_key_values, check_args, parse

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
    from sos_detect.runtime import configure

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
        message = str(err).splitlines()[0] if str(err) else repr(err)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
