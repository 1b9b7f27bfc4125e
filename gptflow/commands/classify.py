"""``gptflow classify``: labels and class probabilities from an exported classifier bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from deploy.infer import run as _run

HELP = "classify texts with an ONNX classifier bundle (one JSON line per text)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bundle", required=True, type=Path, help="classifier bundle written by `gptflow export`"
    )
    parser.add_argument("texts", nargs="*", help="texts to classify; stdin lines if none")
    parser.add_argument("--cpu", action="store_true", help="use the CPU even when CUDA is available")


def run(args: argparse.Namespace) -> int:
    return _run(args, mode="classify")
