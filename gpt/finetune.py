"""Finetuning a pretrained GPT on one task: a classification head, or prompt → completion with the
loss on the completion only; full, last-N-blocks or LoRA updates; early stopping on the val metric.
The loop is pretraining's (``gpt.engine.Trainer``), with accumulation, DDP, compile, the NaN guard,
the time budget and bit-exact resume.

    out_dir/best/          the finetuned model (LoRA merged into plain weights) + tokenizer.model
    out_dir/checkpoints/   while a run is unfinished: checkpoints with the best val weights so far
    out_dir/metrics.jsonl  one JSON record per step and per evaluation; manifest.json is written last
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint import TOKENIZER, WEIGHTS, load_model, save_model_dir
from gpt.device import Dist, dist_from_env, resolve_device, resolve_precision
from gpt.engine import METRICS, Callbacks, Checkpointer, MetricsLog, Plan, Trainer, process_group
from gpt.finetune_config import FinetuneConfig
from gpt.io import sha256_file, write_manifest
from gpt.lora import merge_lora
from gpt.optim import build_optimizer, lr_at
from gpt.parallel import wrap
from gpt.task_data import TaskData, TaskLoader, encode_task, resolve_max_len, sample_examples, task_labels
from gpt.task_model import TaskLoss, set_trainable, task_loss, val_score, validate
from gpt.tasks import Task, get_task, load_task_splits
from gpt.tokenizer import Tokenizer

__all__ = ["FinetuneConfig", "finetune"]

log = logging.getLogger(__name__)


def finetune(
    task: Task | str,
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    config: FinetuneConfig | None = None,
    callbacks: Callbacks | Any = None,
) -> dict[str, Any]:
    """Finetune the model in ``checkpoint_dir`` on ``task``; the best val checkpoint goes to ``out_dir/best``.

    ``callbacks`` may have ``on_step(step, metrics)``, ``on_eval(step, metrics)`` and
    ``on_checkpoint(step, path)``. A run with the same task, config and source checkpoint continues
    from its last checkpoint in ``out_dir`` (``config.resume``). Returns paths, the best val metrics
    and the training history (also in ``out_dir/manifest.json``).
    """
    t_start = time.perf_counter()
    task = get_task(task)
    config = config or FinetuneConfig.for_task(task)
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    dd = dist_from_env()
    device = resolve_device(config.device, dd.local_rank)
    model, tokenizer, data = _model_and_data(task, config, checkpoint_dir, device)
    out_dir.mkdir(parents=True, exist_ok=True)  # an older manifest keeps vouching for the older best/
    with process_group(dd, device):
        trainer, best = _trainer(task, config, model, data, checkpoint_dir, out_dir, dd, device)
        trainer.callbacks = callbacks or Callbacks()
        result = trainer.fit()
    st = trainer.state
    if dd.master:
        _save_best(
            model, best["weights"], out_dir, checkpoint_dir, tokenizer.hash, task, config, data, st.best
        )
        trainer.checkpointer.clear()
    summary = {
        "task": task.name,
        "kind": task.kind,
        "best_dir": str(out_dir / "best"),
        "labels": data.labels,
        "method": config.method,
        "steps": st.step,
        "total_steps": trainer.plan.max_steps,
        "stopped": "completed" if result.stopped_reason == "max_steps" else result.stopped_reason,
        "n_train": data.n_train,
        "n_train_sequences": len(data.train),
        "n_val": len(data.val),
        "max_len": data.max_len,
        "windows": config.windows,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_seconds": round(st.elapsed_s, 2),
        "tokens_per_s": round(result.tokens_per_s or 0.0, 1),
        "seconds": round(time.perf_counter() - t_start, 2),
        "best_val": st.best,
        "history": st.evals,
    }
    if dd.master:
        write_manifest(
            out_dir,
            stage="finetune",
            task=task.name,
            config=config.to_dict(),
            inputs={
                "checkpoint": str(checkpoint_dir),
                "weights_sha256": sha256_file(checkpoint_dir / WEIGHTS),
            },
            files={f"best/{WEIGHTS}": sha256_file(out_dir / "best" / WEIGHTS)},
            metrics={k: v for k, v in summary.items() if k != "history"},
            history=st.evals,
        )
    return summary


def _model_and_data(task: Task, config: FinetuneConfig, checkpoint_dir: Path, device):
    """The pretrained model with the task's head and dropout, its tokenizer, and the encoded task."""
    if not (checkpoint_dir / TOKENIZER).is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir / TOKENIZER} not found; finetuning needs a model dir with its tokenizer "
            "(a pretraining run's best/ directory)"
        )
    tokenizer = Tokenizer(checkpoint_dir / TOKENIZER)
    torch.manual_seed(config.seed)
    splits = load_task_splits(task)
    train_ex = sample_examples(splits["train"], config.max_train_examples, config.seed)
    val_ex = sample_examples(splits["val"], config.max_eval_examples, config.seed)
    labels = task_labels(task, train_ex, val_ex)
    overrides: dict[str, Any] = {"dropout": config.dropout}
    if labels:
        overrides.update(n_classes=len(labels), pooling=config.pooling)
    model, meta = load_model(checkpoint_dir, device, **overrides)
    if meta.get("tokenizer_hash") not in (None, tokenizer.hash):
        raise ValueError(
            f"{checkpoint_dir}: the model was trained with tokenizer {meta['tokenizer_hash'][:12]} but "
            f"{TOKENIZER} there is {tokenizer.hash[:12]}; copy the matching tokenizer.model"
        )
    max_len = resolve_max_len(task, config.max_len, model.config.block_size)
    data = encode_task(task, tokenizer, train_ex, val_ex, labels, max_len, config.windows)
    return model, tokenizer, data


def _save_best(model, weights, out_dir, checkpoint_dir, tokenizer_hash, task, config, data, val) -> None:
    """The best val weights, LoRA merged into plain Linear weights, as an ordinary model dir that is
    replaced as a whole: a crash never leaves a half-new best/ beside old files."""
    model.load_state_dict(weights)
    merge_lora(model)
    model.eval()
    save_model_dir(
        out_dir / "best",
        model,
        tokenizer_path=checkpoint_dir / TOKENIZER,
        tokenizer_hash=tokenizer_hash,
        task=task.name,
        kind=task.kind,
        labels=data.labels,
        pretrained=str(checkpoint_dir.resolve()),
        finetune=config.to_dict(),
        max_len=data.max_len,
        windows=config.windows,
        prompt_template=task.prompt_template,
        generation=decoding_defaults(task),
        val=val,
    )


def decoding_defaults(task: Task) -> dict | None:
    """How a completion task's model should decode (what evaluation uses); the export puts it in the
    bundle's config.json, so the runtime and the server decode that way unless a request says otherwise."""
    if task.kind != "completion":
        return None
    return {
        "no_repeat_ngram_size": task.no_repeat_ngram_size,
        "max_new_tokens": task.max_target_tokens,
        "stop": ["\n"] if task.single_line else [],
    }


def _trainer(task, config, model, data: TaskData, checkpoint_dir, out_dir, dd: Dist, device):
    """The engine for this task, resumed from ``out_dir``'s checkpoint when it is this same run's;
    and the holder of the best val weights so far."""
    kind = task.kind
    class_weights = None
    if kind == "classification" and config.class_weights:
        counts, n = Counter(y for _, y in data.train), len(data.train)
        weights = [n / (len(data.labels) * counts.get(i, 1)) for i in range(len(data.labels))]
        class_weights = torch.tensor(weights, device=device)
    set_trainable(model, config, kind)
    model.train()  # dropout on (load_model returns eval mode)
    optimizer = build_optimizer(model, config.lr, config.weight_decay, (0.9, 0.999), device.type)
    loader = TaskLoader(data.train, kind, config.batch_size, config.seed, device, dd.rank, dd.world_size)
    steps_per_epoch = math.ceil(loader.n_batches / config.grad_accum)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    eval_every = config.eval_every or steps_per_epoch
    amp = resolve_precision(config.precision, device)  # autocast dtype, None = fp32
    best = {"weights": _snapshot(model)}

    def evaluate(step: int) -> dict[str, Any]:
        val = validate(model, data.val, kind, config.batch_size * 2, device, amp)
        return {"epoch": step / steps_per_epoch, "train_loss": trainer.state.losses[-1], **val}

    def on_best(step: int, metrics: dict[str, Any]) -> None:
        best["weights"] = _snapshot(model)

    identity = {"task": task.name, "config": config.to_dict(), "checkpoint": str(checkpoint_dir.resolve())}
    trainer = Trainer(
        module=model,
        model=wrap(TaskLoss(model, kind, class_weights), device, dd, config.compile),
        optimizer=optimizer,
        loader=loader,
        loss_fn=task_loss,
        schedule=partial(
            lr_at,
            lr=config.lr,
            min_lr=config.lr * config.min_lr_ratio,
            warmup_steps=int(config.warmup_frac * total_steps),
            max_steps=total_steps,
        ),
        evaluate=evaluate,
        plan=Plan(
            max_steps=total_steps,
            grad_accum=config.grad_accum,
            grad_clip=config.grad_clip,
            eval_interval=eval_every,
            checkpoint_interval=eval_every,
            checkpoint_at_end=False,
            max_time=config.max_time,
            patience=config.patience,
            desc=f"finetune {task.name}",
        ),
        device=device,
        amp=amp,
        dd=dd,
        score=partial(val_score, kind=kind),
        on_best=on_best,
        checkpointer=Checkpointer(out_dir, dd, keep_last=1, identity=identity),
        checkpoint_tensors=lambda: {"best": best["weights"]},
    )
    _resume(trainer, identity, config.resume, best)
    trainable, precision = sum(p.numel() for p in model.parameters() if p.requires_grad), amp or "fp32"
    sizes = f"{len(data.train)} train sequences / {len(data.val)} val examples, max_len {data.max_len}"
    log.info(
        f"finetune {task.name} ({kind}, {config.method}): {sizes}, {total_steps} steps, {trainable:,} trainable, {precision}"
    )
    return trainer, best


def _resume(trainer: Trainer, identity: dict[str, Any], resume: bool, best: dict[str, Any]) -> None:
    """Continue from the last checkpoint when it belongs to this task, config and source model."""
    ckpt = trainer.checkpointer.latest() if resume else None
    expect = json.loads(json.dumps(identity))  # tuples come back from JSON as lists
    if ckpt is not None and all(ckpt.trainer_state.get(k) == v for k, v in expect.items()):
        best["weights"] = trainer.restore(ckpt)["best"]
    elif ckpt is not None:
        log.warning("%s belongs to a different task, config or checkpoint; starting fresh", ckpt.path)
    if trainer.dd.master:
        if trainer.state.step == 0:
            trainer.checkpointer.clear()
        trainer.metrics = MetricsLog(trainer.checkpointer.run_dir / METRICS, trainer.state.step or None)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
