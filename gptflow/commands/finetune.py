"""``gptflow finetune``: finetune a pretrained model on a built-in task or a CSV/JSONL task file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptflow.args import add_config_args, merged_fields

HELP = "finetune a pretrained checkpoint on a task (classification head or prompt → completion)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gpt.finetune_config import FinetuneConfig
    from gpt.tasks import TASKS

    parser.add_argument(
        "--task",
        required=True,
        help=f"built-in task ({', '.join(TASKS)}) or a .csv/.jsonl file with text,label or prompt,completion",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="pretrained model dir, or a pretraining run dir (uses best/)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output dir (the model goes to OUT/best)")
    parser.add_argument("--config", type=Path, help="FinetuneConfig YAML (flags override it)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_config_args(parser, FinetuneConfig)


def build_config(args: argparse.Namespace):
    """The task's defaults < --config YAML < command-line flags."""
    from gpt.finetune_config import FinetuneConfig

    return FinetuneConfig.for_task(args.task, **merged_fields(args, FinetuneConfig))


def run(args: argparse.Namespace) -> int:
    from gpt.checkpoint import resolve_model_dir
    from gpt.finetune import finetune

    config = build_config(args)
    result = finetune(args.task, resolve_model_dir(args.checkpoint), args.out, config)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    else:
        val = ", ".join(f"{k} {v:.4f}" for k, v in result["best_val"].items() if k.startswith("val_"))
        print(
            f"{result['task']}: {result['steps']} steps in {result['train_seconds']:.0f}s ({result['stopped']}); "
            f"best {val}; model in {result['best_dir']}"
        )
    return 0
