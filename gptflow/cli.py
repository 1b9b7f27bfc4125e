"""gptflow: train, finetune, evaluate, export and serve a from-scratch GPT.

Each subcommand lives in ``gptflow/commands/<name>.py`` (HELP, add_arguments(parser), run(args)).
Only the module of the command being run is imported, so ``gptflow generate`` and ``gptflow serve``
work where torch is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# In pipeline order; name -> module under gptflow.commands.
COMMANDS: dict[str, str] = {
    "tokenizer": "tokenizer",
    "shard": "shard",
    "pretrain": "pretrain",
    "finetune": "finetune",
    "evaluate": "evaluate",
    "export": "export",
    "generate": "generate",
    "classify": "classify",
    "serve": "serve",
    "pipeline": "pipeline",
}


def _requested_command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the requested command's module is imported."""
    wanted = _requested_command(argv) if argv is not None else None
    if wanted not in COMMANDS:
        wanted = None  # no or unknown command: import all, for the full help text
    parser = argparse.ArgumentParser(prog="gptflow", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if wanted is not None and name != wanted:
            sub.add_parser(name)
            continue
        module = importlib.import_module(f"gptflow.commands.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:  # one line per HTTP call to the local Prefect API is noise
        logging.getLogger("httpx").setLevel(logging.WARNING)
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
