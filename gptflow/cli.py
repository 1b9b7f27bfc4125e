"""``gptflow`` entry point: a subcommand per stage, each in ``gptflow/commands/<name>.py``.

Command modules import only light things at module level (argparse, gpt.config); heavy imports
(torch, prefect, onnxruntime) happen inside ``run`` so ``gptflow generate`` works without torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> module under gptflow.commands exposing HELP, add_arguments(parser) and run(args) -> int
COMMANDS: dict[str, str] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptflow", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"gptflow.commands.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # Bad input: one clear line, no traceback (use -v for the traceback).
        if args.verbose:
            raise
        print(f"gptflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
