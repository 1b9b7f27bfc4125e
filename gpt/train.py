"""Pretraining: the stage function ``train()`` (called by the CLI, the Prefect flow and the tests)
builds the model, optimizer and shard loader and hands them to the engine (``gpt.engine.Trainer``):
accumulation, bf16 autocast, DDP or FSDP2 under ``torchrun`` (rank 0 logs and writes), periodic
evaluation (loss and bits per byte) and atomic checkpoints from which a run resumes bit for bit.

Elastic resume: a checkpoint continues at another world size (``torchrun --nproc_per_node`` or
``--nnodes``) with the same global batch (batch_size x grad_accum x world_size sequences per step):
batch_size stays, grad_accum is recomputed (:func:`resume_grad_accum`), and the loader's cursor is in
global samples, so every optimizer step sees the same windows as it would have.

Output directory:
    checkpoints/step-000060/   model.safetensors, model.json, tokenizer.model, optimizer.safetensors,
                               trainer_state.json (see gpt.checkpoint); the last ``keep_last`` are kept
    best/                      best-by-val model directory (load with gpt.checkpoint.load_model)
    latest                     relative path of the newest complete checkpoint
    metrics.jsonl              one JSON record per logged step and per evaluation
    manifest.json              configs, inputs, outputs and summary metrics; written last
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint import (
    TOKENIZER,
    WEIGHTS,
    check_same_model,
    check_same_tokenizer,
    load_model,
    prune_checkpoints,
    save_model_dir,
    step_dir,
)
from gpt.config import ModelConfig
from gpt.data import ShardDataset, TrainLoader
from gpt.device import dist_from_env, resolve_device, resolve_precision
from gpt.engine import (
    METRICS,
    Callbacks,
    Checkpointer,
    MetricsLog,
    Plan,
    Trainer,
    TrainingDiverged,
    process_group,
)
from gpt.io import MANIFEST, sha256_file, write_manifest
from gpt.model import GPT
from gpt.optim import build_train_optimizer, lr_at
from gpt.parallel import full_state, rank_checksums, wrap
from gpt.scoring import evaluate_lm
from gpt.tokenizer import Tokenizer
from gpt.train_config import TrainConfig

__all__ = ["Callbacks", "TrainConfig", "TrainingDiverged", "resume_grad_accum", "train"]

log = logging.getLogger(__name__)


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
    t_start = time.perf_counter()
    cfg, data_dir, out_dir = train_config, Path(data_dir), Path(out_dir)
    dd = dist_from_env()
    device = resolve_device(cfg.device, dd.local_rank)
    tokenizer = Tokenizer(data_dir / TOKENIZER)
    model_config = model_config.replace(vocab_size=tokenizer.vocab_size)
    with process_group(dd, device):
        trainer, cfg = _trainer(
            model_config, cfg, data_dir, out_dir, tokenizer, resume, init_from, dd, device
        )
        trainer.callbacks = callbacks or Callbacks()
        result = trainer.fit()
        checksums = rank_checksums(trainer.module, dd)
    if len(set(checksums)) > 1:
        raise RuntimeError(f"ranks ended with different weights (checksums {checksums}); this is a bug")

    st = trainer.state
    final, best = (st.evals[-1] if st.evals else {}), st.best
    summary = {
        "steps": st.step,
        "stopped_reason": result.stopped_reason,
        "final_loss": st.losses[-1] if st.losses else None,
        "final_val_loss": final.get("val_loss"),
        "final_val_bpb": final.get("val_bpb"),
        "best_val_loss": best.get("val_loss"),
        "best_val_bpb": best.get("val_bpb"),
        "best_step": best.get("step"),
        "tokens_per_s": result.tokens_per_s,
        "train_tokens": result.train_tokens,
        "train_time_s": result.train_time_s,
        "compile_time_s": result.compile_time_s,
        "wall_time_s": time.perf_counter() - t_start,
        "n_params": trainer.module.num_parameters(),
        "device": str(device),
        "precision": "bf16" if trainer.amp else "fp32",
        "world_size": dd.world_size,
        "rank_weight_checksums": checksums,
        "paths": {
            "out_dir": str(out_dir),
            "best": str(out_dir / "best"),
            "last_checkpoint": str(step_dir(out_dir, st.step)),
            "metrics": str(out_dir / METRICS),
        },
    }
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


def _trainer(
    model_config, cfg, data_dir, out_dir, tokenizer, resume, init_from, dd, device
) -> tuple[Trainer, TrainConfig]:
    """The model (fresh, ``init_from``, or the checkpoint to resume), its optimizer and loader, in an
    engine; and ``cfg`` as this run uses it (grad_accum recomputed on an elastic resume)."""
    train_ds = ShardDataset(data_dir, "train", tokenizer_hash=tokenizer.hash)
    val_ds = ShardDataset(data_dir, "val", tokenizer_hash=tokenizer.hash, verify=False)
    if val_ds.num_tokens < 2:
        raise ValueError(f"the val split of {data_dir} is empty; re-shard with a val_fraction > 0")
    tok_path, tok_hash = data_dir / TOKENIZER, tokenizer.hash
    identity = {
        "model_config": model_config.to_dict(),
        "train_config": cfg.to_dict(),
        "tokenizer_hash": tok_hash,
    }
    checkpointer = Checkpointer(out_dir, dd, cfg.keep_last, identity, tok_path, tokenizer_hash=tok_hash)
    ckpt = checkpointer.resume_point(resume)
    if ckpt is not None:
        _check_resumable(ckpt, model_config, cfg, tok_hash, data_dir)
        accum = resume_grad_accum(ckpt.trainer_state, cfg.batch_size, dd.world_size)
        if accum != cfg.grad_accum:
            log.warning(
                "grad_accum %d -> %d keeps the checkpoint's global batch of %d sequences on %d rank(s)",
                cfg.grad_accum,
                accum,
                accum * cfg.batch_size * dd.world_size,
                dd.world_size,
            )
            cfg = cfg.replace(grad_accum=accum)
        checkpointer.identity["train_config"] = cfg.to_dict()
    model = _model(model_config, cfg.seed, None if ckpt else init_from, tok_hash, data_dir, device)
    trained = wrap(model, device, dd, cfg.compile, cfg.parallel)  # fsdp shards model in place
    optimizer = build_train_optimizer(model, cfg, device.type)
    block = model_config.block_size
    loader = TrainLoader(train_ds, block, cfg.batch_size, cfg.seed, dd.rank, dd.world_size, device)
    if ckpt is None:
        torch.manual_seed(cfg.seed + dd.rank)  # dropout differs across ranks, like their data
    metrics = None  # only rank 0 writes; a stale manifest would vouch for outputs about to change
    if dd.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MANIFEST).unlink(missing_ok=True)
        prune_checkpoints(out_dir, keep_last=0)  # only clears temp dirs of killed runs
        metrics = MetricsLog(out_dir / METRICS, keep_until_step=ckpt.step if ckpt else None)
    amp = resolve_precision(cfg.precision, device)
    token_bytes = tokenizer.token_byte_lengths()
    eval_batches = cfg.eval_batches or None

    def evaluate(step: int) -> dict[str, float]:
        return evaluate_lm(model, val_ds, block, cfg.batch_size, token_bytes, device, eval_batches, amp)

    def save_best(step: int, val: dict[str, float]) -> None:
        weights, _ = full_state(model)  # collective when sharded (every rank evaluates then)
        if dd.master:
            meta = dict(tokenizer_hash=tok_hash, step=step, **val)
            save_model_dir(out_dir / "best", model, tok_path, weights, **meta)

    plan = Plan(
        max_steps=cfg.max_steps,
        grad_accum=cfg.grad_accum,
        grad_clip=cfg.grad_clip,
        eval_interval=cfg.eval_interval,
        log_interval=cfg.log_interval,
        checkpoint_interval=cfg.checkpoint_interval,
        max_time=cfg.max_time,
        desc="pretrain",
    )
    schedule = partial(
        lr_at, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps
    )
    trainer = Trainer(
        model,
        trained,
        optimizer,
        loader,
        _lm_loss,
        schedule,
        evaluate,
        plan,
        device,
        amp,
        dd,
        on_best=save_best,
        checkpointer=checkpointer,
        metrics=metrics,
        flops_per_token=model.flops_per_token(block),
        elastic=True,
    )
    if ckpt is not None:
        trainer.restore(ckpt)
    precision = "bf16 autocast" if amp else "fp32"
    n, first = model.num_parameters() / 1e6, trainer.state.step
    ranks = f"{dd.world_size} rank(s), {cfg.parallel}" if dd.enabled else "1 process"
    log.info(
        f"training {n:.2f}M parameters on {device} ({precision}, {ranks}), steps {first}..{cfg.max_steps}"
    )
    return trainer, cfg


def _lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    x, y = batch
    _, loss = model(x, y)
    return loss, x.numel()


def resume_grad_accum(trainer_state: dict[str, Any], batch_size: int, world_size: int) -> int:
    """The grad_accum that keeps a checkpoint's global batch (sequences per optimizer step) with
    ``batch_size`` sequences per micro-batch on ``world_size`` ranks; ValueError when none does.

    The micro-batch stays as it was so that each forward pass has the shapes it had: a 2-rank run
    resumed on 1 rank with twice the accumulation computes the same sums (bit for bit when no
    dropout draws differ, see the README)."""
    loader = trainer_state["loader"]
    saved_world = trainer_state.get("world_size", len(trainer_state["rng"]))
    # Checkpoints older than elastic resume ran with their config's grad_accum throughout.
    saved_accum = trainer_state.get("grad_accum") or trainer_state["train_config"]["grad_accum"]
    global_batch = loader["batch_size"] * saved_accum * saved_world
    per_micro_step = batch_size * world_size
    if global_batch % per_micro_step:
        fits = [w for w in range(1, global_batch // batch_size + 1) if global_batch % (batch_size * w) == 0]
        raise ValueError(
            f"the checkpoint's global batch is {global_batch} sequences (batch_size {loader['batch_size']} x "
            f"grad_accum {saved_accum} x {saved_world} rank(s)); {world_size} rank(s) x batch_size "
            f"{batch_size} cannot keep it with a whole grad_accum. Resume on {', '.join(map(str, fits))} "
            "rank(s) in all, or start a new run in another --out directory"
        )
    return global_batch // per_micro_step


def _check_resumable(
    ckpt, model_config: ModelConfig, cfg: TrainConfig, tok_hash: str, data_dir: Path
) -> None:
    """Refuse to continue a checkpoint of another model, tokenizer or optimizer."""
    check_same_model(ckpt.meta["model"], model_config, ckpt.path)
    check_same_tokenizer(ckpt.meta.get("tokenizer_hash"), tok_hash, ckpt.path, data_dir)
    saved = ckpt.trainer_state.get("train_config", {}).get("optimizer", "adamw")  # older runs: AdamW
    if saved != cfg.optimizer:
        raise ValueError(
            f"{ckpt.path} was trained with optimizer={saved!r}, this run asks for {cfg.optimizer!r}; "
            f"resume with --optimizer {saved}, or start a new run in another --out directory"
        )


def _model(model_config, seed, init_from, tokenizer_hash, data_dir, device) -> GPT:
    """Seeded random weights (identical on every rank), or those of the model directory ``init_from``."""
    torch.manual_seed(seed)
    model = GPT(model_config)
    if init_from is not None:
        init_model, init_meta = load_model(init_from)
        check_same_model(init_meta["model"], model_config, Path(init_from))
        check_same_tokenizer(init_meta.get("tokenizer_hash"), tokenizer_hash, Path(init_from), data_dir)
        model.load_state_dict(init_model.state_dict())
    return model.to(device).train()
