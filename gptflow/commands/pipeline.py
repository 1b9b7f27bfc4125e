"""``gptflow pipeline``: the whole chain as a Prefect flow, in-process (no server to start)."""

from __future__ import annotations

import argparse
import json

from gpt.config import PRESETS
from gpt.export import QUANTIZE

HELP = "run tokenizer → shard → pretrain → finetune/evaluate per task → ONNX export, tracked in MLflow"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=PRESETS, default="cpu", help="model + training preset (default: cpu)")
    p.add_argument(
        "--corpus", default="bbc", help="built-in corpus name or a local file/directory (default: bbc)"
    )
    p.add_argument(
        "--tasks",
        nargs="*",
        default=None,
        help="built-in task names or CSV/JSONL task files (default: bbc-topic bbc-headline qa; "
        "--tasks alone: the language model only)",
    )
    p.add_argument(
        "--vocab-size", type=int, default=None, help="tokenizer vocabulary (default: the preset's)"
    )
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the preset's pretraining steps")
    p.add_argument(
        "--pretrain-max-time", type=float, default=None, help="pretraining wall-clock budget, seconds"
    )
    p.add_argument(
        "--finetune-epochs", type=int, default=None, help="override every task's finetuning epochs"
    )
    p.add_argument(
        "--quantize",
        nargs="?",
        const="int8",
        default="none",
        choices=QUANTIZE,
        help="also export quantized bundles: int8 (the default with no value), int4 or int8,int4 "
        "(quality cost measured on the corpus's held-out text)",
    )
    p.add_argument(
        "--init-from",
        default="scratch",
        help="start pretraining from: scratch (default), a model directory, or models:/NAME@ALIAS "
        "(e.g. models:/gptflow-lm@champion; scratch when it does not exist yet)",
    )
    p.add_argument(
        "--fresh-tokenizer",
        action="store_true",
        help="train a new tokenizer even when warm-starting (then the weights start from scratch too)",
    )
    p.add_argument(
        "--min-improvement",
        type=float,
        default=None,
        help="how much a new version must beat the champion by, on the same held-out data, to be "
        "promoted (metric units: bits per byte for the LM, accuracy for classifiers; default 0.001)",
    )
    p.add_argument(
        "--dask-address",
        default=None,
        help="run the shard stage's partition tasks on this Dask scheduler (tcp://HOST:PORT); "
        "default: a local process pool, one worker per core",
    )
    p.add_argument("--workdir", default="artifacts", help="where stage outputs go (default: ./artifacts)")
    p.add_argument(
        "--mlruns", default="mlruns", help="local MLflow store (ignored if MLFLOW_TRACKING_URI is set)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from flows.env import quiet_defaults

    quiet_defaults()  # before prefect/mlflow are imported
    from flows.pipeline import DEFAULT_TASKS, pipeline, render_summary

    result = pipeline(
        preset=args.preset,
        corpus=args.corpus,
        tasks=DEFAULT_TASKS if args.tasks is None else args.tasks,
        vocab_size=args.vocab_size,
        pretrain_steps=args.pretrain_steps,
        pretrain_max_time=args.pretrain_max_time,
        finetune_epochs=args.finetune_epochs,
        quantize=args.quantize,
        init_from=args.init_from,
        fresh_tokenizer=args.fresh_tokenizer,
        **({"min_improvement": args.min_improvement} if args.min_improvement is not None else {}),
        dask_address=args.dask_address,
        workdir=args.workdir,
        mlruns=args.mlruns,
    )
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for stage, state in result["states"].items():
            print(f"{stage:28s} {state:10s} {result['timings_s'][stage]:8.1f} s")
        for name, d in result["results"]["registry"].items():
            if d.get("registered"):
                print(
                    f"{name}: v{d['version']} {d['decision']} -> {d['alias']} ({d['metric']} "
                    f"{d['candidate']:.4f} vs champion {d['champion_before']} on the same {d['eval_items']} items)"
                )
            else:
                print(f"{name}: already registered as v{d['version']}; nothing new")
        print(
            f"total {result['total_s']:.1f} s · MLflow run {result['run_id']} · outputs in {result['workdir']}"
        )
        print(render_summary(result))
    return 0
