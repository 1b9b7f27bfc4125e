"""What finetuning does: the method (full, freeze, LoRA), schedule, budget and early stopping.

``FinetuneConfig.for_task`` starts from a task's recommended settings (sized for the cpu preset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpt.config import POOLINGS, ConfigBase, _in_range, _one_of, _positive, _whole
from gpt.lora import LORA_TARGETS
from gpt.tasks import Task, get_task

METHODS = ("full", "freeze", "lora")
PRECISIONS = ("auto", "fp32", "bf16")


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
    batch_size: int = 16  # examples per micro-batch (per rank under DDP)
    grad_accum: int = 1  # micro-batches per optimizer step
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
    device: str = "auto"  # auto | cpu | cuda (under torchrun: the local rank's GPU)
    compile: bool = False  # torch.compile the loss (the first step's compile time is reported apart)
    seed: int = 1337  # data order, sampling and dropout
    max_time: float = 0.0  # seconds of training before stopping at the best val checkpoint (0 = no limit)
    resume: bool = True  # continue from out_dir/checkpoints when an earlier run with this config stopped

    def __post_init__(self) -> None:
        _one_of(self, "method", METHODS)
        _one_of(self, "precision", PRECISIONS)
        _one_of(self, "pooling", POOLINGS)
        _one_of(self, "device", ("auto", "cpu", "cuda"))
        _positive(self, "batch_size", "grad_accum", "lr", "lora_rank", "lora_alpha", "epochs", "windows")
        _whole(
            self,
            "trainable_blocks",
            "epochs",
            "max_steps",
            "batch_size",
            "grad_accum",
            "max_len",
            "max_train_examples",
            "max_eval_examples",
            "eval_every",
            "patience",
            "lora_rank",
            "windows",
            "seed",
        )
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
