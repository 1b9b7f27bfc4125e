"""``gptflow evaluate``: score a finetuned model on its task's test split beside baselines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "evaluate a finetuned checkpoint on a task's test split, with baselines on the same split"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task", help="task name or .csv/.jsonl file (default: the task the checkpoint was finetuned on)"
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="finetuned model dir, or a finetune output dir (uses best/)",
    )
    parser.add_argument(
        "--pretrained",
        type=Path,
        help="un-finetuned model for the baseline and bits per byte (default: the one finetuning started from)",
    )
    parser.add_argument("--out", type=Path, help="report dir (default: artifacts/evaluate/<task>)")
    parser.add_argument(
        "--max-examples", type=int, help="completion tasks: test examples scored (default: the task's)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (default: 32)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    parser.add_argument("--json", action="store_true", help="print metrics.json")


def run(args: argparse.Namespace) -> int:
    from gpt.checkpoint import read_model_meta, resolve_model_dir
    from gpt.evaluate import evaluate

    ckpt = resolve_model_dir(args.checkpoint)
    task = args.task or read_model_meta(ckpt).get("task")
    if not task:
        raise ValueError(f"{ckpt} records no task; pass --task NAME")
    pretrained = resolve_model_dir(args.pretrained) if args.pretrained else None
    out = args.out or Path("artifacts") / "evaluate" / Path(str(task)).stem
    report = evaluate(
        task,
        ckpt,
        out,
        pretrained_dir=pretrained,
        max_examples=args.max_examples,
        batch_size=args.batch_size,
        device=args.device,
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    primary = report["primary_metric"]
    print(
        f"{report['task']} ({report['n_scored']} test examples): {primary} {report['metrics'][primary]:.4f}"
    )
    for name, metrics in report["baselines"].items():
        print(f"  baseline {name}: {primary} {metrics[primary]:.4f}")
    if "pretrained_lm" in report:
        lm = report["pretrained_lm"]
        print(f"  pretrained LM on the test text: {lm['bpb']:.3f} bits/byte, perplexity {lm['ppl']:.1f}")
    if report.get("copy_probe"):
        gains = ", ".join(f"{name} {p['gain']:+.2f}" for name, p in report["copy_probe"].items())
        print(f"  copying from the context (loss drop on a repeated random sequence, nats/token): {gains}")
    print(f"report in {out}")
    return 0
