"""Command line: ``stablenets train | info | stability`` (also ``python -m stablenets_ext``).

``stablenets train`` with no arguments trains a 64-layer Verlet network of
width 4 on the swiss roll with the fused kernels (where compiled) and prints
the validation accuracy. Settings not given on the command line come from
:data:`stablenets_ext.training.presets.PRESETS` for the dataset and arch.

Thin by design: argparse -> :class:`~stablenets_ext.training.TrainConfig`
and the trainer's ``Options`` -> ``fit``; errors are caught by type
(usage errors and bad files: exit 2; a failed worker: exit 1; Ctrl-C or
SIGTERM: 130)."""

from __future__ import annotations

import json
import sys

from ..training.runtime import WorkerError
from ..training.runtime.torchrun import sigterm_as_interrupt
from .errors import CliError
from .parser import build_parser
from .train import cmd_train

__all__ = ["CliError", "build_parser", "main"]


def cmd_info(args) -> int:
    from .. import info

    data = info()
    if args.json:
        print(json.dumps(data))
        return 0
    width = max(len(k) for k in data)
    for key, value in data.items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value)) or "none"
        print(f"{key:<{width}}  {value}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .._env import problems

    bad = problems()  # a bad STABLENETS_* variable: one line, whatever the command
    if bad and not any(a in ("-h", "--help") for a in argv[:2]):
        print(f"stablenets: error: {bad[0]}", file=sys.stderr)
        return 2
    if argv and argv[0] == "stability":
        from .. import stability

        return stability.main(argv[1:]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.command}"
    try:
        with sigterm_as_interrupt():
            if args.command == "info":
                return cmd_info(args)
            return cmd_train(args, argv[1:], parser)
    except (CliError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        why = str(exc) or "KeyboardInterrupt"
        print(f"{prog}: interrupted ({why})", file=sys.stderr)
        return 130
    except WorkerError as exc:
        # A parallel trainer's failed, dead or hung worker: the message names it;
        # the coordinator's traceback adds nothing for a user.
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1


def _one_line(exc) -> str:
    text = str(exc) if not isinstance(exc, OSError) or not exc.filename else \
        f"{exc.filename}: {exc.strerror}"
    return " ".join(text.split("\n")) if text else type(exc).__name__
