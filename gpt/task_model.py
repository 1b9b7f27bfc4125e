"""A model adapted to a task: which parameters train, the training losses, class log-probabilities over windows,
and the validation metrics finetuning selects its best checkpoint by.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt.device import autocast
from gpt.finetune_config import FinetuneConfig
from gpt.lora import apply_lora
from gpt.model import GPT
from gpt.task_data import IGNORE_INDEX, collate


def set_trainable(model: GPT, config: FinetuneConfig, kind: str) -> None:
    """Freeze what the method keeps fixed; LoRA wraps its targets. The classifier head always trains."""
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


def completion_loss(model, idx, labels):
    """Mean cross-entropy over labelled positions; the LM head runs only where a label exists."""
    h, _ = model.hidden_states(idx)  # (B, T, C); right padding needs no mask under causal attention
    sel = labels != IGNORE_INDEX  # (B, T)
    logits = model.lm_logits(h[sel])  # (N, vocab), soft-capped like the pretraining loss
    return F.cross_entropy(logits.float(), labels[sel])


def class_log_probs(model, groups: list[list[list[int]]], batch_size: int, device, amp=None):
    """(N, n_classes) float32 log-probabilities, one row per group of windows: the mean of the windows'
    log-softmax, renormalised (a product of experts). Windows are batched by length (little padding)."""
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
    if kind == "classification":
        log_probs = class_log_probs(model, [w for w, _ in data], batch_size, device, amp)
        labels = torch.tensor([y for _, y in data], dtype=torch.long)
        return {
            "val_loss": float(F.nll_loss(log_probs, labels)),
            "val_accuracy": float((log_probs.argmax(-1) == labels).float().mean()),
        }
    was_training = model.training
    model.eval()
    total_loss, n_loss = 0.0, 0
    with torch.no_grad(), autocast(device, amp):
        for start in range(0, len(data), batch_size):
            idx, _, labels = (t.to(device) for t in collate(data[start : start + batch_size], kind))
            n = int((labels != IGNORE_INDEX).sum())
            total_loss += float(completion_loss(model, idx, labels)) * n
            n_loss += n
    model.train(was_training)
    return {"val_loss": total_loss / max(1, n_loss)}


def val_score(val: dict[str, float], kind: str) -> tuple[float, float]:
    """Higher is better: accuracy first (loss breaks ties) for classification; -loss for completion."""
    if kind == "classification":
        return (val["val_accuracy"], -val["val_loss"])
    return (-val["val_loss"], 0.0)


class TaskLoss(torch.nn.Module):
    """The task's training loss as a forward pass, so torch.compile and DDP wrap it like the LM's."""

    def __init__(self, gpt: GPT, kind: str, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.gpt, self.kind, self.class_weights = gpt, kind, class_weights

    def forward(self, idx: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.kind == "classification":
            return self.gpt.classify(idx, mask, labels, self.class_weights)[1]
        return completion_loss(self.gpt, idx, labels)


def task_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, int]:
    idx, mask, labels = batch
    return model(idx, mask, labels), int(mask.sum())
