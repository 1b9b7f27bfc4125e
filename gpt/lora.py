"""LoRA (Hu et al., 2021): low-rank updates W + (alpha/r) B A on chosen Linear layers, merged back
into plain ``nn.Linear`` weights afterwards so that export and inference never see LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

# Projections inside each block, named by their suffix in GPT-2 parameter names.
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoRALinear(nn.Module):
    """``base(x) + scaling * x A^T B^T``; ``base`` is frozen, B starts at zero so training starts at W."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank={rank} must be a positive integer")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's default init
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.dropout(x) @ self.lora_A.t()) @ self.lora_B.t()  # (..., out)
        return self.base(x) + self.scaling * update

    def merged(self) -> nn.Linear:
        """A plain Linear with ``W + scaling * B A`` (computed in float64 to keep the merge exact)."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        out = out.to(device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.double() @ self.lora_A.double()) * self.scaling
            out.weight.copy_((base.weight.double() + delta).to(base.weight.dtype))
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: Sequence[str] = LORA_TARGETS,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap every Linear whose name ends with one of ``targets``; returns the wrapped module names.

    Only the wrapping changes trainability of the wrapped weights (frozen); the caller decides
    what else stays trainable (e.g. a classification head).
    """
    names = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    ]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise ValueError(
                f"LoRA target {t!r} matches no Linear layer in the model; choose from {', '.join(LORA_TARGETS)}"
            )
    for name in names:
        _set_submodule(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged plain Linear (in place); parameter names become GPT-2's again."""
    names = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).merged())
    return model
