"""Model checkpoints on disk: safetensors weights + a JSON sidecar; never pickle.

A model directory holds:
    model.safetensors   weights (a tied LM head is stored once, as transformer.wte.weight)
    model.json          {"model": ModelConfig dict, "tokenizer_hash": str | None, "labels": [...], ...}
    tokenizer.model     (optional) the sentencepiece model the weights were trained with

A training checkpoint (``run/checkpoints/step-000060/``) is a model directory plus
    optimizer.safetensors   AdamW (or Muon + AdamW) state, flattened (gpt.optim.flatten_optimizer_state)
    trainer_state.json      step, schedule, RNG states, loader cursors, loss history, configs,
                            optimizer param groups and the sha256 of every file above (written last)
It is built in a hidden temp directory and renamed into place, so it is either complete or absent.
``run/latest`` names the newest complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt.bundle import TOKENIZER_FILE as TOKENIZER
from gpt.config import ModelConfig
from gpt.io import atomic_dir, atomic_path, atomic_write_json, atomic_write_text, read_json, sha256_file
from gpt.model import GPT
from gpt.optim import flatten_optimizer_state, unflatten_optimizer_state

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
META = "model.json"
OPTIMIZER = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"


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


def save_model(
    out_dir: str | Path, model: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None, **meta: Any
) -> Path:
    """Write weights then the sidecar, each atomically; the sidecar last marks the directory complete.
    ``weights`` (as :func:`model_state_dict` gives them, e.g. gathered from a sharded model) replace
    the model's own."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file(
            model_state_dict(model) if weights is None else weights, str(tmp), metadata={"format": "pt"}
        )
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


# --------------------------------------------------------------------------------------------
# Training checkpoints


def save_model_dir(
    out_dir: str | Path,
    model: torch.nn.Module,
    tokenizer_path: str | Path | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    **meta: Any,
) -> Path:
    """A self-contained model directory (weights, sidecar, tokenizer), replaced atomically as a whole."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_model(tmp, model, weights, **meta)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
    return out_dir


def resolve_model_dir(path: str | Path) -> Path:
    """A model dir as given, or the ``best/`` inside a pretraining or finetuning run dir."""
    path = Path(path)
    if (path / META).is_file():
        return path
    if (path / "best" / META).is_file():
        return path / "best"
    raise FileNotFoundError(
        f"{path} holds no model.json (nor best/model.json); pass a model or run directory"
    )


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as JSON-able values."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_training_checkpoint(
    ckpt_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    tokenizer_path: str | Path | None = None,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    **meta: Any,
) -> Path:
    """Write model + optimizer + ``trainer_state`` (JSON-able) as one atomic checkpoint directory.

    ``meta`` goes into model.json (tokenizer_hash, step, val metrics) so the directory also loads
    with :func:`load_model`. ``extra_tensors`` (name -> state dict) land beside as ``name.safetensors``
    (finetuning keeps its best weights there). ``weights`` and ``optimizer_state`` (gathered from a
    sharded model: ``gpt.parallel.full_state``) replace those of ``model`` and ``optimizer``.
    Checksums of the files land in trainer_state.json, written last.
    """
    ckpt_dir = Path(ckpt_dir)
    with atomic_dir(ckpt_dir) as tmp:
        save_model(tmp, model, weights, **meta)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        tensors, opt_meta = flatten_optimizer_state(optimizer if optimizer_state is None else optimizer_state)
        with atomic_path(tmp / OPTIMIZER) as t:
            save_file(tensors, str(t), metadata={"format": "pt"})
        extra = sorted(extra_tensors or {})
        for name in extra:
            save_file(extra_tensors[name], str(tmp / f"{name}.safetensors"))
        names = (WEIGHTS, META, OPTIMIZER, *(f"{name}.safetensors" for name in extra))
        files = {name: sha256_file(tmp / name) for name in names}
        state = {**trainer_state, "optimizer": opt_meta, "extra": extra, "files": files}
        atomic_write_json(tmp / TRAINER_STATE, state)
    return ckpt_dir


@dataclass
class TrainingCheckpoint:
    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]  # ready for optimizer.load_state_dict
    trainer_state: dict[str, Any]
    meta: dict[str, Any]  # model.json
    extra: dict[str, dict[str, torch.Tensor]]  # the extra_tensors it was saved with


def load_training_checkpoint(ckpt_dir: str | Path) -> TrainingCheckpoint:
    """Read and verify a checkpoint written by :func:`save_training_checkpoint` (no pickle)."""
    ckpt_dir = Path(ckpt_dir)
    previous = _previous_hint(ckpt_dir)
    try:
        state = read_json(ckpt_dir / TRAINER_STATE, what="trainer state")
        for name, digest in state.get("files", {}).items():
            if not (ckpt_dir / name).is_file():
                raise FileNotFoundError(f"{ckpt_dir / name} is missing")
            if sha256_file(ckpt_dir / name) != digest:
                raise ValueError(f"{ckpt_dir / name} does not match its recorded sha256")
        meta = read_model_meta(ckpt_dir)
        model_state = load_state_dict(ckpt_dir / WEIGHTS)
        opt_tensors = load_state_dict(ckpt_dir / OPTIMIZER)
        optimizer_state = unflatten_optimizer_state(opt_tensors, state["optimizer"])
        extra = {name: load_state_dict(ckpt_dir / f"{name}.safetensors") for name in state.get("extra", [])}
        step = int(state["step"])
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise ValueError(f"training checkpoint {ckpt_dir} is corrupt or incomplete: {e}. {previous}") from e
    return TrainingCheckpoint(ckpt_dir, step, model_state, optimizer_state, state, meta, extra)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories (those with a trainer_state.json), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    dirs = [d for d in root.glob("step-*") if d.is_dir() and (d / TRAINER_STATE).is_file()]
    return sorted(dirs, key=lambda d: d.name)


def _previous_hint(ckpt_dir: Path) -> str:
    run_dir = ckpt_dir.parent.parent
    older = [d for d in list_checkpoints(run_dir) if d.name < ckpt_dir.name]
    if older:
        return (
            f"Resume from the previous checkpoint {older[-1]} instead: delete {ckpt_dir} "
            f"(or write '{CHECKPOINTS}/{older[-1].name}' into {run_dir / LATEST}) and resume again"
        )
    return "There is no earlier checkpoint: start the run again without --resume in a new output directory"


def write_latest(run_dir: str | Path, ckpt_dir: str | Path) -> None:
    atomic_write_text(Path(run_dir) / LATEST, f"{Path(ckpt_dir).relative_to(run_dir).as_posix()}\n")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint named by ``run_dir/latest``, else the newest complete one, else None."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        target = run_dir / pointer.read_text(encoding="utf-8").strip()
        if target.is_dir():
            return target
        log.warning("%s points at %s, which does not exist; using the newest checkpoint", pointer, target)
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and stale temp dirs of killed runs."""
    root = Path(run_dir) / CHECKPOINTS
    latest = latest_checkpoint(run_dir)
    removed = list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []
    removed = [d for d in removed if latest is None or d.resolve() != latest.resolve()]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    if root.is_dir():
        for d in root.glob(".step-*"):
            if not d.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(d, ignore_errors=True)
    return removed


def check_same_model(saved: dict[str, Any], wanted: ModelConfig, where: Path) -> None:
    """Refuse to continue ``where`` (a checkpoint or init model) with another model config.

    A field missing from the saved config is newer than the checkpoint: its default is the behaviour
    the checkpoint was trained with."""
    saved = {**{f.name: f.default for f in fields(ModelConfig)}, **saved}
    diff = {k: (saved.get(k), v) for k, v in wanted.to_dict().items() if saved.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(
            f"model config differs from the checkpoint {where} ({shown}); resume with the same model "
            "settings (same preset and --model-* flags), or start a new run in another --out directory"
        )


def check_same_tokenizer(saved_hash: str | None, data_hash: str, where: Path, data_dir: Path) -> None:
    """Refuse shards made with another tokenizer than the one ``where`` was trained with."""
    if saved_hash is not None and saved_hash != data_hash:
        raise ValueError(
            f"{where} was trained with tokenizer {saved_hash[:12]}, but the shards in {data_dir} were made "
            f"with tokenizer {data_hash[:12]}; use shards made with the checkpoint's tokenizer.model "
            "(re-shard the corpus with it), or start a new run"
        )
