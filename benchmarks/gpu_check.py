"""The numbers of ``benchmarks/gpu_check.sh``: training tokens/s and MFU, decode tokens/s, and the
CUDA tests' outcomes, as one JSON line.

Training: the gpt2-124m shape (12L/12H/768d, vocab 50257, context 1024), bf16 autocast with fp32
master weights, torch.compile, fused AdamW, clipping: the step gpt.train runs. MFU is against a bf16
matmul peak measured here, on the spot. Decode: greedy, batch 1, a 32-token prompt and 128 new
tokens with the KV cache, in torch (gpt.generate) and, where this onnxruntime has the CUDA
provider, through our runtime on the exported graph with IOBinding.

    python benchmarks/gpu_check.py --junit results.xml      # what gpu_check.sh runs
    GPTFLOW_CHECK_DEVICE=cpu python benchmarks/gpu_check.py --shape tiny   # the same, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # not deploy/: its triton.py would shadow the triton package

from gpt.config import ModelConfig  # noqa: E402
from gpt.device import autocast, resolve_device, resolve_precision  # noqa: E402
from gpt.generate import generate_batch  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.optim import build_optimizer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def matmul_peak(device: torch.device, n: int) -> float:
    """Best bf16 FLOP/s of an n x n x n product over 10 tries (after 3 warm-ups)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    return max(2 * n**3 / timed(lambda: a @ b, device) for _ in range(10))


def train_speed(config: ModelConfig, device: torch.device, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    raw = GPT(config).to(device).train()
    model = torch.compile(raw)
    opt = build_optimizer(raw, 6e-4, 0.1, (0.9, 0.95), device.type)
    amp = resolve_precision("auto", device)
    T = config.block_size
    x = torch.randint(0, config.vocab_size, (batch, T + 1), device=device)

    def step() -> None:
        with autocast(device, amp):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    compile_s = timed(step, device)
    for _ in range(3):
        step()
    seconds = timed(lambda: [step() for _ in range(steps)], device)
    tok_s = batch * T * steps / seconds
    return {
        "tokens_per_s": round(tok_s),
        "flops_per_s": raw.flops_per_token(T) * tok_s,
        "step_ms": round(1e3 * seconds / steps, 2),
        "first_step_s": round(compile_s, 1),
        "batch": batch,
        "precision": "bf16" if amp else "fp32",
        "fused_adamw": bool(opt.defaults.get("fused")),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
    }


def torch_decode(config: ModelConfig, device: torch.device, new_tokens: int) -> dict:
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    prompt = [list(range(1, 33))]
    generate_batch(model, prompt, max_new_tokens=8)  # warm-up; no stop ids: every row runs to the end
    seconds = timed(lambda: generate_batch(model, prompt, max_new_tokens=new_tokens), device)
    return {"tokens_per_s": round(new_tokens / seconds, 1), "dtype": "fp32"}


def ort_decode(config: ModelConfig, provider: str, new_tokens: int) -> dict:
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return {"skipped": f"this onnxruntime ({ort.__version__}) has no {provider}; install onnxruntime-gpu"}
    from decode_latency import make_bundle  # beside this script: a bundle without the parity run

    from deploy import runtime
    from gpt.tokenizer import Tokenizer, TokenizerConfig

    with tempfile.TemporaryDirectory() as tmp:
        text = "The quick brown fox jumps over the lazy dog. Markets rose as investors cheered.\n" * 50
        tok = Tokenizer.train([text], Path(tmp) / "tok", TokenizerConfig(vocab_size=300))
        torch.manual_seed(0)
        bundle, _ = make_bundle(GPT(config).eval(), tok.path, Path(tmp) / "bundle", int8=False)
        lm = runtime.load_bundle(bundle, providers=list(dict.fromkeys([provider, "CPUExecutionProvider"])))
        cfg = runtime.GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
        prompt = [list(range(1, 33))]
        lm.generate_ids(prompt, runtime.GenerationConfig(max_new_tokens=8, ignore_eos=True))
        t0 = time.perf_counter()
        lm.generate_ids(prompt, cfg)
        seconds = time.perf_counter() - t0
        return {"tokens_per_s": round(new_tokens / seconds, 1), "io_binding": lm.use_io_binding}


def test_outcomes(junit: Path | None) -> dict:
    """{test name: "passed" | "failed" | "skipped: reason"} from pytest's JUnit XML."""
    if junit is None or not junit.is_file():
        return {}
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        # An Element without children is falsy: test each with "is not None", never with "or".
        failed = case.find("failure") is not None or case.find("error") is not None
        skip = case.find("skipped")
        if failed:
            out[case.get("name")] = "failed"
        elif skip is not None:
            out[case.get("name")] = f"skipped: {skip.get('message', '')}"
        else:
            out[case.get("name")] = "passed"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--junit", type=Path, help="pytest --junitxml output of the CUDA tests")
    p.add_argument("--shape", default="gpt2-124m", help="model preset to time (tiny: a CPU dry run)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    device = resolve_device(os.environ.get("GPTFLOW_CHECK_DEVICE", "cuda"))
    config = ModelConfig.preset(args.shape, dropout=0.0)
    checks = test_outcomes(args.junit)
    result: dict = {"benchmark": "gpu_check", "device": str(device), "shape": args.shape}
    result["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    result["torch"] = torch.__version__
    for name, fn in (
        ("bf16_matmul_peak_flops", lambda: matmul_peak(device, 8192 if device.type == "cuda" else 1024)),
        ("train", lambda: train_speed(config, device, args.batch, args.steps)),
        ("decode_torch_b1", lambda: torch_decode(config, device, args.new_tokens)),
        (
            "decode_ort_b1",
            lambda: ort_decode(
                config,
                "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider",
                args.new_tokens,
            ),
        ),
    ):
        try:
            result[name] = fn()
        except Exception as e:  # one broken measurement must not hide the others
            result[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            checks[f"bench:{name}"] = "failed"
    train = result.get("train", {})
    if "flops_per_s" in train and isinstance(result["bf16_matmul_peak_flops"], float):
        train["mfu"] = round(train["flops_per_s"] / result["bf16_matmul_peak_flops"], 3)
    result["checks"] = checks
    result["all_passed"] = bool(checks) and not any(v == "failed" for v in checks.values())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
