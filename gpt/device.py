"""Where and in what precision a model runs: the device, the process's rank under torchrun, and the
autocast dtype. Training, finetuning, evaluation and the benchmarks all decide these the same way.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Dist", "autocast", "cpu_has_bf16", "dist_from_env", "resolve_device", "resolve_precision"]


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (a single process without one)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """Rank info from torchrun's environment; a single process without it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    return Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use --device cpu or auto")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (training is bf16 anyway)
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX); otherwise bf16 is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return True
    mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(mkldnn_bf16 and sys.platform == "linux" and mkldnn_bf16())


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``auto | fp32 | bf16`` (None = plain fp32). Master weights stay fp32."""
    if name == "fp32":
        return None
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    if name == "bf16" and not supported and device.type == "cuda":
        raise ValueError("precision='bf16' but this GPU has no bf16; use --precision fp32")
    if name == "bf16" or supported:
        return torch.bfloat16
    return None


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``dtype`` is set, else nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
