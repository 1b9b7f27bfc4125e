"""Pretraining: AdamW + warmup/cosine, gradient accumulation, bf16 autocast, DDP, periodic evaluation
(loss and bits per byte) and atomic checkpoints from which a run resumes bit for bit.

``train()`` is the stage function; the CLI, the Prefect flow and the tests all call it. Run it under
``torchrun --nproc_per_node=N`` for DDP (gloo on CPU, nccl on CUDA): only rank 0 logs and writes.

Output directory:
    checkpoints/step-000060/   model.safetensors, model.json, tokenizer.model, optimizer.safetensors,
                               trainer_state.json (see gpt.checkpoint); the last ``keep_last`` are kept
    best/                      best-by-val model directory (load with gpt.checkpoint.load_model)
    latest                     relative path of the newest complete checkpoint
    metrics.jsonl              one JSON record per logged step and per evaluation
    manifest.json              configs, inputs, outputs and summary metrics; written last
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from gpt.checkpoint import (
    TOKENIZER,
    WEIGHTS,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    load_training_checkpoint,
    prune_checkpoints,
    rng_state,
    save_model_dir,
    save_training_checkpoint,
    set_rng_state,
    step_dir,
    unwrap,
    write_latest,
)
from gpt.config import ModelConfig
from gpt.data import ShardDataset, TrainLoader
from gpt.device import Dist, autocast, dist_from_env, resolve_device, resolve_precision
from gpt.io import MANIFEST, sha256_file, write_manifest
from gpt.model import GPT
from gpt.optim import build_optimizer, lr_at, set_lr
from gpt.scoring import evaluate_lm
from gpt.tokenizer import Tokenizer
from gpt.train_config import TrainConfig

__all__ = ["Callbacks", "TrainConfig", "TrainingDiverged", "evaluate_lm", "train"]

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the update was not applied."""


class Callbacks:
    """No-op hooks called on rank 0; flows subclass this to log to MLflow."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """Every ``log_interval`` steps: loss, lr, grad_norm, tokens_per_s, flops_per_s, elapsed_s."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """After each evaluation: val_loss, val_bpb, val_ppl, val_tokens, val_bytes."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """After a training checkpoint directory is complete."""


# --------------------------------------------------------------------------------------------
# Small pieces of the run


def _check_same_model(saved: dict[str, Any], wanted: ModelConfig, where: Path) -> None:
    diff = {k: (saved.get(k), v) for k, v in wanted.to_dict().items() if saved.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(
            f"model config differs from the checkpoint {where} ({shown}); resume with the same model "
            "settings (same preset and --model-* flags), or start a new run in another --out directory"
        )


def _check_same_tokenizer(saved_hash: str | None, data_hash: str, where: Path, data_dir: Path) -> None:
    if saved_hash is not None and saved_hash != data_hash:
        raise ValueError(
            f"{where} was trained with tokenizer {saved_hash[:12]}, but the shards in {data_dir} were made "
            f"with tokenizer {data_hash[:12]}; use shards made with the checkpoint's tokenizer.model "
            "(re-shard the corpus with it), or start a new run"
        )


def _weights_checksum(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(unwrap(model).state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _MetricsLog:
    """Append-only metrics.jsonl; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        if keep_until_step is not None and path.is_file():
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and _record_step(line) <= keep_until_step
            ]
            path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        elif keep_until_step is None:
            path.write_text("", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return sys.maxsize  # a torn last line from a killed run is dropped


# --------------------------------------------------------------------------------------------
# The stage


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    callbacks: Callbacks | None = None,
    init_from: str | Path | None = None,
) -> dict[str, Any]:
    """Pretrain on the shards in ``data_dir``; write checkpoints, best/ and the manifest to ``out_dir``.

    ``model_config.vocab_size`` is replaced by the tokenizer's. With ``resume``, continue from the
    latest checkpoint in ``out_dir`` (a fresh start when there is none). ``init_from`` starts from the
    weights of a model directory instead of a random init. Returns the summary that also goes into
    manifest.json. Raises :class:`TrainingDiverged` on a NaN/inf loss, keeping the last good checkpoint.
    """
    cfg = train_config
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    callbacks = callbacks or Callbacks()
    dist_info = dist_from_env()
    device = resolve_device(cfg.device, dist_info.local_rank)
    own_process_group = False
    if dist_info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        own_process_group = True
    try:
        return _train(model_config, cfg, data_dir, out_dir, resume, callbacks, init_from, dist_info, device)
    finally:
        if own_process_group:
            dist.destroy_process_group()


def _train(
    model_config: ModelConfig,
    cfg: TrainConfig,
    data_dir: Path,
    out_dir: Path,
    resume: bool,
    callbacks: Callbacks,
    init_from: str | Path | None,
    dd: Dist,
    device: torch.device,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = resolve_precision(cfg.precision, device)

    # Data and tokenizer: the model's vocabulary is the tokenizer's.
    tokenizer = Tokenizer(data_dir / TOKENIZER)
    train_ds = ShardDataset(data_dir, "train", tokenizer_hash=tokenizer.hash)
    val_ds = ShardDataset(data_dir, "val", tokenizer_hash=tokenizer.hash, verify=False)
    if val_ds.num_tokens < 2:
        raise ValueError(f"the val split of {data_dir} is empty; re-shard with a val_fraction > 0")
    model_config = model_config.replace(vocab_size=tokenizer.vocab_size)
    token_bytes = tokenizer.token_byte_lengths()

    # Where to start: the latest checkpoint (resume), a model directory (init_from), or random weights.
    ckpt = None
    if resume:
        path = latest_checkpoint(out_dir)
        if path is None:
            log.info("no checkpoint in %s: starting a fresh run", out_dir)
        else:
            ckpt = load_training_checkpoint(path)
            _check_same_model(ckpt.meta["model"], model_config, path)
            _check_same_tokenizer(ckpt.meta.get("tokenizer_hash"), tokenizer.hash, path, data_dir)
    elif list_checkpoints(out_dir):
        raise FileExistsError(
            f"{out_dir} already holds checkpoints; pass --resume to continue that run, "
            "or choose another --out directory"
        )

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = GPT(model_config)
    if ckpt is not None:
        missing, unexpected = model.load_state_dict(ckpt.model_state, strict=False)
        if set(missing) - {"lm_head.weight"} or unexpected:
            raise ValueError(
                f"{ckpt.path} does not match its model config: missing {missing}, unexpected {unexpected}"
            )
    elif init_from is not None:
        init_model, init_meta = load_model(init_from)
        _check_same_model(init_meta["model"], model_config, Path(init_from))
        _check_same_tokenizer(init_meta.get("tokenizer_hash"), tokenizer.hash, Path(init_from), data_dir)
        model.load_state_dict(init_model.state_dict())
    model.to(device).train()
    raw_model = model
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device.type)
    loader = TrainLoader(
        train_ds, model_config.block_size, cfg.batch_size, cfg.seed, dd.rank, dd.world_size, device
    )

    start_step, losses, evals = 0, [], []
    best: dict[str, Any] = {"val_loss": math.inf}
    if ckpt is not None:
        st = ckpt.trainer_state
        optimizer.load_state_dict(ckpt.optimizer_state)
        loader.load_state_dict(st["loader"])
        start_step, losses, evals, best = st["step"], list(st["losses"]), list(st["evals"]), dict(st["best"])
        rngs = st["rng"]
        if len(rngs) != dd.world_size:
            raise ValueError(
                f"{ckpt.path} was written by {len(rngs)} rank(s), this run has {dd.world_size}; "
                "resume with the same --nproc_per_node"
            )
        set_rng_state(rngs[dd.rank])
        log.info("resumed from %s at step %d", ckpt.path, start_step)
    else:
        torch.manual_seed(cfg.seed + dd.rank)  # dropout differs across ranks, like their data

    if cfg.compile:
        model = torch.compile(model)
    if dd.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # Only rank 0 writes. A stale manifest would vouch for outputs this run is about to change.
    metrics_log = None
    if dd.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MANIFEST).unlink(missing_ok=True)
        prune_checkpoints(out_dir, keep_last=0)  # only clears temp dirs of killed runs
        metrics_log = _MetricsLog(out_dir / METRICS, keep_until_step=start_step if ckpt else None)

    tokens_per_step = cfg.batch_size * model_config.block_size * cfg.grad_accum * dd.world_size
    flops_per_token = raw_model.flops_per_token(model_config.block_size)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    n_params = raw_model.num_parameters()
    log.info(
        "training %.2fM parameters on %s (%s, %d rank(s)), %d tokens/step, steps %d..%d",
        n_params / 1e6,
        device,
        "bf16 autocast" if amp_dtype else "fp32",
        dd.world_size,
        tokens_per_step,
        start_step,
        cfg.max_steps,
    )

    def evaluate(step: int) -> dict[str, float]:
        metrics = evaluate_lm(
            raw_model,
            val_ds,
            model_config.block_size,
            cfg.batch_size,
            token_bytes,
            device,
            max_batches=cfg.eval_batches or None,
            autocast_dtype=amp_dtype,
        )
        evals.append({"step": step, **metrics})
        metrics_log.write({"step": step, **metrics})
        log.info("step %d: val loss %.4f, %.4f bits/byte", step, metrics["val_loss"], metrics["val_bpb"])
        if metrics["val_loss"] < best["val_loss"]:
            best.update(step=step, **metrics)
            save_model_dir(
                out_dir / "best",
                raw_model,
                data_dir / TOKENIZER,
                tokenizer_hash=tokenizer.hash,
                step=step,
                **metrics,
            )
        callbacks.on_eval(step, metrics)
        return metrics

    def checkpoint(step: int) -> Path:
        rngs = [rng_state()]
        if dd.enabled:
            gathered: list[Any] = [None] * dd.world_size
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if not dd.master:
            return step_dir(out_dir, step)
        state = {
            "step": step,
            "schedule": {
                "kind": "warmup_cosine",
                "lr": lr_at(
                    step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps
                ),
            },
            "loader": loader.state_dict(),
            "rng": rngs,
            "losses": losses,
            "evals": evals,
            "best": best,
            "world_size": dd.world_size,
            "model_config": model_config.to_dict(),
            "train_config": cfg.to_dict(),
            "tokenizer_hash": tokenizer.hash,
        }
        last_val = evals[-1] if evals and evals[-1]["step"] == step else {}
        path = save_training_checkpoint(
            step_dir(out_dir, step),
            raw_model,
            optimizer,
            state,
            data_dir / TOKENIZER,
            tokenizer_hash=tokenizer.hash,
            step=step,
            **{k: v for k, v in last_val.items() if k != "step"},
        )
        write_latest(out_dir, path)
        prune_checkpoints(out_dir, cfg.keep_last)
        callbacks.on_checkpoint(step, path)
        return path

    # ---------------------------------------------------------------- the loop
    bar = tqdm(
        total=cfg.max_steps,
        initial=start_step,
        desc="pretrain",
        unit="step",
        disable=not dd.master or not sys.stderr.isatty(),
        dynamic_ncols=True,
    )
    step, stopped_reason = start_step, "max_steps"
    compile_time_s = 0.0
    train_time_s, train_tokens = 0.0, 0
    window_t, window_steps = time.perf_counter(), 0
    last_ckpt_step = start_step if ckpt is not None else -1
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps)
        set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x, y = loader.next_batch()
            # Gradients are all-reduced only on the last micro-batch of a step.
            sync = not dd.enabled or micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else model.no_sync():
                with autocast(device, amp_dtype):
                    _, loss = model(x, y)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
        # One small all-reduce: the mean loss for the log, and rank 0's time-budget verdict for all.
        out_of_time = cfg.max_time > 0 and time.perf_counter() - t_start >= cfg.max_time
        packet = torch.stack([loss_sum / cfg.grad_accum, torch.tensor(float(out_of_time), device=device)])
        if dd.enabled:
            packet[1] *= float(dd.master)
            dist.all_reduce(packet)
            packet[0] /= dd.world_size
        loss_value, norm_value = packet[0].item(), float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            good = latest_checkpoint(out_dir)
            if metrics_log:
                metrics_log.write(
                    {"step": step + 1, "loss": loss_value, "grad_norm": norm_value, "diverged": True}
                )
            raise TrainingDiverged(
                f"loss={loss_value} grad_norm={norm_value} at step {step + 1}: training stopped before "
                f"applying that update. Last good checkpoint: {good or 'none'}. Lower --lr, keep "
                "--grad-clip on, or try --precision fp32, then resume with --resume"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss_value)
        dt = time.perf_counter() - t0
        if cfg.compile and step == start_step + 1:
            compile_time_s = dt  # the first step compiles; keep it out of the throughput figure
            window_t = time.perf_counter()
        else:
            train_time_s += dt
            train_tokens += tokens_per_step
            window_steps += 1
        bar.update(1)

        if step % cfg.log_interval == 0 and dd.master:
            elapsed = time.perf_counter() - window_t
            tok_s = window_steps * tokens_per_step / elapsed if window_steps and elapsed > 0 else 0.0
            metrics = {
                "loss": loss_value,
                "lr": lr,
                "grad_norm": norm_value,
                "tokens_per_s": tok_s,
                "flops_per_s": tok_s * flops_per_token,
                "elapsed_s": time.perf_counter() - t_start,
            }
            metrics_log.write({"step": step, **metrics})
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            if bar.disable:
                log.info(
                    "step %d/%d: loss %.4f, lr %.2e, %.0f tok/s", step, cfg.max_steps, loss_value, lr, tok_s
                )
            callbacks.on_step(step, metrics)
            window_t, window_steps = time.perf_counter(), 0

        stop = bool(packet[1].item())
        last = step == cfg.max_steps or stop
        if dd.master and (step % cfg.eval_interval == 0 or last):
            evaluate(step)
        if (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0) or last:
            checkpoint(step)
            last_ckpt_step = step
        if dd.enabled and (step % cfg.eval_interval == 0 or last):
            dist.barrier()  # the other ranks wait while rank 0 evaluates
        if step % cfg.eval_interval == 0 or last or step == last_ckpt_step:
            window_t, window_steps = time.perf_counter(), 0  # keep eval/checkpoint time out of tok/s
        if stop:
            stopped_reason = "max_time"
            log.info("wall-clock budget of %.0fs reached at step %d", cfg.max_time, step)
            break
    bar.close()

    # A resumed run that was already complete: make sure the last state is evaluated and saved.
    if step == start_step and dd.master and (not evals or evals[-1]["step"] != step):
        evaluate(step)
    if step == start_step and last_ckpt_step != step:
        checkpoint(step)

    checksums = [_weights_checksum(raw_model)]
    if dd.enabled:
        gathered: list[Any] = [None] * dd.world_size
        dist.all_gather_object(gathered, checksums[0])
        checksums = gathered

    final = evals[-1] if evals else {}
    last_path = step_dir(out_dir, step)
    summary = {
        "steps": step,
        "stopped_reason": stopped_reason,
        "final_loss": losses[-1] if losses else None,
        "final_val_loss": final.get("val_loss"),
        "final_val_bpb": final.get("val_bpb"),
        "best_val_loss": best.get("val_loss"),
        "best_val_bpb": best.get("val_bpb"),
        "best_step": best.get("step"),
        "tokens_per_s": train_tokens / train_time_s if train_time_s > 0 else None,
        "train_tokens": train_tokens,
        "train_time_s": train_time_s,
        "compile_time_s": compile_time_s,
        "wall_time_s": time.perf_counter() - t_start,
        "n_params": n_params,
        "device": str(device),
        "precision": "bf16" if amp_dtype else "fp32",
        "world_size": dd.world_size,
        "rank_weight_checksums": checksums,
        "paths": {
            "out_dir": str(out_dir),
            "best": str(out_dir / "best"),
            "last_checkpoint": str(last_path),
            "metrics": str(out_dir / METRICS),
        },
    }
    if len(set(checksums)) > 1:
        raise RuntimeError(f"DDP ranks ended with different weights (checksums {checksums}); this is a bug")
    if dd.master:
        write_manifest(
            out_dir,
            stage="pretrain",
            config={"model": model_config.to_dict(), "train": cfg.to_dict()},
            inputs={
                "data_dir": str(data_dir),
                "data_manifest_sha256": sha256_file(data_dir / MANIFEST),
                "tokenizer_hash": tokenizer.hash,
                "init_from": str(init_from) if init_from else None,
                "init_sha256": sha256_file(Path(init_from) / WEIGHTS) if init_from else None,
            },
            outputs={k: v for k, v in summary["paths"].items() if k != "out_dir"},
            metrics={k: v for k, v in summary.items() if k != "paths"},
        )
    return summary
