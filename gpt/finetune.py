"""Finetuning a pretrained GPT on one task: a classification head, or prompt → completion with the
loss on the completion only; full, last-N-blocks or LoRA updates; early stopping on the val metric.

    out_dir/best/        the finetuned model (LoRA merged into plain weights) + tokenizer.model
    out_dir/state/       resumable training state while a run is unfinished (removed at the end)
    out_dir/manifest.json  written last
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt.config import POOLINGS, ConfigBase, _in_range, _one_of, _positive
from gpt.lora import LORA_TARGETS
from gpt.tasks import Example, Task, check_labels, get_task, label_set, load_task_splits

log = logging.getLogger(__name__)

METHODS = ("full", "freeze", "lora")
PRECISIONS = ("auto", "fp32", "bf16")
IGNORE_INDEX = -100
PAD_ID, EOS_ID = 0, 3


@dataclass
class FinetuneConfig(ConfigBase):
    """How to finetune; ``for_task`` fills in a task's defaults (sized for the cpu preset)."""

    method: str = "full"  # full | freeze (only the last trainable_blocks blocks train) | lora
    trainable_blocks: int = 1  # freeze: number of last blocks that train (with the final norm and head)
    lora_rank: int = 8  # lora: rank r of the update B A
    lora_alpha: float = 16.0  # lora: the update is scaled by alpha / r
    lora_dropout: float = 0.0  # lora: dropout on the LoRA branch input
    lora_targets: tuple[str, ...] = LORA_TARGETS  # lora: Linear layers to adapt (suffixes of their names)
    epochs: int = 3  # passes over the train split
    max_steps: int = 0  # optimizer steps (0 = epochs decide)
    batch_size: int = 16  # examples per step
    lr: float = 3e-4  # peak learning rate (LoRA usually wants ~1e-3)
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    warmup_frac: float = 0.06  # fraction of steps of linear warmup
    weight_decay: float = 0.01  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # max gradient norm (0 = no clipping)
    dropout: float = 0.1  # dropout while finetuning
    max_len: int = 0  # tokens per example (0 = the task's input + target budget, capped at block_size)
    max_train_examples: int = 0  # use a seeded sample of this many train examples (0 = all)
    max_eval_examples: int = 500  # val examples per evaluation (0 = all)
    eval_every: int = 0  # steps between val evaluations (0 = once per epoch)
    patience: int = 3  # stop after this many evaluations without a better val metric (0 = never)
    class_weights: bool = False  # classification: weight the loss by inverse class frequency
    pooling: str = "last"  # classification head input: last (last non-pad token) | mean (of non-pad tokens)
    windows: int = 1  # classification: read a long input as up to this many max_len windows (train on each, predict from their mean log-probs)
    precision: str = "auto"  # auto (bf16 autocast where the hardware has it) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 1337  # data order, sampling and dropout
    max_time: float = 0.0  # seconds of training before stopping at the best val checkpoint (0 = no limit)
    resume: bool = True  # continue from out_dir/state when an earlier run with this config stopped

    def __post_init__(self) -> None:
        _one_of(self, "method", METHODS)
        _one_of(self, "precision", PRECISIONS)
        _one_of(self, "pooling", POOLINGS)
        _one_of(self, "device", ("auto", "cpu", "cuda"))
        _positive(self, "batch_size", "lr", "lora_rank", "lora_alpha", "epochs", "windows")
        for name in (
            "trainable_blocks",
            "epochs",
            "max_steps",
            "batch_size",
            "max_len",
            "max_train_examples",
            "max_eval_examples",
            "eval_every",
            "patience",
            "lora_rank",
            "windows",
            "seed",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"FinetuneConfig.{name}={value!r} must be an integer >= 0")
        for name in ("min_lr_ratio", "warmup_frac", "dropout", "lora_dropout"):
            _in_range(self, name, 0.0, 1.0)
        for name in ("weight_decay", "grad_clip", "max_time"):
            if getattr(self, name) < 0:
                raise ValueError(f"FinetuneConfig.{name}={getattr(self, name)} must be >= 0")
        if self.method == "freeze" and self.trainable_blocks < 1:
            raise ValueError("FinetuneConfig.trainable_blocks must be >= 1 with method=freeze")
        if self.method == "lora" and not self.lora_targets:
            raise ValueError(f"FinetuneConfig.lora_targets is empty; choose from {', '.join(LORA_TARGETS)}")

    @classmethod
    def for_task(cls, task: Task | str, **overrides: Any) -> FinetuneConfig:
        """The task's recommended settings, then ``overrides`` on top."""
        return cls.from_dict({**get_task(task).finetune_defaults, **overrides})


# ------------------------------------------------------------------------------------------------
# Encoding examples


def _template_ids(tokenizer, task: Task, budget: int) -> tuple[list[int], list[int], int]:
    """(ids before {input}, ids after it, tokens of input that fit) for a sequence of ``budget`` tokens
    that starts with EOS."""
    pre, post = task.prompt_template.split("{input}", 1)
    pre_ids = tokenizer.encode(pre) if pre else []
    post_ids = tokenizer.encode(post) if post else []
    room = budget - 1 - len(pre_ids) - len(post_ids)
    if room < 1:
        raise ValueError(
            f"task {task.name!r}: max length {budget} leaves no room for the input after the prompt template; "
            "raise --max-len"
        )
    return pre_ids, post_ids, room


def encode_prompt(tokenizer, task: Task, text: str, budget: int) -> list[int]:
    """EOS (the document boundary the model saw in pretraining), then the template with the input cut to fit."""
    pre_ids, post_ids, room = _template_ids(tokenizer, task, budget)
    return [EOS_ID, *pre_ids, *tokenizer.encode(text)[:room], *post_ids]


def classification_windows(
    tokenizer, task: Task, text: str, max_len: int, windows: int = 1
) -> list[list[int]]:
    """The input cut into up to ``windows`` consecutive pieces, each encoded as EOS + template + piece + EOS.

    The classifier pools at the final EOS, the same token for every example. One window is the
    input's start; more let a model with a short context read a long article whole (a TF-IDF baseline
    sees every word). A last piece shorter than a quarter window is dropped when there are others: a
    few words carry little evidence.
    """
    pre_ids, post_ids, room = _template_ids(tokenizer, task, max_len - 1)  # - 1: the final EOS
    ids = tokenizer.encode(text)
    pieces = [ids[i : i + room] for i in range(0, len(ids), room)][:windows] or [[]]
    if len(pieces) > 1 and len(pieces[-1]) < room / 4:
        pieces.pop()
    return [[EOS_ID, *pre_ids, *piece, *post_ids, EOS_ID] for piece in pieces]


def encode_completion(tokenizer, task: Task, example: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) for next-token training; labels are -100 wherever the target is a prompt token.

    The sequence is prompt + completion_prefix + target + EOS; input = sequence[:-1] (at most
    ``max_len`` tokens), labels = sequence[1:] with the prompt part ignored.
    """
    target = tokenizer.encode(task.completion_prefix + example.target)
    cap = min(task.max_target_tokens, max_len // 2)  # a short context keeps at least half for the prompt
    target = target[:cap] if len(target) >= cap else [*target, EOS_ID]
    prompt = encode_prompt(tokenizer, task, example.input, max_len + 1 - len(target))
    seq = prompt + target
    labels = [IGNORE_INDEX] * len(prompt) + target
    return seq[:-1], labels[1:]


def resolve_model_dir(path: str | Path) -> Path:
    """A model dir as given, or the ``best/`` inside a pretraining or finetuning run dir."""
    path = Path(path)
    if (path / "model.json").is_file():
        return path
    if (path / "best" / "model.json").is_file():
        return path / "best"
    raise FileNotFoundError(
        f"{path} holds no model.json (nor best/model.json); pass a model or run directory"
    )


def resolve_max_len(task: Task, config: FinetuneConfig, block_size: int) -> int:
    want = config.max_len or (
        task.max_input_tokens + (task.max_target_tokens if task.kind == "completion" else 0)
    )
    return min(want, block_size)


def _pad(rows: list[list[int]], value: int):
    import torch

    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def collate(batch: list[tuple[list[int], Any]], kind: str):
    """Right-padded (idx, attention_mask, labels); completion labels are padded with -100."""
    import torch

    idx = _pad([ids for ids, _ in batch], PAD_ID)
    mask = (_pad([[1] * len(ids) for ids, _ in batch], 0)).long()
    if kind == "classification":
        labels = torch.tensor([y for _, y in batch], dtype=torch.long)
    else:
        labels = _pad([y for _, y in batch], IGNORE_INDEX)
    return idx, mask, labels


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of similar lengths (less padding): shuffle, sort within pools of 32 batches, shuffle batches."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * 32
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


# ------------------------------------------------------------------------------------------------
# Model pieces


def completion_loss(model, idx, labels):
    """Mean cross-entropy over labelled positions; the LM head runs only where a label exists."""
    import torch.nn.functional as F

    h, _ = model.hidden_states(idx)  # (B, T, C); right padding needs no mask under causal attention
    sel = labels != IGNORE_INDEX  # (B, T)
    logits = model.lm_head(h[sel])  # (N, vocab)
    return F.cross_entropy(logits.float(), labels[sel])


def set_trainable(model, config: FinetuneConfig, kind: str) -> None:
    """Freeze what the method keeps fixed; LoRA wraps its targets. The classifier head always trains."""
    from gpt.lora import apply_lora

    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    for p in model.parameters():
        p.requires_grad_(False)
    if config.method == "freeze":
        blocks = model.transformer.h
        if config.trainable_blocks > len(blocks):
            raise ValueError(
                f"trainable_blocks={config.trainable_blocks} but the model has {len(blocks)} blocks"
            )
        for block in blocks[len(blocks) - config.trainable_blocks :]:
            for p in block.parameters():
                p.requires_grad_(True)
        for p in model.transformer.ln_f.parameters():
            p.requires_grad_(True)
        if kind == "completion" and not model.config.tie_weights:
            model.lm_head.weight.requires_grad_(True)
    else:
        apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets, config.lora_dropout)
    if model.score is not None:
        for p in model.score.parameters():
            p.requires_grad_(True)


# ------------------------------------------------------------------------------------------------
# Validation


def class_log_probs(model, groups: list[list[list[int]]], batch_size: int, device, amp=None):
    """(N, n_classes) float32 log-probabilities, one row per group of windows: the mean of the windows'
    log-softmax, renormalised (a product of experts). Windows are batched by length (little padding)."""
    import torch

    from gpt.device import autocast

    flat = [(g, ids) for g, windows in enumerate(groups) for ids in windows]
    flat.sort(key=lambda item: len(item[1]))
    total = torch.zeros(len(groups), model.config.n_classes)
    count = torch.zeros(len(groups), 1)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device, amp):
        for start in range(0, len(flat), batch_size):
            rows = flat[start : start + batch_size]
            idx, mask, _ = collate([(ids, 0) for _, ids in rows], "classification")
            logits = model.classify(idx.to(device), mask.to(device))
            owner = torch.tensor([g for g, _ in rows])
            total.index_add_(0, owner, logits.float().log_softmax(-1).cpu())
            count.index_add_(0, owner, torch.ones(len(rows), 1))
    model.train(was_training)
    return (total / count).log_softmax(-1)


def validate(model, data, kind: str, batch_size: int, device, amp=None) -> dict[str, float]:
    """Classification (``data``: (windows, label) pairs): accuracy + mean loss; completion: mean per-token loss."""
    import torch
    import torch.nn.functional as F

    from gpt.device import autocast

    if kind == "classification":
        log_probs = class_log_probs(model, [w for w, _ in data], batch_size, device, amp)
        labels = torch.tensor([y for _, y in data], dtype=torch.long)
        return {
            "val_loss": float(F.nll_loss(log_probs, labels)),
            "val_accuracy": float((log_probs.argmax(-1) == labels).float().mean()),
        }
    model.eval()
    total_loss, n_loss = 0.0, 0
    with torch.no_grad(), autocast(device, amp):
        for start in range(0, len(data), batch_size):
            idx, _, labels = (t.to(device) for t in collate(data[start : start + batch_size], kind))
            n = int((labels != IGNORE_INDEX).sum())
            total_loss += float(completion_loss(model, idx, labels)) * n
            n_loss += n
    model.train()
    return {"val_loss": total_loss / max(1, n_loss)}


def _score(val: dict[str, float], kind: str) -> tuple[float, float]:
    # Higher is better: accuracy first (loss breaks ties) for classification; -loss for completion.
    if kind == "classification":
        return (val["val_accuracy"], -val["val_loss"])
    return (-val["val_loss"], 0.0)


# ------------------------------------------------------------------------------------------------
# Resumable state: pretraining's training checkpoint (model + optimizer + trainer_state.json) in
# out_dir/state/last, plus the best val weights so far in out_dir/state/best.safetensors.

STATE_DIR = "state"


def _save_state(state_dir: Path, model, best_sd, optimizer, info: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from gpt.checkpoint import rng_state, save_training_checkpoint
    from gpt.io import atomic_path

    state_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(state_dir / "best.safetensors") as tmp:
        save_file(best_sd, str(tmp))
    save_training_checkpoint(state_dir / "last", model, optimizer, {**info, "rng": rng_state()})


def _load_state(state_dir: Path, model, optimizer, expect: dict[str, Any]):
    """(trainer state, best state dict) when ``state_dir`` holds a run of the same task and config, else None."""
    from gpt.checkpoint import TRAINER_STATE, load_state_dict, load_training_checkpoint, set_rng_state

    if not (state_dir / "last" / TRAINER_STATE).is_file():
        return None
    ckpt = load_training_checkpoint(state_dir / "last")
    info = ckpt.trainer_state
    expect = json.loads(json.dumps(expect))  # tuples come back from JSON as lists
    if any(info.get(k) != v for k, v in expect.items()):
        log.warning("%s belongs to a different task, config or checkpoint; starting fresh", state_dir)
        return None
    model.load_state_dict(ckpt.model_state, strict=False)
    optimizer.load_state_dict(ckpt.optimizer_state)
    set_rng_state(info["rng"])
    log.info("resuming from %s at step %d", state_dir, ckpt.step)
    return info, load_state_dict(state_dir / "best.safetensors")


# ------------------------------------------------------------------------------------------------


def _sample(examples: list[Example], n: int, seed: int) -> list[Example]:
    if not n or n >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def _call(callbacks: Any, name: str, *args: Any) -> None:
    fn = getattr(callbacks, name, None) if callbacks is not None else None
    if fn is not None:
        fn(*args)


def finetune(
    task: Task | str,
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    config: FinetuneConfig | None = None,
    callbacks: Any = None,
) -> dict[str, Any]:
    """Finetune the model in ``checkpoint_dir`` on ``task``; the best val checkpoint goes to ``out_dir/best``.

    ``callbacks`` may have ``on_step(step, metrics)`` and ``on_eval(step, metrics)``.
    Returns paths, the best val metrics and the training history (also in ``out_dir/manifest.json``).
    """
    import torch
    from tqdm.auto import tqdm

    from gpt.checkpoint import load_model, save_model_dir, unwrap
    from gpt.device import autocast, resolve_device, resolve_precision
    from gpt.io import sha256_file, write_manifest
    from gpt.lora import merge_lora
    from gpt.optim import build_optimizer, lr_at, set_lr
    from gpt.tokenizer import MODEL_FILE, Tokenizer

    t_start = time.perf_counter()
    task = get_task(task)
    config = config or FinetuneConfig.for_task(task)
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if not (checkpoint_dir / MODEL_FILE).is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir / MODEL_FILE} not found; finetuning needs a model dir with its tokenizer "
            "(a pretraining run's best/ directory)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)  # an older manifest keeps vouching for the older best/
    tokenizer = Tokenizer(checkpoint_dir / MODEL_FILE)
    torch.manual_seed(config.seed)

    splits = load_task_splits(task)
    train_ex = _sample(splits["train"], config.max_train_examples, config.seed)
    val_ex = _sample(splits["val"], config.max_eval_examples, config.seed)
    device = resolve_device(config.device)
    amp = resolve_precision(config.precision, device)  # autocast dtype, None = fp32

    labels: list[str] | None = None
    overrides: dict[str, Any] = {"dropout": config.dropout}
    if task.kind == "classification":
        labels = label_set(train_ex)
        if len(labels) < 2:
            raise ValueError(
                f"task {task.name!r}: the train split has one label ({labels}); need two or more"
            )
        check_labels(val_ex, labels, f"task {task.name!r} val split")
        overrides["n_classes"] = len(labels)
        overrides["pooling"] = config.pooling
    model, meta = load_model(checkpoint_dir, device, **overrides)
    if meta.get("tokenizer_hash") not in (None, tokenizer.hash):
        raise ValueError(
            f"{checkpoint_dir}: the model was trained with tokenizer {meta['tokenizer_hash'][:12]} but "
            f"{MODEL_FILE} there is {tokenizer.hash[:12]}; copy the matching tokenizer.model"
        )
    max_len = resolve_max_len(task, config, model.config.block_size)

    def encode(examples: list[Example]) -> list[tuple[Any, Any]]:
        if task.kind == "classification":  # (windows, label id)
            lab = {name: i for i, name in enumerate(labels)}
            return [
                (classification_windows(tokenizer, task, e.input, max_len, config.windows), lab[e.target])
                for e in examples
            ]
        return [encode_completion(tokenizer, task, e, max_len) for e in examples]

    train_data, val_data = encode(train_ex), encode(val_ex)
    if task.kind == "classification":  # every window is a training example with its article's label
        train_data = [(ids, y) for windows, y in train_data for ids in windows]
    class_weights = None
    if task.kind == "classification" and config.class_weights:
        counts = Counter(y for _, y in train_data)
        class_weights = torch.tensor(
            [len(train_data) / (len(labels) * counts.get(i, 1)) for i in range(len(labels))], device=device
        )

    set_trainable(model, config, task.kind)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = build_optimizer(model, config.lr, config.weight_decay, (0.9, 0.999), device.type)
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    warmup = int(config.warmup_frac * total_steps)
    eval_every = config.eval_every or steps_per_epoch
    lengths = [len(ids) for ids, _ in train_data]
    log.info(
        "finetune %s (%s, %s): %d train sequences / %d val examples, max_len %d, %d steps, %s trainable params, %s",
        task.name,
        task.kind,
        config.method,
        len(train_data),
        len(val_data),
        max_len,
        total_steps,
        f"{n_trainable:,}",
        f"{amp} autocast" if amp else "fp32",
    )

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}

    # Resume: same task + config + source checkpoint → continue at the saved step.
    state_dir = out_dir / STATE_DIR
    expect = {"task": task.name, "config": config.to_dict(), "checkpoint": str(checkpoint_dir.resolve())}
    step, best_score, bad_evals, history, elapsed0 = 0, None, 0, [], 0.0
    best_sd = snapshot()
    loaded = _load_state(state_dir, model, optimizer, expect) if config.resume else None
    if loaded is not None:
        info, best_sd = loaded
        step, bad_evals, history = info["step"], info["bad_evals"], info["history"]
        best_score = tuple(info["best_score"]) if info["best_score"] is not None else None
        elapsed0 = info["elapsed"]

    model.train()
    stopped = "completed"
    t0 = time.perf_counter() - elapsed0
    batches, batches_epoch = None, -1
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"finetune {task.name}",
        unit="step",
        leave=False,
        mininterval=1.0,
    )
    tokens_seen = 0
    while step < total_steps:
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:
            batches, batches_epoch = epoch_batches(lengths, config.batch_size, config.seed, epoch), epoch
        idx, mask, y = (t.to(device) for t in collate([train_data[j] for j in batches[i]], task.kind))
        lr = lr_at(
            step,
            lr=config.lr,
            min_lr=config.lr * config.min_lr_ratio,
            warmup_steps=warmup,
            max_steps=total_steps,
        )
        set_lr(optimizer, lr)
        with autocast(device, amp):
            if task.kind == "classification":
                _, loss = model.classify(idx, mask, y, class_weights)
            else:
                loss = completion_loss(model, idx, y)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], config.grad_clip
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += int(mask.sum())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        _call(callbacks, "on_step", step, {"loss": loss.item(), "lr": lr})

        out_of_time = bool(config.max_time) and time.perf_counter() - t0 > config.max_time
        if step % eval_every == 0 or step == total_steps or out_of_time:
            val = validate(model, val_data, task.kind, config.batch_size * 2, device, amp)
            score = _score(val, task.kind)
            improved = best_score is None or score > best_score
            if improved:
                best_score, best_sd, bad_evals = score, snapshot(), 0
            else:
                bad_evals += 1
            record = {"step": step, "epoch": step / steps_per_epoch, "train_loss": loss.item(), **val}
            history.append(record)
            log.info("step %d/%d %s%s", step, total_steps, _fmt(val), " (best)" if improved else "")
            _call(callbacks, "on_eval", step, record)
            if config.patience and bad_evals >= config.patience:
                stopped = "early_stopping"
            elif out_of_time:
                stopped = "max_time"
            if step < total_steps and stopped == "completed":
                info = {
                    **expect,
                    "step": step,
                    "best_score": list(best_score),
                    "bad_evals": bad_evals,
                    "history": history,
                    "elapsed": time.perf_counter() - t0,
                }
                _save_state(state_dir, model, best_sd, optimizer, info)
            if stopped != "completed":
                break
    bar.close()
    train_seconds = time.perf_counter() - t0

    # The best val weights, LoRA merged into plain Linear weights, written as an ordinary model dir.
    unwrap(model).load_state_dict(best_sd)
    merge_lora(model)
    model.eval()
    best_dir = out_dir / "best"
    best_val = max(history, key=lambda r: _score(r, task.kind)) if history else {}
    save_model_dir(  # replaced as a whole: a crash never leaves a half-new best/ beside old files
        best_dir,
        model,
        tokenizer_path=checkpoint_dir / MODEL_FILE,
        tokenizer_hash=tokenizer.hash,
        task=task.name,
        kind=task.kind,
        labels=labels,
        pretrained=str(checkpoint_dir.resolve()),
        finetune=config.to_dict(),
        max_len=max_len,
        windows=config.windows,
        prompt_template=task.prompt_template,
        val=best_val,
    )
    shutil.rmtree(state_dir, ignore_errors=True)
    result = {
        "task": task.name,
        "kind": task.kind,
        "best_dir": str(best_dir),
        "labels": labels,
        "method": config.method,
        "steps": step,
        "total_steps": total_steps,
        "stopped": stopped,
        "n_train": len(train_ex),
        "n_train_sequences": len(train_data),
        "n_val": len(val_data),
        "max_len": max_len,
        "windows": config.windows,
        "trainable_params": n_trainable,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_s": round(tokens_seen / max(train_seconds - elapsed0, 1e-9), 1),
        "seconds": round(time.perf_counter() - t_start, 2),
        "best_val": best_val,
        "history": history,
    }
    write_manifest(
        out_dir,
        stage="finetune",
        task=task.name,
        config=config.to_dict(),
        inputs={
            "checkpoint": str(checkpoint_dir),
            "weights_sha256": sha256_file(checkpoint_dir / "model.safetensors"),
        },
        files={"best/model.safetensors": sha256_file(best_dir / "model.safetensors")},
        metrics={k: v for k, v in result.items() if k != "history"},
        history=history,
    )
    return result


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
