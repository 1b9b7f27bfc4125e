"""``gptflow generate``: text from an exported bundle through onnxruntime (no torch needed)."""

from __future__ import annotations

import argparse

from deploy.infer import add_arguments as _add_arguments
from deploy.infer import run as _run
from gptflow.bundles import resolve_bundle

HELP = "generate text from an ONNX bundle (greedy or sampled, optionally streamed)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_arguments(parser, bundle_required=False)


def run(args: argparse.Namespace) -> int:
    args.bundle = resolve_bundle(args.bundle, "lm")
    return _run(args, mode="generate")
