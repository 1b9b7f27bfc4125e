"""Model checkpoints on disk: safetensors weights + a JSON sidecar; never pickle.

A model directory holds:
    model.safetensors   weights (a tied LM head is stored once, as transformer.wte.weight)
    model.json          {"model": ModelConfig dict, "tokenizer_hash": str | None, "labels": [...], ...}
    tokenizer.model     (optional) the sentencepiece model the weights were trained with

Training checkpoints (gpt/train.py) add optimizer/scheduler/RNG/loader state beside these files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt.config import ModelConfig
from gpt.io import atomic_path, atomic_write_json, read_json
from gpt.model import GPT

WEIGHTS = "model.safetensors"
META = "model.json"


def unwrap(model: torch.nn.Module) -> GPT:
    """The plain GPT inside a DDP and/or torch.compile wrapper."""
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, the tied head dropped (safetensors refuses shared storage)."""
    model = unwrap(model)
    sd = model.state_dict()
    if model.config.tie_weights:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_model(out_dir: str | Path, model: torch.nn.Module, **meta: Any) -> Path:
    """Write weights then the sidecar, each atomically; the sidecar last marks the directory complete."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file(model_state_dict(model), str(tmp), metadata={"format": "pt"})
    atomic_write_json(out_dir / META, {"model": unwrap(model).config.to_dict(), **meta})
    return out_dir


def read_model_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    ckpt_dir = Path(ckpt_dir)
    meta = read_json(ckpt_dir / META, what="checkpoint metadata")
    if "model" not in meta:
        raise ValueError(f"{ckpt_dir / META} has no 'model' config; is this a gptflow checkpoint?")
    return meta


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors load with a clear error on truncation or corruption."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"checkpoint weights {path} are corrupt or truncated ({e}); use an earlier checkpoint"
        ) from e


def load_model(
    ckpt_dir: str | Path, device: str | torch.device = "cpu", **config_overrides: Any
) -> tuple[GPT, dict[str, Any]]:
    """Rebuild the model from ``ckpt_dir``; returns (model in eval mode, metadata)."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_model_meta(ckpt_dir)
    config = ModelConfig.from_dict({**meta["model"], **config_overrides})
    model = GPT(config)
    sd = load_state_dict(ckpt_dir / WEIGHTS)
    if "score.weight" in sd and model.score is None:
        sd.pop("score.weight")  # a classifier's head is ignored when loading it as a plain LM
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_weights)]
    if config_overrides.get("n_classes"):
        missing = [k for k in missing if not k.startswith("score.")]  # a fresh head for finetuning
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt_dir} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.to(device).eval(), meta
