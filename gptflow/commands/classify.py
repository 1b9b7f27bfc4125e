"""``gptflow classify``: labels and class probabilities from an exported classifier bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from deploy.infer import run as _run
from gptflow.bundles import resolve_bundle

HELP = "classify texts with an ONNX classifier bundle (one JSON line per text)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="classifier bundle written by `gptflow export` (default: the newest one in ./artifacts)",
    )
    parser.add_argument("texts", nargs="*", help="texts to classify; stdin lines if none")
    parser.add_argument("--cpu", action="store_true", help="use the CPU even when CUDA is available")


def run(args: argparse.Namespace) -> int:
    args.bundle = resolve_bundle(args.bundle, "classifier")
    return _run(args, mode="classify")
