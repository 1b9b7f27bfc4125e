"""``TrainConfig``: how a pretraining run goes. Torch-free so the CLI and Prefect can import it cheaply.

``gpt.train`` re-exports it; presets match the ``ModelConfig`` presets of the same name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from gpt.config import ConfigBase, _in_range, _one_of, _positive, _whole

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adamw", "muon")
PARALLEL = ("ddp", "fsdp")  # how torchrun's ranks hold the model (gpt.parallel)
MUON_ADJUST_LR = ("original", "match_rms_adamw")  # torch.optim.Muon's adjust_lr_fn


@dataclass
class TrainConfig(ConfigBase):
    """Optimizer, schedule, evaluation, checkpointing and runtime settings of ``gpt.train.train``."""

    batch_size: int = 16  # sequences per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per optimizer step (tokens/step = batch x block x accum x ranks); --resume at another world size recomputes it to keep the checkpoint's global batch
    max_steps: int = 2000  # optimizer steps in the run; the cosine schedule ends here
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    min_lr: float = 1e-4  # floor the cosine decay ends at
    warmup_steps: int = 100  # steps of linear warmup
    weight_decay: float = 0.1  # AdamW weight decay on matrices and embeddings (never biases or norms)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = no clipping)
    eval_interval: int = 250  # evaluate on the val split every N steps (and at the end)
    eval_batches: int = 20  # val batches per evaluation (0 = the whole val split)
    log_interval: int = 10  # metrics.jsonl record, progress line and on_step callback every N steps
    checkpoint_interval: int = 500  # training checkpoint every N steps (0 = only at the end)
    keep_last: int = 3  # training checkpoints kept on disk (best/ is kept apart)
    seed: int = 1337  # seed for the initial weights and the data order
    precision: str = "auto"  # auto | fp32 | bf16 (auto: bf16 on CUDA and on CPUs with bf16 matmul)
    compile: bool = False  # torch.compile the model (compile time is reported apart)
    device: str = "auto"  # auto | cpu | cuda (under torchrun: the local rank's GPU)
    parallel: str = "ddp"  # ddp | fsdp under torchrun: ddp replicates the model, fsdp (FSDP2) shards weights, grads and optimizer state per block
    max_time: float = 0.0  # wall-clock budget in seconds: stop, evaluate and checkpoint (0 = none)
    optimizer: str = "adamw"  # adamw | muon (Muon for the 2-D weights in the blocks, AdamW for the rest)
    muon_lr: float = 0.02  # Muon's peak learning rate, scaled by the schedule like lr (optimizer=muon)
    muon_momentum: float = 0.95  # Muon momentum (optimizer=muon)
    muon_nesterov: bool = True  # Nesterov momentum in Muon (optimizer=muon)
    muon_weight_decay: float = 0.0  # Muon's decoupled weight decay, applied as lr x decay (optimizer=muon)
    muon_ns_steps: int = 5  # Newton-Schulz iterations that orthogonalise each Muon update (optimizer=muon)
    muon_adjust_lr: str = "original"  # Muon's lr per matrix (adjust_lr_fn): original | match_rms_adamw

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            batch_size=8,
            max_steps=60,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=5,
            beta2=0.99,
            eval_interval=20,
            eval_batches=4,
            log_interval=1,
            checkpoint_interval=30,
            keep_last=2,
        ),
        # Sized for the default pipeline's budget on 2 CPU cores: 3-5 minutes. Compiled, because on
        # this shape a compiled bf16 step is ~1.45x an eager one (13.8k vs 9.4k tokens/s, 2026-12-05),
        # which pays for a cold compile (~32 s) well inside the run: on the same shards, one after the
        # other, eager 415 steps reached 1.863 val bits per byte in 188.9 s wall, compiled 480 steps
        # 1.818 in 186.9 s (cold compile included). (Before: 415 rotary steps, sized to the time 450
        # learned-position steps took.) No C++ compiler on the machine: it trains eagerly, and warns.
        "cpu": dict(
            batch_size=16,
            max_steps=480,
            compile=True,
            lr=1.5e-3,
            min_lr=1.5e-4,
            warmup_steps=30,
            beta2=0.99,
            eval_interval=150,
            eval_batches=20,
            checkpoint_interval=150,
        ),
        # nanoGPT's GPT-2 recipe: ~0.5M tokens/step on 8 GPUs (16 x 1024 x 4 x 8), 10B tokens.
        "gpt2-124m": dict(
            batch_size=16,
            grad_accum=4,
            max_steps=19073,
            lr=6e-4,
            min_lr=6e-5,
            warmup_steps=700,
            beta2=0.95,
            eval_interval=500,
            eval_batches=50,
            checkpoint_interval=1000,
            compile=True,
        ),
    }

    def __post_init__(self) -> None:
        ints = ("batch_size", "grad_accum", "max_steps", "warmup_steps", "eval_interval", "eval_batches")
        ints += ("log_interval", "checkpoint_interval", "keep_last", "seed")
        _whole(self, *ints)
        _positive(self, "batch_size", "grad_accum", "max_steps", "eval_interval", "log_interval", "keep_last")
        _positive(self, "lr")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"TrainConfig.min_lr={self.min_lr} must be in [0, lr={self.lr}]")
        for name in ("weight_decay", "grad_clip", "max_time"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be in [0, 1)")
        _one_of(self, "precision", PRECISIONS)
        _one_of(self, "device", DEVICES)
        for name in ("compile", "muon_nesterov"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must be true or false")
        _one_of(self, "optimizer", OPTIMIZERS)
        _one_of(self, "parallel", PARALLEL)
        if self.parallel == "fsdp" and self.optimizer != "adamw":
            raise ValueError(
                f"TrainConfig.parallel='fsdp' needs optimizer='adamw', not {self.optimizer!r}: Muon "
                "orthogonalises whole matrices, which FSDP splits across ranks; use --parallel ddp with Muon"
            )
        _one_of(self, "muon_adjust_lr", MUON_ADJUST_LR)
        _positive(self, "muon_lr")
        _in_range(self, "muon_momentum", 0.0, 1.0)
        if self.muon_momentum >= 1.0:
            raise ValueError(f"TrainConfig.muon_momentum={self.muon_momentum} must be in [0, 1)")
        _in_range(self, "muon_weight_decay", 0.0, math.inf)
        steps = self.muon_ns_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps < 100:
            raise ValueError(f"TrainConfig.muon_ns_steps={steps!r} must be an integer in [1, 99]")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrainConfig:
        if name not in cls.PRESETS:
            raise ValueError(f"unknown train preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})
