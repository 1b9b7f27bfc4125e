"""Decode speed: our onnxruntime loop (deploy/runtime.py) vs PyTorch, greedy, random weights. Prints JSON.

    python benchmarks/decode_latency.py                 # cpu preset + 124M, batch 1/8, prompt 32/256, all engines
    python benchmarks/decode_latency.py --quick         # 1.3M shape batch 1 and 8, 124M shape batch 1
    python benchmarks/decode_latency.py --quick --shapes 1.3m --new-tokens 8 --repeats 1   # a smoke test

Engines: torch_cache (gpt.generate.generate_batch: GPT.decode with the KV cache), torch_nocache (full
recompute per token, as nanoGPT samples; on the 124M shape only at batch 1, where one run already takes
minutes), ort_fp32 and ort_int8 (our runtime over the exported bundle). Timing covers
prefill + all steps; tok/s = batch * new tokens / seconds. Run on an idle machine: a second busy process
slows 2-thread runs 20-40x.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.runtime import GenerationConfig, load_bundle  # noqa: E402
from gpt.bundle import ONNX_FILE, TOKENIZER_FILE, BundleConfig  # noqa: E402
from gpt.config import ModelConfig  # noqa: E402
from gpt.export import export_onnx, quantize_int8  # noqa: E402
from gpt.generate import generate_batch  # noqa: E402
from gpt.io import sha256_file  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.tokenizer import Tokenizer, TokenizerConfig  # noqa: E402

SHAPES = {
    "1.3m": dict(vocab_size=4000, block_size=512, n_layer=4, n_head=4, n_embd=128),
    "cpu": ModelConfig.PRESETS["cpu"] | {"block_size": 512},
    "124m": ModelConfig.PRESETS["gpt2-124m"],
}


def make_bundle(model: GPT, tokenizer: Path, out: Path, int8: bool) -> tuple[Path, Path | None]:
    """A bundle without the parity check (that is the tests' job): graph, tokenizer, config."""
    fp32 = out / "fp32"
    fp32.mkdir(parents=True)
    export_onnx(model, fp32 / ONNX_FILE)
    shutil.copyfile(tokenizer, fp32 / TOKENIZER_FILE)
    BundleConfig(kind="lm", model=model.config.to_dict(), tokenizer_hash=sha256_file(tokenizer)).write(fp32)
    if not int8:
        return fp32, None
    q = out / "int8"
    shutil.copytree(fp32, q)
    (q / ONNX_FILE).unlink()
    quantize_int8(fp32 / ONNX_FILE, q / ONNX_FILE)
    return fp32, q


@torch.no_grad()
def torch_decode(model: GPT, prompts: torch.Tensor, n: int, cache: bool) -> None:
    if cache:
        generate_batch(model, prompts.tolist(), max_new_tokens=n)
        return
    idx = prompts
    for _ in range(n):
        logits = model(idx[:, -model.config.block_size :])
        x = logits[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, x], dim=1)


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smaller matrix (1.3M and 124M shapes, prompt 32)")
    p.add_argument("--shapes", default=None, help="comma list of " + ", ".join(SHAPES))
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="best of N timed runs after one warm-up")
    args = p.parse_args()

    if not args.quick:
        plan = {
            s: [(b, pr) for b in (1, 8) for pr in (32, 256)] for s in (args.shapes or "cpu,124m").split(",")
        }
        engines = ("torch_cache", "torch_nocache", "ort_fp32", "ort_int8")
    else:
        default = {"1.3m": [(1, 32), (8, 32)], "124m": [(1, 32)]}
        plan = {s: default.get(s, [(1, 32)]) for s in (args.shapes or "1.3m,124m").split(",")}
        engines = ("torch_cache", "ort_fp32", "ort_int8")

    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = "The quick brown fox jumps over the lazy dog; markets rose as investors cheered.\n" * 50
        tok = Tokenizer.train([text], tmp / "tok", TokenizerConfig(vocab_size=300))
        for shape, cases in plan.items():
            cfg = ModelConfig(**SHAPES[shape])
            model = GPT(cfg).eval()
            t0 = time.perf_counter()
            fp32, int8 = make_bundle(model, tok.path, tmp / shape, int8="ort_int8" in engines)
            export_s = time.perf_counter() - t0
            runtimes = {"ort_fp32": load_bundle(fp32)}
            if int8:
                runtimes["ort_int8"] = load_bundle(int8)
            for batch, prompt_len in cases:
                prompts = torch.randint(4, 300, (batch, prompt_len))
                n = min(args.new_tokens, cfg.block_size - prompt_len)
                gen_cfg = GenerationConfig(max_new_tokens=n, ignore_eos=True)
                for engine in engines:
                    if engine == "torch_nocache" and shape == "124m" and batch > 1:
                        continue  # minutes per run; the batch-1 figure already shows the cost of no cache
                    if engine.startswith("ort"):
                        fn = functools.partial(runtimes[engine].generate_ids, prompts.tolist(), gen_cfg)
                    else:
                        fn = functools.partial(torch_decode, model, prompts, n, engine == "torch_cache")
                    fn()  # warm-up
                    s = timed(fn, args.repeats)
                    results.append(
                        {
                            "shape": shape,
                            "params": model.num_parameters(),
                            "engine": engine,
                            "batch": batch,
                            "prompt_tokens": prompt_len,
                            "new_tokens": n,
                            "tok_per_s": round(batch * n / s, 1),
                            "ms_per_token": round(1000 * s / n, 3),
                        }
                    )
                    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            results.append({"shape": shape, "export_seconds": round(export_s, 1)})
    speedups = {}
    for r in results:
        if r.get("engine") == "ort_fp32":
            key = (r["shape"], r["batch"], r["prompt_tokens"])
            ref = next(
                x
                for x in results
                if x.get("engine") == "torch_cache" and (x["shape"], x["batch"], x["prompt_tokens"]) == key
            )
            speedups[f"{key[0]} b{key[1]} p{key[2]} ort_fp32/torch_cache"] = round(
                r["tok_per_s"] / ref["tok_per_s"], 2
            )
            q = next(
                (
                    x
                    for x in results
                    if x.get("engine") == "ort_int8" and (x["shape"], x["batch"], x["prompt_tokens"]) == key
                ),
                None,
            )
            if q:
                speedups[f"{key[0]} b{key[1]} p{key[2]} ort_int8/ort_fp32"] = round(
                    q["tok_per_s"] / r["tok_per_s"], 2
                )
    print(
        json.dumps(
            {
                "benchmark": "decode_latency",
                "threads": torch.get_num_threads(),
                "results": results,
                "speedups": speedups,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
