"""Training checkpoints: safetensors optimizer state, atomic directories, integrity checks, RNG, pruning."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt.checkpoint import (
    OPTIMIZER,
    WEIGHTS,
    atomic_dir,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    load_training_checkpoint,
    prune_checkpoints,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
    step_dir,
    write_latest,
)
from gpt.config import ModelConfig
from gpt.model import GPT
from gpt.optim import build_optimizer, flatten_optimizer_state, unflatten_optimizer_state


def _trained(seed: int = 0, steps: int = 3) -> tuple[GPT, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    for _ in range(steps):
        x = torch.randint(0, 64, (2, 16))
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _write(run, step: int, model, opt) -> None:
    path = save_training_checkpoint(step_dir(run, step), model, opt, {"step": step}, step=step)
    write_latest(run, path)


def test_optimizer_state_round_trips_through_safetensors_bitwise(tmp_path):
    model, opt = _trained()
    tensors, meta = flatten_optimizer_state(opt)
    save_file(tensors, str(tmp_path / OPTIMIZER))
    restored = unflatten_optimizer_state(load_file(str(tmp_path / OPTIMIZER)), meta)

    clone = GPT(model.config)
    clone.load_state_dict(model.state_dict())
    opt2 = build_optimizer(clone, lr=1.0, weight_decay=0.0, betas=(0.5, 0.5), device_type="cpu")
    opt2.load_state_dict(restored)
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95) and opt2.param_groups[0]["weight_decay"] == 0.1
    # The next update is the same bit for bit.
    x = torch.randint(0, 64, (2, 16))
    for m, o in ((model, opt), (clone, opt2)):
        m(x, x)[1].backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_training_checkpoint_loads_as_a_model_and_restores_state(tmp_path):
    model, opt = _trained()
    _write(tmp_path, 3, model, opt)
    ckpt = load_training_checkpoint(latest_checkpoint(tmp_path))
    assert ckpt.step == 3 and ckpt.trainer_state["step"] == 3
    loaded, meta = load_model(ckpt.path)
    assert meta["step"] == 3
    for name, t in model.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name]), name


def test_truncated_checkpoint_is_refused_and_the_previous_one_suggested(tmp_path):
    model, opt = _trained()
    _write(tmp_path, 2, model, opt)
    _write(tmp_path, 4, model, opt)
    weights = step_dir(tmp_path, 4) / OPTIMIZER
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt.*step-000002"):
        load_training_checkpoint(step_dir(tmp_path, 4))


def test_bit_flip_in_weights_is_caught_by_the_checksum(tmp_path):
    model, opt = _trained()
    _write(tmp_path, 2, model, opt)
    path = step_dir(tmp_path, 2) / WEIGHTS
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # still a valid safetensors file, one weight changed
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_training_checkpoint(step_dir(tmp_path, 2))


def test_failed_checkpoint_write_leaves_nothing_that_looks_complete(tmp_path):
    model, opt = _trained()
    _write(tmp_path, 2, model, opt)
    target = step_dir(tmp_path, 4)
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed mid-write")
    assert not target.exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000002"]
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 2)


def test_prune_keeps_the_newest_k_checkpoints(tmp_path):
    model, opt = _trained(steps=1)
    for step in (1, 2, 3, 4):
        _write(tmp_path, step, model, opt)
    prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]


def test_prune_never_deletes_the_checkpoint_latest_points_to(tmp_path):
    model, opt = _trained(steps=1)
    for step in (1, 2, 3, 4):
        _write(tmp_path, step, model, opt)
    write_latest(tmp_path, step_dir(tmp_path, 1))  # e.g. pointed back by hand after a bad step
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert step_dir(tmp_path, 1) not in removed and latest_checkpoint(tmp_path) == step_dir(tmp_path, 1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000003", "step-000004"]


def test_rng_states_restore_every_generator():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
