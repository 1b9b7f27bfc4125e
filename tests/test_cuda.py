"""CUDA checks: bf16 autocast, torch.compile, fused AdamW, torchrun over nccl, ORT's CUDA provider.

They need a GPU, so CI (CPU only) skips them with that reason; ``benchmarks/gpu_check.sh`` runs them
on a lent GPU. ``GPTFLOW_CHECK_DEVICE=cpu`` runs the same checks on the CPU (gloo for nccl, the CPU
provider for CUDA's) so that the script and these tests are exercised where no GPU is lent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.config import ModelConfig
from gpt.device import autocast, resolve_device, resolve_precision
from gpt.model import GPT
from gpt.optim import build_optimizer

DEVICE = os.environ.get("GPTFLOW_CHECK_DEVICE", "cuda")
REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(),
        reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these where one is lent)",
    ),
]


@pytest.fixture(scope="module")
def device() -> torch.device:
    return resolve_device(DEVICE)


def tiny_model(device: torch.device, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny", vocab_size=512, block_size=64, **overrides)
    return GPT(cfg).to(device).train()


def batch(device: torch.device, B: int = 4, T: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 512, (B, T + 1), generator=g)
    return data[:, :-1].to(device), data[:, 1:].to(device)


@pytest.fixture
def exact_fp32():
    """TF32 off while comparing fp32 results (resolve_device turns it on for training)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_bf16_autocast_loss_and_grads_track_fp32(device, exact_fp32):
    amp = resolve_precision("auto", device)
    assert amp == torch.bfloat16, "auto precision should pick bf16 on a GPU with bf16"
    model, (x, y) = tiny_model(device, dropout=0.0), batch(device)
    _, loss32 = model(x, y)
    loss32.backward()
    grads32 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with autocast(device, amp):
        logits, loss16 = model(x, y)
    loss16.backward()
    assert logits.dtype == torch.bfloat16  # the matmuls really ran in bf16
    assert abs(loss16.item() - loss32.item()) < 0.02 * loss32.item()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p.grad).all(), name  # fp32 master weights
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), grads32[name].flatten(), dim=0)
        assert cos > 0.99, f"{name}: bf16 gradient far from fp32 (cosine {cos:.4f})"


def test_compiled_model_matches_eager(device, exact_fp32):
    model, (x, y) = tiny_model(device, dropout=0.0), batch(device)
    _, eager = model(x, y)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _, compiled = torch.compile(model)(x, y)
    compiled.backward()
    assert abs(compiled.item() - eager.item()) < 1e-4
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_fused_adamw_is_chosen_and_matches_the_foreach_kernel(device):
    fused = tiny_model(device, dropout=0.0)
    reference = tiny_model(device, dropout=0.0)
    opt = build_optimizer(fused, 1e-3, 0.1, (0.9, 0.95), device.type)
    assert opt.defaults.get("fused") is True
    ref_opt = torch.optim.AdamW(
        _mirror_groups(opt, fused, reference), lr=1e-3, betas=(0.9, 0.95), foreach=True
    )
    x, y = batch(device)
    for _ in range(5):
        for m, o in ((fused, opt), (reference, ref_opt)):
            o.zero_grad(set_to_none=True)
            m(x, y)[1].backward()
            o.step()
    for (name, a), b in zip(fused.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def _mirror_groups(opt: torch.optim.Optimizer, src: torch.nn.Module, dst: torch.nn.Module) -> list[dict]:
    """``opt``'s parameter groups with ``src``'s tensors replaced by ``dst``'s (same names)."""
    names = {id(p): n for n, p in src.named_parameters()}
    params = dict(dst.named_parameters())
    return [
        {"params": [params[names[id(p)]] for p in g["params"]], "weight_decay": g["weight_decay"]}
        for g in opt.param_groups
    ]


# ---------------------------------------------------------------------------------------------
# The pretraining CLI: bf16 + compile on one GPU, then torchrun over every GPU present (nccl)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from test_train import make_shards

    return make_shards(tmp_path_factory.mktemp("data"))


def pretrain(out: Path, shards: Path, *extra: str, launcher: list[str] | None = None) -> dict:
    from gpt.io import read_manifest

    cmd = [*(launcher or [sys.executable]), "-m", "gptflow.cli", "pretrain", "--preset", "tiny"]
    cmd += ["--data", str(shards), "--out", str(out), "--device", DEVICE, "--max-steps", "30"]
    cmd += ["--eval-interval", "30", "--checkpoint-interval", "30", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_manifest(out)["metrics"]


def test_pretrain_bf16_compiled_learns_and_checkpoints_load(shards, tmp_path):
    from gpt.checkpoint import latest_checkpoint, load_model

    metrics = pretrain(tmp_path, shards, "--precision", "bf16", "--compile")
    losses = [r["loss"] for r in _metrics_lines(tmp_path) if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses
    assert np.isfinite(metrics["final_val_bpb"])
    assert metrics["precision"] == "bf16" and metrics["device"].startswith(DEVICE), metrics
    model, _ = load_model(latest_checkpoint(tmp_path))
    assert next(model.parameters()).dtype == torch.float32


def test_torchrun_over_every_gpu_keeps_the_ranks_identical(shards, tmp_path):
    n = torch.cuda.device_count() if DEVICE == "cuda" else 2
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    metrics = pretrain(tmp_path, shards, "--precision", "bf16", launcher=launcher)
    assert metrics["world_size"] == n
    sums = metrics["rank_weight_checksums"]
    assert len(sums) == n and len(set(sums)) == 1


def _metrics_lines(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# ONNX Runtime's CUDA provider: parity with torch and the IOBinding decode loop


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from lm_fixtures import random_lm_checkpoint

    from gpt.export import ExportConfig, export_bundle

    root = tmp_path_factory.mktemp("lm")
    ckpt = random_lm_checkpoint(root, seed=0)
    return Path(export_bundle(ckpt, root / "bundle", ExportConfig(quantize="none"))["bundle"])


def provider() -> str:
    return "CUDAExecutionProvider" if DEVICE == "cuda" else "CPUExecutionProvider"


def test_ort_cuda_provider_matches_torch_and_decodes_with_io_binding(bundle):
    import onnxruntime as ort

    sys.path.insert(0, str(REPO / "deploy"))
    import runtime

    if provider() not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime build has no {provider()} (install onnxruntime-gpu)")
    gpu = runtime.load_bundle(bundle, providers=list(dict.fromkeys([provider(), "CPUExecutionProvider"])))
    assert gpu.session.get_providers()[0] == provider()
    if DEVICE == "cuda":
        assert gpu.use_io_binding, "the CUDA provider should decode with IOBinding"
    gpu.use_io_binding = True
    cpu = runtime.load_bundle(bundle, providers=["CPUExecutionProvider"])
    cfg = runtime.GenerationConfig(max_new_tokens=24, ignore_eos=True)
    prompts = ["The quick brown fox", "Markets rose"]
    assert [g.token_ids for g in gpu.generate(prompts, cfg)] == [
        g.token_ids for g in cpu.generate(prompts, cfg)
    ]
    ids = [[cpu.start_id, *cpu.encode("The quick brown fox jumps")]]
    np.testing.assert_allclose(gpu.logits(ids), cpu.logits(ids), atol=2e-3, rtol=1e-3)
