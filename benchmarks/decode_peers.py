"""Peer engines that ``benchmarks/decode_latency.py`` times in the same run as our runtime, and the
machine's memory read bandwidth (the ceiling on decode speed: each token reads every weight once).

Peers: optimum-onnx (a random HF GPT-2 of our shape, exported by optimum, fp32 and int8),
transformers (the same GPT-2 in PyTorch, KV cache on) and onnxruntime-genai (its C++ loop over our
own bundle). Each is an ``Engine`` whose ``generate(prompts, n)`` decodes exactly ``n`` greedy tokens
per row; a factory returns a string (the reason) instead when its package is missing or its export
fails, so the benchmark records a skip. They need the bench venv (``pip install -e '.[bench]'``).

    PYTHONPATH=. /work/bench-venv/bin/python benchmarks/decode_peers.py   # tiny self-check, prints JSON
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt.bundle import EOS_ID, GENAI_CONFIG_FILE, ONNX_FILE, PAD_ID, BundleConfig, genai_config  # noqa: E402
from gpt.io import atomic_write_json  # noqa: E402

INSTALL_HINT = "pip install -e '.[bench]' in a venv of its own"
OPTIMUM_FP32, OPTIMUM_INT8, OPTIMUM_INT8_FILE = "optimum-fp32", "optimum-int8", "model_quantized.onnx"


@dataclass
class Engine:
    """A peer the benchmark times: ``generate`` is what a run costs, ``describe`` what was run."""

    name: str
    decode: Callable[[np.ndarray, int], np.ndarray]  # (prompts (B, T) int64, n) -> new ids (B, n)
    info: dict[str, Any] = field(default_factory=dict)

    def generate(self, prompts: np.ndarray, n_new: int) -> np.ndarray:
        """Exactly ``n_new`` greedy tokens after each of the equal-length prompts (B, T); EOS never
        stops a row. Returns the new ids (B, n_new), which the timing ignores and the checks compare."""
        return self.decode(np.asarray(prompts, dtype=np.int64), n_new)

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, **self.info}


def _versions(*packages: str) -> dict[str, str]:
    return {p: importlib.metadata.version(p) for p in packages}


def _file_bytes(directory: Path, pattern: str = "*.onnx*") -> int:
    """Bytes of the graph files (external weight data included)."""
    return sum(p.stat().st_size for p in directory.glob(pattern))


# --------------------------------------------------------------------------------------------
# Memory bandwidth


def read_bandwidth(gigabytes: float = 1.0, threads: int = 2) -> dict[str, Any]:
    """Memory read bandwidth measured on the spot: a ``threads``-thread fp32 GEMV over a matrix of at
    least ``gigabytes`` GB (far beyond any cache), best of 5 after a warm-up, with two kernels:
    ``torch.mv`` and onnxruntime's MatMul (MLAS, what every ONNX engine here decodes with). The bound
    is the faster of the two: a kernel that reads slower than the memory can is not the memory's limit.

    A GEMV reads each matrix element once and does two flops with it, as a decode step does with each
    weight, so this is the speed a bandwidth-bound decoder can reach. torch's thread count is restored.
    """
    cols = 4096
    rows = math.ceil(gigabytes * 1e9 / (4 * cols))
    # Written, not np.empty: untouched pages all map to one zero page and read from cache.
    matrix = np.ones((rows, cols), dtype=np.float32)
    try:
        speeds = {"torch_mv": _gemv_torch(matrix, threads), "onnxruntime_matmul": _gemv_ort(matrix, threads)}
    finally:
        del matrix
    return {
        "gemv_gb": round(rows * cols * 4 / 1e9, 3),
        "threads": threads,
        "gb_per_s_by_kernel": speeds,
        "read_gb_per_s": max(speeds.values()),
    }


def _best_of(fn: Callable[[], Any], runs: int = 5) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _gemv_torch(matrix: np.ndarray, threads: int) -> float:
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        m = torch.from_numpy(matrix)  # no copy
        v = torch.ones(m.shape[1])
        return round(matrix.nbytes / 1e9 / _best_of(lambda: torch.mv(m, v)), 2)
    finally:
        torch.set_num_threads(previous)


def _gemv_ort(matrix: np.ndarray, threads: int) -> float:
    """x (1, K) @ W (K, N) with W bound in place (an OrtValue over the numpy buffer, no copy)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    K, N = matrix.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemv",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [K, N]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(np.ones((1, K), np.float32)))
    binding.bind_ortvalue_input("w", ort.OrtValue.ortvalue_from_numpy(matrix))
    binding.bind_output("y", "cpu")
    return round(matrix.nbytes / 1e9 / _best_of(lambda: session.run_with_iobinding(binding)), 2)


# --------------------------------------------------------------------------------------------
# A random HF GPT-2 of our shape (transformers and optimum)


def gpt2_config(shape: dict[str, Any]) -> Any:
    """HF ``GPT2Config`` for our ``ModelConfig`` keys. Our special ids, not GPT-2's 50256 (outside a
    small vocabulary); no dropout, as ours."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=shape["vocab_size"],
        n_positions=shape["block_size"],
        n_embd=shape["n_embd"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def random_gpt2(shape: dict[str, Any]) -> Any:
    """``GPT2LMHeadModel`` with weights seeded by ``torch.manual_seed(0)``; the caller's RNG state is
    left as it was (the benchmark draws its prompts from it)."""
    from transformers import GPT2LMHeadModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return GPT2LMHeadModel(gpt2_config(shape)).eval()


def _hf_decode(model: Any, prompts: np.ndarray, n: int) -> np.ndarray:
    """HF ``generate``, greedy: ``min_new_tokens`` masks EOS until the last step, so each row gets n."""
    ids = torch.from_numpy(prompts)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            pad_token_id=PAD_ID,
        )
    return out[:, ids.shape[1] :].numpy()


def transformers_engine(shape: dict[str, Any], int8: bool = False) -> Engine | str:
    """The random GPT-2 in PyTorch, ``generate`` with the KV cache (fp32 only)."""
    if int8:
        return "the transformers peer is fp32 only"
    try:
        model = random_gpt2(shape)
    except ImportError as e:
        return f"transformers is not importable ({e}); {INSTALL_HINT}"
    info = {
        "versions": _versions("transformers", "torch"),
        "params": sum(p.numel() for p in model.parameters()),
        "attn_implementation": model.config._attn_implementation,
        "torch_threads": torch.get_num_threads(),
    }
    return Engine("transformers_fp32", lambda prompts, n: _hf_decode(model, prompts, n), info)


# --------------------------------------------------------------------------------------------
# optimum-onnx


def cpu_quantization_preset() -> str:
    """The ``AutoQuantizationConfig`` preset for this CPU, from the flags the kernel reports (a VM may
    hide AVX-512 that the host chip has; ORT's kernels can only use what is exposed)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "avx2"
    flags = set(
        next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    )
    if not flags:  # no x86 flags line: arm64
        return "arm64"
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    return "avx512" if "avx512f" in flags else "avx2"


def _optimum_export(shape: dict[str, Any], workdir: Path) -> Path:
    """The random GPT-2 saved under ``workdir/hf`` and exported by optimum (decoder with past) to
    ``workdir/optimum-fp32``; an export already there is reused, so fp32 and int8 share one."""
    from optimum.onnxruntime import ORTModelForCausalLM

    out = workdir / OPTIMUM_FP32
    if (out / ONNX_FILE).is_file():
        return out
    random_gpt2(shape).save_pretrained(workdir / "hf")
    with warnings.catch_warnings():  # the tracer's warnings about HF's Python control flow
        warnings.simplefilter("ignore")
        model = ORTModelForCausalLM.from_pretrained(
            workdir / "hf", export=True, use_cache=True, local_files_only=True
        )
    model.save_pretrained(out)
    return out


def _optimum_quantize(fp32_dir: Path, out: Path, preset: str) -> Path:
    """optimum's documented dynamic int8: ``ORTQuantizer`` with the CPU's ``AutoQuantizationConfig``
    preset, per-tensor (as our bundle's int8). Writes ``out/model_quantized.onnx``."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    if not (out / OPTIMUM_INT8_FILE).is_file():
        qconfig = getattr(AutoQuantizationConfig, preset)(is_static=False, per_channel=False)
        ORTQuantizer.from_pretrained(fp32_dir).quantize(quantization_config=qconfig, save_dir=out)
    return out


def optimum_engine(shape: dict[str, Any], workdir: Path, int8: bool) -> Engine | str:
    """A random HF GPT-2 of ``shape`` exported by optimum-onnx and run by ``ORTModelForCausalLM.generate``
    (its KV cache, plain onnxruntime sessions); ``int8`` quantizes it the optimum way first."""
    try:
        from optimum.onnxruntime import ORTModelForCausalLM
    except ImportError as e:
        return f"optimum-onnx is not importable ({e}); {INSTALL_HINT}"
    workdir = Path(workdir)
    preset = cpu_quantization_preset() if int8 else None
    try:
        model_dir = _optimum_export(shape, workdir)
        file_name = ONNX_FILE
        if preset:
            model_dir, file_name = (
                _optimum_quantize(model_dir, workdir / OPTIMUM_INT8, preset),
                OPTIMUM_INT8_FILE,
            )
        model = ORTModelForCausalLM.from_pretrained(
            model_dir, file_name=file_name, use_cache=True, local_files_only=True
        )
    except Exception as e:  # any failure of the peer's toolchain is a recorded skip, not a crashed benchmark
        return f"optimum export failed: {type(e).__name__}: {e}"
    info = {
        "versions": _versions("optimum-onnx", "onnxruntime", "transformers"),
        "file_bytes": _file_bytes(model_dir),
        "quantization": f"dynamic, {preset} preset, per-tensor" if preset else None,
    }
    name = "optimum_int8" if int8 else "optimum_fp32"
    return Engine(name, lambda prompts, n: _hf_decode(model, prompts, n), info)


# --------------------------------------------------------------------------------------------
# onnxruntime-genai over our bundle


def genai_engine(bundle_dir: Path) -> Engine | str:
    """onnxruntime-genai's C++ decode loop over our bundle's graph, greedy, batched.

    genai reads ``genai_config.json``; the export stage writes it, and it is written here from the
    bundle's ``config.json`` when missing (``decode_latency.make_bundle`` skips that stage).
    onnxruntime-genai 0.18 takes batch sizes 1 to 32 (``og.Generator`` raises RuntimeError beyond).
    """
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        return f"onnxruntime-genai is not importable ({e}); {INSTALL_HINT}"
    bundle = Path(bundle_dir)
    config = BundleConfig.read(bundle)
    if not (bundle / GENAI_CONFIG_FILE).is_file():
        atomic_write_json(bundle / GENAI_CONFIG_FILE, genai_config(config))
    model = og.Model(str(bundle))

    def decode(prompts: np.ndarray, n: int) -> np.ndarray:
        batch, length = prompts.shape
        params = og.GeneratorParams(model)
        # min_length = max_length: EOS is masked until the last token, so every row gets exactly n.
        params.set_search_options(
            batch_size=batch, max_length=length + n, min_length=length + n, do_sample=False
        )
        generator = og.Generator(model, params)
        generator.append_tokens(prompts)  # (B, T) int64
        for _ in range(n):
            generator.generate_next_token()
        return np.stack([np.asarray(generator.get_sequence(r))[length:] for r in range(batch)])

    info = {"versions": _versions("onnxruntime-genai"), "file_bytes": _file_bytes(bundle)}
    return Engine("genai_" + config.precision, decode, info)


# --------------------------------------------------------------------------------------------
# Self-check: every peer once on a tiny random model, and genai's greedy tokens against ours


def _tiny_bundle(shape: dict[str, Any], out: Path) -> Path:
    """A random gptflow LM of ``shape`` exported as decode_latency.py does (no parity check). Its
    weights are scaled up 6x (as tests/lm_fixtures.py does) so that greedy output does not repeat the
    prompt's last token, which would make a token comparison prove little."""
    from benchmarks.decode_latency import make_bundle
    from gpt.config import ModelConfig
    from gpt.model import GPT
    from gpt.tokenizer import Tokenizer, TokenizerConfig

    text = "The quick brown fox jumps over the lazy dog; markets rose as investors cheered.\n" * 50
    tok = Tokenizer.train([text], out / "tok", TokenizerConfig(vocab_size=shape["vocab_size"]))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT(ModelConfig(**shape)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(6.0)
    return make_bundle(model, tok.path, out / "bundle")


def _timed_once(engine: Engine, prompts: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """(new ids, tok/s) of one run after a warm-up: enough for a smoke test, not for figures."""
    engine.generate(prompts, n)
    t0 = time.perf_counter()
    ids = engine.generate(prompts, n)
    seconds = time.perf_counter() - t0
    if ids.shape != (len(prompts), n):
        raise AssertionError(f"{engine.name} returned ids of shape {ids.shape}, not {(len(prompts), n)}")
    return ids, len(prompts) * n / seconds


def self_check() -> dict[str, Any]:
    """Each engine once at batch 1 and 2 on a tiny random model; whether genai's greedy tokens on our
    bundle equal our runtime's, and optimum's export equal the transformers model it came from."""
    from deploy.runtime import GenerationConfig, load_bundle

    shape = dict(vocab_size=300, block_size=128, n_layer=2, n_head=2, n_embd=64)
    n, prompt_len = 12, 16
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(4, shape["vocab_size"], (b, prompt_len)) for b in (1, 2)}
    report: dict[str, Any] = {
        "bandwidth": read_bandwidth(gigabytes=0.25),
        "shape": shape,
        "runs": [],
        "skips": {},
    }
    with tempfile.TemporaryDirectory(prefix="decode-peers-") as tmp:
        tmp = Path(tmp)
        bundle = _tiny_bundle(shape, tmp)
        lm = load_bundle(bundle)
        ours = Engine(
            "ours_fp32",
            lambda p, k: np.array(
                lm.generate_ids(p.tolist(), GenerationConfig(max_new_tokens=k, ignore_eos=True))
            ),
        )
        factories = {
            "ours_fp32": lambda: ours,
            "genai_fp32": lambda: genai_engine(bundle),
            "optimum_fp32": lambda: optimum_engine(shape, tmp / "optimum", int8=False),
            "optimum_int8": lambda: optimum_engine(shape, tmp / "optimum", int8=True),
            "transformers_fp32": lambda: transformers_engine(shape),
        }
        tokens: dict[tuple[str, int], np.ndarray] = {}
        for key, make in factories.items():
            engine = make()
            if isinstance(engine, str):
                report["skips"][key] = engine
                continue
            for batch, p in prompts.items():
                tokens[engine.name, batch], tok_per_s = _timed_once(engine, p, n)
                report["runs"].append({**engine.describe(), "batch": batch, "tok_per_s": round(tok_per_s, 1)})
    report["same_greedy_tokens"] = {
        f"{a} == {b} at batch {batch}": bool(np.array_equal(tokens[a, batch], tokens[b, batch]))
        for a, b in (("genai_fp32", "ours_fp32"), ("optimum_fp32", "transformers_fp32"))
        for batch in prompts
        if (a, batch) in tokens and (b, batch) in tokens
    }
    # Evidence the comparison is worth something: distinct tokens per row, and no EOS (which ours
    # keeps with ignore_eos while genai's min_length masks it: a legitimate difference).
    report["ours_distinct_tokens_per_row"] = {
        batch: [len(set(row)) for row in tokens["ours_fp32", batch].tolist()] for batch in prompts
    }
    report["ours_emitted_eos"] = any(bool((tokens["ours_fp32", b] == EOS_ID).any()) for b in prompts)
    return report


if __name__ == "__main__":
    print(json.dumps(self_check(), indent=2))
