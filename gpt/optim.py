"""AdamW with decay / no-decay groups (or Muon + AdamW), the warmup + cosine schedule, and optimizer
state as flat tensors.

The flat form (``{"state.3.exp_avg": tensor, ...}`` + a JSON-able dict of the rest) lets a training
checkpoint store the optimizer in safetensors, so loading one never unpickles anything.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from gpt.train_config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (Linear weights, embeddings); never decay biases or LayerNorm gains (dim < 2)."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    return _decay_groups(params, weight_decay)


def _decay_groups(params: list[torch.Tensor], weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device_type: str,
) -> torch.optim.AdamW:
    """AdamW, fused on CUDA and CPU when this torch has the fused kernel (one kernel per step, not per tensor)."""
    return _adamw(param_groups(model, weight_decay), lr, betas, device_type)


def _adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], device_type: str):
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))


# --------------------------------------------------------------------------------------------
# Muon for the matrices inside the blocks, AdamW for the rest


def muon_adamw_split(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Parameter names for (Muon, AdamW): Muon takes the 2-D weights inside the transformer blocks
    (``c_attn``, ``c_proj``, ``c_fc``); AdamW the embeddings, the LM head (tied or not), any
    classification head, biases and norm gains. Muon orthogonalises a matrix's update, which suits
    hidden linear maps but not lookup tables, output heads or vectors."""
    muon, adamw = [], []
    for name, p in model.named_parameters():  # a tied head appears once, as transformer.wte.weight
        if p.requires_grad:
            (muon if name.startswith("transformer.h.") and p.dim() == 2 else adamw).append(name)
    return muon, adamw


class MuonWithAdamW:
    """Muon + AdamW that the training engine and checkpoints see as ONE optimizer.

    ``param_groups`` are AdamW's groups then Muon's (the same dicts, so ``set_lr`` reaches both);
    a Muon group's ``lr_scale`` (muon_lr / lr) turns the schedule's lr into Muon's. ``state_dict``
    has a single optimizer's layout, parameters numbered AdamW's first, then Muon's, so
    :func:`flatten_optimizer_state` and the safetensors checkpoints need nothing new.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Muon):
        self.adamw, self.muon = adamw, muon

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [*self.adamw.param_groups, *self.muon.param_groups]

    def step(self) -> None:
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none)
        self.muon.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        a, m = self.adamw.state_dict(), self.muon.state_dict()
        n = sum(len(g["params"]) for g in a["param_groups"])
        state = {**a["state"], **{i + n: s for i, s in m["state"].items()}}
        groups = [
            *a["param_groups"],
            *({**g, "params": [i + n for i in g["params"]]} for g in m["param_groups"]),
        ]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups, k = state_dict["param_groups"], len(self.adamw.param_groups)
        kinds = ["muon" if "ns_steps" in g else "adamw" for g in groups]
        if kinds != ["adamw"] * k + ["muon"] * len(self.muon.param_groups):
            raise ValueError(
                f"optimizer state has groups {kinds}, but Muon + AdamW here has {k} AdamW and "
                f"{len(self.muon.param_groups)} Muon group(s); resume with the optimizer the run started with"
            )
        ids = {i for g in groups[:k] for i in g["params"]}
        n = len(ids)
        state = state_dict["state"]
        self.adamw.load_state_dict(
            {"state": {i: s for i, s in state.items() if i in ids}, "param_groups": groups[:k]}
        )
        self.muon.load_state_dict(
            {
                "state": {i - n: s for i, s in state.items() if i not in ids},
                "param_groups": [{**g, "params": [i - n for i in g["params"]]} for g in groups[k:]],
            }
        )


def build_muon_adamw(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device_type: str,
    muon_lr: float,
    muon_momentum: float = 0.95,
    muon_nesterov: bool = True,
    muon_weight_decay: float = 0.0,
    muon_ns_steps: int = 5,
    muon_adjust_lr: str = "original",
) -> MuonWithAdamW:
    """Muon (torch.optim.Muon) for :func:`muon_adamw_split`'s matrices, AdamW for the rest with
    :func:`build_optimizer`'s decay groups. Muon's lr follows the schedule: ``lr_scale = muon_lr / lr``."""
    muon_names, adamw_names = muon_adamw_split(model)
    params = dict(model.named_parameters())
    adamw = _adamw(_decay_groups([params[n] for n in adamw_names], weight_decay), lr, betas, device_type)
    muon = torch.optim.Muon(
        [{"params": [params[n] for n in muon_names], "lr_scale": muon_lr / lr}],
        lr=muon_lr,
        weight_decay=muon_weight_decay,
        momentum=muon_momentum,
        nesterov=muon_nesterov,
        ns_steps=muon_ns_steps,
        adjust_lr_fn=muon_adjust_lr,
    )
    return MuonWithAdamW(adamw, muon)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup from lr/warmup to lr, then cosine decay to ``min_lr`` at ``max_steps`` (0-based step)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer | MuonWithAdamW, lr: float) -> None:
    """The schedule's ``lr`` into every group; a group with an ``lr_scale`` (Muon's) gets lr x lr_scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


def flatten_optimizer_state(
    optimizer: torch.optim.Optimizer | MuonWithAdamW | dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` (or that dict itself) as (flat CPU tensors for safetensors, JSON-able rest)."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        prefix, idx, key = name.split(".", 2)
        if prefix != "state":
            raise ValueError(f"unexpected optimizer tensor {name!r}; expected 'state.<param>.<key>'")
        state.setdefault(int(idx), {})[key] = value
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    groups = []
    for g in meta["param_groups"]:
        groups.append({k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()})
    return {"state": state, "param_groups": groups}


def build_train_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, device_type: str
) -> torch.optim.AdamW | MuonWithAdamW:
    """``cfg.optimizer``: AdamW for everything, or Muon for the matrices in the blocks + AdamW."""
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return build_optimizer(model, cfg.lr, cfg.weight_decay, betas, device_type)
    return build_muon_adamw(
        model,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=betas,
        device_type=device_type,
        muon_lr=cfg.muon_lr,
        muon_momentum=cfg.muon_momentum,
        muon_nesterov=cfg.muon_nesterov,
        muon_weight_decay=cfg.muon_weight_decay,
        muon_ns_steps=cfg.muon_ns_steps,
        muon_adjust_lr=cfg.muon_adjust_lr,
    )
