#!/usr/bin/env python
"""Generate or classify with an exported bundle; needs only onnxruntime, numpy and sentencepiece.

    python deploy/infer.py --bundle artifacts/bundle "The market" -n 40 --temperature 0.8 --stream
    python deploy/infer.py --bundle artifacts/classifier "Shares fell sharply on Monday"

A bundle's kind (config.json) decides the mode: an LM generates, a classifier prints one JSON line per text.
Texts come from the arguments, or one per line from stdin when none are given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _runtime():
    """deploy.runtime when the package is importable, else the one beside this file (the folder that
    holds deploy/ also holds gpt/, for the bundle format)."""
    try:
        from deploy import runtime
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from deploy import runtime
    return runtime


def add_arguments(parser: argparse.ArgumentParser, texts: bool = True, bundle_required: bool = True) -> None:
    parser.add_argument(
        "--bundle",
        required=bundle_required,
        type=Path,
        help="bundle directory written by `gptflow export`"
        + ("" if bundle_required else " (default: the newest one in ./artifacts)"),
    )
    if texts:
        parser.add_argument(
            "texts", nargs="*", help="prompts (LM) or texts (classifier); stdin lines if none"
        )
    parser.add_argument("-n", "--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    parser.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=None,
        help="never repeat an n-gram of the output (0 = off; default: the bundle's, else 0)",
    )
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument(
        "--context-policy",
        choices=("error", "sliding"),
        default="error",
        help="prompt + output longer than the context: fail, or slide a window",
    )
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument("--cpu", action="store_true", help="use the CPU even when CUDA is available")


def generation_config(args: argparse.Namespace, defaults: dict | None = None):
    """The flags as a GenerationConfig; ``--no-repeat-ngram-size`` and ``--stop`` left out take the
    bundle's decoding defaults (``defaults``: its config.json ``generation``)."""
    defaults = defaults or {}
    no_repeat = args.no_repeat_ngram_size
    return _runtime().GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=defaults.get("no_repeat_ngram_size", 0) if no_repeat is None else no_repeat,
        stop=list(args.stop) or list(defaults.get("stop", [])),
        seed=args.seed,
        context_policy=args.context_policy,
    )


def run(args: argparse.Namespace, mode: str | None = None) -> int:
    """Generate (LM bundle) or classify (classifier bundle); ``mode`` insists on one of them."""
    rt = _runtime()
    model = rt.load_bundle(args.bundle, providers=["CPUExecutionProvider"] if args.cpu else None)
    kind = "generate" if isinstance(model, rt.OnnxLM) else "classify"
    if mode and mode != kind:
        need = "an LM" if mode == "generate" else "a classifier"
        raise ValueError(f"{args.bundle} holds {model.config.kind!r} model; `{mode}` needs {need} bundle")
    texts = list(args.texts) or [line.rstrip("\n") for line in sys.stdin]
    if kind == "classify":
        for text, result in zip(texts, model.classify(texts), strict=True):
            print(json.dumps({"text": text, **result}, ensure_ascii=False))
        return 0
    cfg = generation_config(args, model.config.generation)
    for text in texts:
        if args.stream:
            for piece in model.stream(text, cfg):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            print(model.generate(text, cfg)[0].text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
