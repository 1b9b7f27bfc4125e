"""Decode speed beside the peers, measured in one run, with the machine's bandwidth bound. Prints JSON.

    PYTHONPATH=. /work/bench-venv/bin/python benchmarks/decode_latency.py           # 124M shape, batch 1 and 8
    python benchmarks/decode_latency.py --shapes 1.3m --batches 1 --new-tokens 8 --repeats 1   # a smoke test

Engines (greedy, random weights, equal-length prompts, exactly N new tokens per row):
  ours_fp32 / ours_int8 / ours_int4   our torch-free runtime (deploy/runtime.py) over the bundles
                                      `gptflow export --quantize int8,int4` writes (MatMulNBits)
  genai_fp32 / genai_int8 / genai_int4 onnxruntime-genai's C++ loop over the same three graphs
  *_fp32_unfused / *_int8_unfused     both loops over the graph `--no-fused-attention` writes (the
                                      exporter's own attention nodes): what the fused graph gains
  optimum_fp32 / optimum_int8         a random HF GPT-2 of the same shape exported and quantized by
                                      optimum-onnx, run by ORTModelForCausalLM.generate
  transformers_fp32                   the same GPT-2 in PyTorch, generate with the KV cache
Peers need the bench extra (in a venv of its own: pip install -e '.[bench]'); a missing one is a
recorded skip with its reason. Engines are timed in interleaved rounds (best of --repeats each), so a
slow spell of this VM hits all of them. tok/s = batch * new tokens / seconds, prefill included.

The bound: decoding one token at batch 1 reads every matrix weight once, so tok/s cannot beat
read bandwidth / weight bytes per token. Bandwidth is measured on the spot (2-thread fp32 GEMV over
>= 1 GB); weight bytes are counted from each graph's MatMul initializers (scales included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.decode_peers import (  # noqa: E402
    Engine,
    genai_engine,
    optimum_engine,
    read_bandwidth,
    transformers_engine,
)
from deploy.runtime import GenerationConfig, load_bundle  # noqa: E402
from gpt.bundle import GENAI_CONFIG_FILE, ONNX_FILE, TOKENIZER_FILE, BundleConfig, genai_config  # noqa: E402
from gpt.config import ModelConfig  # noqa: E402
from gpt.export import BITS, ExportConfig, export_onnx, quantize_weights  # noqa: E402
from gpt.io import atomic_write_json, sha256_file  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.tokenizer import Tokenizer, TokenizerConfig  # noqa: E402

SHAPES = {
    "1.3m": dict(vocab_size=4000, block_size=512, n_layer=4, n_head=4, n_embd=128),
    "cpu": ModelConfig.PRESETS["cpu"] | {"block_size": 512},
    "124m": ModelConfig.PRESETS["gpt2-124m"],
}
MATMUL_OPS = {"MatMul", "Gemm", "FusedMatMul", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul"}


def make_bundle(model: GPT, tokenizer: Path, out: Path, fused_attention: bool = True) -> Path:
    """An fp32 bundle without the parity check (that is the tests' job): graph, tokenizer, configs."""
    out.mkdir(parents=True)
    export_onnx(model, out / ONNX_FILE, fused_attention=fused_attention)
    shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
    config = BundleConfig(
        kind="lm",
        model=model.config.to_dict(),
        tokenizer_hash=sha256_file(tokenizer),
        kv_cache="in_place" if fused_attention else "concat",
    )
    config.write(out)
    atomic_write_json(out / GENAI_CONFIG_FILE, genai_config(config))
    return out


def make_quantized(fp32: Path, precision: str, cfg: ExportConfig) -> Path:
    """The sibling `gptflow export --quantize` writes (same quantizer and settings; no quality gate)."""
    out = fp32.with_name(f"{fp32.name}-{precision}")
    shutil.copytree(fp32, out)
    config = BundleConfig.read(out)
    how = quantize_weights(
        fp32 / ONNX_FILE,
        out / ONNX_FILE,
        BITS[precision],
        cfg.block_size(precision, config.model["n_embd"]),
        cfg.quant_accuracy_level,
    )
    config.precision, config.quantization = precision, how
    config.write(out)
    return out


def weight_bytes(onnx_path: Path) -> int:
    """Bytes of the initializers that MatMul-like nodes read (through a Transpose too): what one
    batch-1 decode step must bring from memory. Embedding Gathers read one row and are left out."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    sizes = {t.name: len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in sizes}
    read = {alias.get(x, x) for n in graph.node if n.op_type in MATMUL_OPS for x in n.input[1:]}
    return sum(sizes[x] for x in read if x in sizes)


def ours(bundle: Path, name: str) -> Engine:
    lm = load_bundle(bundle)

    def decode(prompts: np.ndarray, n: int) -> np.ndarray:
        cfg = GenerationConfig(max_new_tokens=n, ignore_eos=True)
        return np.array(lm.generate_ids(prompts.tolist(), cfg))

    return Engine(name, decode, {"file_bytes": (bundle / ONNX_FILE).stat().st_size})


def build_engines(shape: str, tmp: Path, only: set[str] | None) -> tuple[dict[str, Engine], dict, dict]:
    """Every engine for ``shape`` (or those in ``only``); returns (engines, skips, weight bytes per token)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPES[shape])
    model = GPT(cfg).eval()
    text = "The quick brown fox jumps over the lazy dog; markets rose as investors cheered.\n" * 50
    tok = Tokenizer.train([text], tmp / "tok", TokenizerConfig(vocab_size=300))
    fp32 = make_bundle(model, tok.path, tmp / "bundle")
    unfused = make_bundle(model, tok.path, tmp / "unfused", fused_attention=False)
    bundles = {"fp32": fp32, "fp32_unfused": unfused}
    for precision in ("int8", "int4"):
        bundles[precision] = make_quantized(fp32, precision, ExportConfig())
    bundles["int8_unfused"] = make_quantized(unfused, "int8", ExportConfig())
    factories: dict[str, Any] = {}
    for key, path in bundles.items():
        factories[f"ours_{key}"] = lambda path=path, key=key: ours(path, f"ours_{key}")
        factories[f"genai_{key}"] = lambda path=path: genai_engine(path)
    peers = tmp / "optimum"
    factories["optimum_fp32"] = lambda: optimum_engine(SHAPES[shape], peers, int8=False)
    factories["optimum_int8"] = lambda: optimum_engine(SHAPES[shape], peers, int8=True)
    factories["transformers_fp32"] = lambda: transformers_engine(SHAPES[shape])
    engines, skips = {}, {}
    for name, make in factories.items():
        if only and name not in only:
            continue
        engine = make()
        if isinstance(engine, str):
            skips[name] = engine
        else:
            engine.name = name
            engines[name] = engine
    per_token = {}
    for key, path in bundles.items():  # both loops run the same graph
        per_token[f"ours_{key}"] = per_token[f"genai_{key}"] = weight_bytes(path / ONNX_FILE)
    for name, sub in (("optimum_fp32", "optimum-fp32/model.onnx"), ("optimum_int8", "optimum-int8")):
        files = [peers / sub] if sub.endswith(".onnx") else list((peers / sub).glob("*.onnx"))
        if name in engines and files:
            per_token[name] = weight_bytes(files[0])
    return engines, skips, per_token


def time_engines(engines: dict[str, Engine], prompts: np.ndarray, n: int, repeats: int) -> dict[str, float]:
    """Best seconds per engine over ``repeats`` interleaved rounds, after one warm-up each."""
    for engine in engines.values():
        engine.generate(prompts, n)
    best = dict.fromkeys(engines, float("inf"))
    for _ in range(repeats):
        for name, engine in engines.items():
            t0 = time.perf_counter()
            engine.generate(prompts, n)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def ratios(rows: list[dict]) -> dict[str, float]:
    """The comparisons the acceptance asks for, per shape and batch."""
    speed = {(r["shape"], r["batch"], r["engine"]): r["tok_per_s"] for r in rows}
    out = {}
    pairs = [(f"ours_{p}", f"optimum_{p}") for p in ("fp32", "int8")] + [("ours_int4", "optimum_int8")]
    pairs += [(f"ours_{p}", f"genai_{p}") for p in ("fp32", "int8", "int4")]
    pairs += [("ours_int4", "ours_int8"), ("ours_int8", "ours_fp32"), ("ours_fp32", "transformers_fp32")]
    # The graph's own gain, for both loops: fused attention against the exporter's plain attention.
    pairs += [(f"{e}_{p}", f"{e}_{p}_unfused") for e in ("genai", "ours") for p in ("fp32", "int8")]
    for shape, batch in sorted({(s, b) for s, b, _ in speed}):
        for a, b in pairs:
            if (shape, batch, a) in speed and (shape, batch, b) in speed:
                out[f"{shape} b{batch} {a}/{b}"] = round(speed[shape, batch, a] / speed[shape, batch, b], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="124m", help="comma list of " + ", ".join(SHAPES))
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds after one warm-up")
    p.add_argument("--engines", default="", help="comma list to run only these (default: all)")
    p.add_argument("--bandwidth-gb", type=float, default=1.0, help="GEMV matrix size for the bound")
    args = p.parse_args()
    only = set(args.engines.split(",")) if args.engines else None

    bandwidth = read_bandwidth(args.bandwidth_gb, threads=2)
    rows: list[dict] = []
    report: dict[str, Any] = {"benchmark": "decode_latency", "bandwidth": bandwidth, "skips": {}}
    for shape in args.shapes.split(","):
        with tempfile.TemporaryDirectory(prefix="decode-latency-") as tmp:
            t0 = time.perf_counter()
            engines, skips, per_token = build_engines(shape, Path(tmp), only)
            report["skips"] |= {f"{shape} {k}": v for k, v in skips.items()}
            report[f"{shape} setup_seconds"] = round(time.perf_counter() - t0, 1)
            report[f"{shape} engines"] = [e.describe() for e in engines.values()]
            rng = np.random.default_rng(0)
            for batch in map(int, args.batches.split(",")):
                prompts = rng.integers(4, 300, (batch, args.prompt))
                n = min(args.new_tokens, SHAPES[shape]["block_size"] - args.prompt)
                for name, seconds in time_engines(engines, prompts, n, args.repeats).items():
                    row = {"shape": shape, "batch": batch, "engine": name, "new_tokens": n}
                    row["tok_per_s"] = round(batch * n / seconds, 1)
                    row["ms_per_step"] = round(1000 * seconds / n, 2)
                    if batch == 1 and name in per_token:
                        bound = bandwidth["read_gb_per_s"] * 1e9 / per_token[name]
                        row["weight_mb_per_token"] = round(per_token[name] / 1e6, 1)
                        row["bound_tok_per_s"] = round(bound, 1)
                        row["fraction_of_bound"] = round(row["tok_per_s"] / bound, 3)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    report |= {"threads": torch.get_num_threads(), "results": rows, "ratios": ratios(rows)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
