"""``gptflow pretrain``: train a GPT on token shards; under ``torchrun --nproc_per_node=N`` it runs DDP."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from gpt.config import PRESETS, ModelConfig
from gpt.train_config import TrainConfig
from gptflow.args import add_config_args, merged_sections

HELP = "pretrain a GPT on token shards (single process, or DDP under torchrun)"
MODEL_PREFIX = "model-"
# vocab_size comes from the tokenizer; the classification fields belong to finetuning.
MODEL_EXCLUDE = ("vocab_size", "n_classes", "pad_token_id")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", choices=PRESETS, default="cpu", help="model + training preset (default: cpu)"
    )
    parser.add_argument("--data", type=Path, required=True, help="shard directory (from `gptflow shard`)")
    parser.add_argument(
        "--out", type=Path, required=True, help="run directory for checkpoints, best/, metrics"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument(
        "--config", type=Path, help="YAML with `model:` and/or `train:` sections (flags override it)"
    )
    parser.add_argument("--init-from", type=Path, help="start from the weights of a model directory")
    add_config_args(parser, TrainConfig)
    add_config_args(parser, ModelConfig, exclude=MODEL_EXCLUDE, prefix=MODEL_PREFIX)


def build_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """preset < --config YAML (`model:` and `train:` sections) < command-line flags."""
    fields = merged_sections(args, {"model": (ModelConfig, MODEL_PREFIX), "train": (TrainConfig, "")})
    return ModelConfig.preset(args.preset, **fields["model"]), TrainConfig.preset(
        args.preset, **fields["train"]
    )


def run(args: argparse.Namespace) -> int:
    from gpt.train import TrainingDiverged, train

    model_config, train_config = build_configs(args)
    try:
        summary = train(
            model_config,
            train_config,
            args.data,
            args.out,
            resume=args.resume,
            init_from=args.init_from,
        )
    except TrainingDiverged as e:
        print(f"gptflow pretrain: training diverged: {e}", file=sys.stderr)
        return 3
    if summary["world_size"] == 1 or os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in summary.items() if k != "rank_weight_checksums"}, indent=2))
    return 0
