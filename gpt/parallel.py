"""How the model is spread over torchrun's ranks: replicated (DDP) or sharded (FSDP2), and the full,
unsharded state that checkpoints store either way.

DDP keeps a whole copy of the weights and optimizer state on every rank and all-reduces gradients.
FSDP2 (``torch.distributed.fsdp.fully_shard`` on each transformer block, then on the whole model)
keeps 1/N of every weight, gradient and optimizer moment per rank, and gathers a block's weights
just for its forward and backward. Checkpoints are the same safetensors files for both: the
sharded state is gathered to rank 0 first, so a checkpoint loads at any world size, under DDP or
FSDP, and in the single-process tools (evaluate, export).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from gpt.checkpoint import model_state_dict, unwrap
from gpt.device import Dist

__all__ = ["can_compile", "full_state", "is_sharded", "load_full_state", "no_sync", "rank_checksums", "wrap"]

log = logging.getLogger(__name__)


def wrap(
    module: torch.nn.Module, device: torch.device, dd: Dist, compile: bool, parallel: str = "ddp"
) -> torch.nn.Module:
    """``module`` compiled and/or spread over the ranks; the engine calls the loss through the result.

    ``ddp`` wraps it in DistributedDataParallel. ``fsdp`` shards it in place (``module`` itself
    becomes the sharded model: build the optimizer after this call). A single process is neither."""
    compile = compile and can_compile(device)
    if dd.enabled and parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Each block returns its KV tensors (views) beside the hidden state; nothing writes to them.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for block in unwrap(module).transformer.h:
            fully_shard(block)
        fully_shard(module)
        return torch.compile(module) if compile else module
    model = torch.compile(module) if compile else module
    if dd.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def can_compile(device: torch.device) -> bool:
    """Whether torch.compile can run here. On CPU inductor builds its kernels with a C++ compiler (on
    Linux g++ or $CXX, whatever else is installed); without one the first step would fail, so the run
    trains eagerly (same results, slower) and says why. Asks inductor's own compiler lookup."""
    if device.type != "cpu":
        return True
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch that moved it: let torch.compile decide
        return True
    try:
        get_cpp_compiler()
    except RuntimeError as e:  # torch._inductor.exc.InvalidCxxCompiler
        log.warning(
            "compile is on, but torch.compile on CPU needs a C++ compiler and found none (%s): training "
            "without it. Install g++ (e.g. apt-get install g++) or set CXX for the compiled step",
            e,
        )
        return False
    return True


def is_sharded(module: torch.nn.Module) -> bool:
    """True when ``module``'s weights are FSDP2 shards (DTensors), so reading them is collective."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


@contextlib.contextmanager
def no_sync(model: torch.nn.Module) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) of the micro-batches inside."""
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
        return
    sharded = getattr(model, "_orig_mod", model)  # torch.compile keeps the FSDP module inside
    sharded.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        sharded.set_requires_gradient_sync(True)


def full_state(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(weights, optimizer state) as a plain model and optimizer would give them: CPU tensors keyed as
    in ``model_state_dict`` (tied head dropped), optimizer state keyed by parameter index.

    Collective for a sharded module (every rank must call it); only rank 0 gets the tensors then,
    the other ranks get empty dicts."""
    if not is_sharded(module):
        return model_state_dict(module), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    model = unwrap(module)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if model.config.tie_weights:
        weights.pop("lm_head.weight", None)
    weights = {k: v.contiguous() for k, v in weights.items()}
    if optimizer is None:
        return weights, None
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not by_name:
        return weights, {}
    return weights, _by_index(by_name)


def load_full_state(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Load a full (unsharded) checkpoint into ``module`` and ``optimizer``, sharding it when they are.
    Raises ValueError naming the keys when the weights do not fit the model."""
    if not is_sharded(module):
        missing, unexpected = module.load_state_dict(weights, strict=False)
        _check_keys(missing, unexpected)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = unwrap(module)
    if model.config.tie_weights:
        weights = {**weights, "lm_head.weight": weights["transformer.wte.weight"]}
    options = StateDictOptions(full_state_dict=True, strict=False)
    missing, unexpected = set_model_state_dict(model, weights, options=options)
    _check_keys(missing, unexpected)
    by_name = _by_name(optimizer_state, model, optimizer)
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def rank_checksums(module: torch.nn.Module, dd: Dist) -> list[str]:
    """sha256 of the full weights as every rank sees them (DDP ranks must end identical; FSDP ranks
    all-gather the same shards). Collective under torchrun."""
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(unwrap(module), options=StateDictOptions(full_state_dict=True))
        if unwrap(module).config.tie_weights:
            weights.pop("lm_head.weight", None)
    else:
        weights = model_state_dict(module)
    h = hashlib.sha256()
    for name, t in sorted(weights.items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return gather_object(h.hexdigest(), dd)


def gather_object(obj: Any, dd: Dist) -> list[Any]:
    """``obj`` of every rank, in rank order (a one-item list in a single process)."""
    if not dd.enabled:
        return [obj]
    out: list[Any] = [None] * dd.world_size
    dist.all_gather_object(out, obj)
    return out


def _check_keys(missing: list[str], unexpected: list[str]) -> None:
    missing = [k for k in missing if k != "lm_head.weight"]  # tied (stored once) or rebuilt by the stage
    if missing or unexpected:
        raise ValueError(f"does not match its model config: missing {missing}, unexpected {unexpected}")


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Parameter names of each optimizer group, in the group's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def _by_index(by_name: dict[str, Any]) -> dict[str, Any]:
    """torch.distributed.checkpoint's optimizer state (keyed by parameter name) keyed by index, as
    ``Optimizer.state_dict()`` numbers parameters: in order, group after group."""
    index, groups = {}, []
    for group in by_name["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    state = {index[name]: dict(s) for name, s in by_name["state"].items()}
    return {"state": state, "param_groups": groups}


def _by_name(by_index: dict[str, Any], model: torch.nn.Module, optimizer) -> dict[str, Any]:
    """The inverse of :func:`_by_index`, with the names of this optimizer's parameters."""
    flat = [name for group in _param_names(model, optimizer) for name in group]
    groups = by_index["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError("checkpoint's optimizer groups do not match this optimizer's parameters")
    state = {flat[int(i)]: s for i, s in by_index["state"].items()}
    named = [{**g, "params": [flat[int(i)] for i in g["params"]]} for g in groups]
    return {"state": state, "param_groups": named}
