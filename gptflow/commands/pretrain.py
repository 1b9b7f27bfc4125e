"""``gptflow pretrain``: train a GPT on token shards; under ``torchrun --nproc_per_node=N`` it runs DDP."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from gpt.config import ModelConfig
from gpt.train_config import TrainConfig
from gptflow.args import add_config_args, config_overrides

HELP = "pretrain a GPT on token shards (single process, or DDP under torchrun)"
PRESETS = tuple(ModelConfig.PRESETS)
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
    """preset < --config YAML < command-line flags."""
    model_fields: dict[str, Any] = {}
    train_fields: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.is_file():
            raise FileNotFoundError(f"--config file not found: {args.config}")
        data = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict) or set(data) - {"model", "train"}:
            raise ValueError(
                f"{args.config} must be a mapping with `model:` and/or `train:` sections, got keys {list(data)}"
            )
        model_fields, train_fields = dict(data.get("model") or {}), dict(data.get("train") or {})
    model_fields.update(config_overrides(args, ModelConfig, prefix=MODEL_PREFIX))
    train_fields.update(config_overrides(args, TrainConfig))
    model_config = ModelConfig.preset(args.preset, **model_fields)
    train_config = TrainConfig.preset(args.preset, **train_fields)
    return model_config, train_config


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
