"""``gptflow export``: a checkpoint becomes a verified ONNX bundle (and optionally an int8 sibling)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptflow.args import add_config_args, merged_fields

HELP = "export a checkpoint to an ONNX bundle (KV-cache decoder or classifier), parity-checked"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gpt.export import ExportConfig

    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="checkpoint directory (model.json + weights)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("artifacts/bundle"), help="bundle directory to write"
    )
    parser.add_argument(
        "--tokenizer", type=Path, help="tokenizer.model (default: the one beside the checkpoint)"
    )
    parser.add_argument(
        "--eval-text",
        type=Path,
        help="UTF-8 text file to measure int8's quality cost on (bits per byte; one text per line for a classifier)",
    )
    parser.add_argument("--config", type=Path, help="YAML file with ExportConfig fields (flags override it)")
    parser.add_argument(
        "--triton-repo",
        type=Path,
        metavar="DIR",
        help="also write a Triton model repository (onnxruntime backend) for the bundle's graph into DIR",
    )
    parser.add_argument(
        "--triton-name", help="model name in the Triton repository (default: the bundle directory name)"
    )
    add_config_args(parser, ExportConfig)


def run(args: argparse.Namespace) -> int:
    from gpt.export import ExportConfig, export_bundle

    config = ExportConfig.from_dict(merged_fields(args, ExportConfig))
    eval_text = None
    if args.eval_text:
        if not args.eval_text.is_file():
            raise FileNotFoundError(f"--eval-text file not found: {args.eval_text}")
        eval_text = args.eval_text.read_text(encoding="utf-8")
    result = export_bundle(args.checkpoint, args.out, config, eval_text=eval_text, tokenizer=args.tokenizer)
    if args.triton_repo:
        from deploy.triton import write_triton_repo

        result["triton_model"] = str(write_triton_repo(args.out, args.triton_repo, args.triton_name))
    print(json.dumps(result, indent=2))
    return 0
