"""The training engine shared by pretraining and finetuning (torchtitan's shape, nanoGPT's size).

A stage builds its model, optimizer, batches and loss, then hands them to a :class:`Trainer`:

    trainer = Trainer(module, model, optimizer, loader, loss_fn, schedule, evaluate, plan, device)
    result = trainer.fit()

``fit()`` runs the steps: gradient accumulation (DDP all-reduces, FSDP reduce-scatters, on the last
micro-batch only), autocast, clipping, a NaN/inf guard that stops before a bad update, evaluation on
rank 0 (on every rank when the model is sharded) with best-model and early-stopping bookkeeping, a
wall-clock budget that every rank obeys, atomic checkpoints (:class:`Checkpointer`, the format of
``gpt.checkpoint``, always unsharded) and ``metrics.jsonl``. Everything a run needs to continue bit
for bit lives in :class:`TrainState`, the loader's state, the RNG states of every rank, and the model
and optimizer tensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from gpt.checkpoint import (
    CHECKPOINTS,
    LATEST,
    TrainingCheckpoint,
    latest_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    prune_checkpoints,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
    step_dir,
    write_latest,
)
from gpt.device import Dist, autocast
from gpt.optim import set_lr
from gpt.parallel import full_state, gather_object, is_sharded, load_full_state, no_sync

__all__ = ["Callbacks", "Checkpointer", "FitResult", "Plan", "Trainer", "TrainState", "TrainingDiverged"]

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the update was not applied."""


class Callbacks:
    """No-op hooks called on rank 0; flows subclass this to log to MLflow."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """Every ``log_interval`` steps: loss, lr, grad_norm, tokens_per_s, flops_per_s, elapsed_s."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """After each evaluation, with what the stage's evaluate function returned."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """After a training checkpoint directory is complete."""


class Loader(Protocol):
    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """The engine's counters and history, saved in every checkpoint's trainer_state.json."""

    step: int = 0
    losses: list[float] = field(default_factory=list)  # mean training loss of every step
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step": ..., **metrics} per evaluation
    best: dict[str, Any] = field(default_factory=dict)  # the best evaluation so far ({} before the first)
    bad_evals: int = 0  # evaluations since the best one (early stopping)
    elapsed_s: float = 0.0  # training seconds spent before this process (the budget spans resumes)

    def state_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # a deep copy, as it will read back

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fresh = TrainState()
        for name in asdict(fresh):
            setattr(self, name, state.get(name, getattr(fresh, name)))


@dataclass
class Plan:
    """When the engine steps, evaluates, checkpoints and stops."""

    max_steps: int
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 0.0  # max global gradient norm (0 = no clipping)
    eval_interval: int = 0  # evaluate every N steps (0 = only at the end); always at the end
    log_interval: int = 1  # metrics.jsonl record and on_step callback every N steps
    checkpoint_interval: int = 0  # checkpoint every N steps (0 = only at the end)
    checkpoint_at_end: bool = True  # also checkpoint the last step (finetuning keeps only best/)
    max_time: float = 0.0  # seconds of training before stopping (0 = no limit)
    patience: int = 0  # stop after this many evaluations without a better score (0 = never)
    desc: str = "train"  # progress bar label


@dataclass
class FitResult:
    stopped_reason: str  # max_steps | max_time | early_stopping
    train_time_s: float  # seconds inside optimizer steps (the compile step excluded)
    train_tokens: int  # tokens those steps consumed, over all ranks
    compile_time_s: float

    @property
    def tokens_per_s(self) -> float | None:
        return self.train_tokens / self.train_time_s if self.train_time_s > 0 else None


# --------------------------------------------------------------------------------------------
# Process group


@contextlib.contextmanager
def process_group(dd: Dist, device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the duration (gloo on CPU, nccl on CUDA) unless already in one."""
    own = dd.enabled and not dist.is_initialized()
    if own:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if own:
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Checkpoints and the metrics log


class Checkpointer:
    """Atomic training checkpoints in ``run_dir/checkpoints/step-N`` with ``run_dir/latest``.

    ``identity`` (configs, tokenizer hash, task) goes into every trainer_state.json so a resume can
    refuse a checkpoint of another run; ``meta`` goes into model.json. Saving is collective under
    torchrun (every rank's RNG state is gathered, and a sharded model's weights and optimizer state);
    only rank 0 writes.
    """

    def __init__(
        self,
        run_dir: Path,
        dd: Dist,
        keep_last: int = 0,
        identity: dict[str, Any] | None = None,
        tokenizer_path: Path | None = None,
        **meta: Any,
    ):
        self.run_dir, self.dd, self.keep_last = Path(run_dir), dd, keep_last
        self.identity, self.tokenizer_path, self.meta = identity or {}, tokenizer_path, meta

    def latest(self) -> TrainingCheckpoint | None:
        path = latest_checkpoint(self.run_dir)
        return load_training_checkpoint(path) if path is not None else None

    def resume_point(self, resume: bool) -> TrainingCheckpoint | None:
        """The latest checkpoint with ``resume`` (None when there is none yet); without it, None, and
        a run directory that already holds checkpoints is refused rather than overwritten."""
        if not resume:
            if list_checkpoints(self.run_dir):
                raise FileExistsError(
                    f"{self.run_dir} already holds checkpoints; pass --resume to continue that run, "
                    "or choose another --out directory"
                )
            return None
        ckpt = self.latest()
        if ckpt is None:
            log.info("no checkpoint in %s: starting a fresh run", self.run_dir)
        return ckpt

    def save(self, step, module, optimizer, trainer_state, extra_tensors=None, **meta) -> Path:
        rngs = gather_object(rng_state(), self.dd)
        weights, optimizer_state = full_state(module, optimizer)
        path = step_dir(self.run_dir, step)
        if not self.dd.master:
            return path
        state = {**trainer_state, **self.identity, "rng": rngs, "world_size": self.dd.world_size}
        save_training_checkpoint(
            path,
            module,
            optimizer,
            state,
            self.tokenizer_path,
            extra_tensors,
            weights=weights,
            optimizer_state=optimizer_state,
            **self.meta,
            step=step,
            **meta,
        )
        write_latest(self.run_dir, path)
        prune_checkpoints(self.run_dir, self.keep_last)
        return path

    def clear(self) -> None:
        """Remove every checkpoint (a finished finetune keeps only its best/)."""
        shutil.rmtree(self.run_dir / CHECKPOINTS, ignore_errors=True)
        (self.run_dir / LATEST).unlink(missing_ok=True)


class MetricsLog:
    """Append-only metrics.jsonl; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        kept = []
        if keep_until_step is not None and path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if line.strip() and _record_step(line) <= keep_until_step]
        path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return sys.maxsize  # a torn last line from a killed run is dropped


# --------------------------------------------------------------------------------------------
# The loop


def lower_val_loss(metrics: dict[str, Any]) -> tuple[float, ...]:
    """The default score (higher is better): the negated validation loss."""
    return (-metrics["val_loss"],)


@dataclass
class Trainer:
    """One training run. ``module`` is the model (clipped, checkpointed; FSDP-sharded in place or
    plain); ``model`` is what the loss runs through (``module`` itself, or it wrapped by
    :func:`gpt.parallel.wrap`)."""

    module: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: Loader
    loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, int]]  # (model, batch) -> (loss, tokens)
    schedule: Callable[[int], float]  # 0-based step -> learning rate
    evaluate: Callable[[int], dict[str, Any]]  # step -> metrics; rank 0 only (every rank if sharded)
    plan: Plan
    device: torch.device
    amp: torch.dtype | None = None  # autocast dtype (None = fp32)
    dd: Dist = field(default_factory=Dist)
    score: Callable[[dict[str, Any]], tuple] = lower_val_loss
    on_best: Callable[[int, dict[str, Any]], None] | None = None  # rank 0, after a better evaluation
    checkpointer: Checkpointer | None = None
    checkpoint_tensors: Callable[[], dict[str, dict[str, torch.Tensor]]] | None = None  # saved beside
    callbacks: Callbacks | Any = field(default_factory=Callbacks)  # or any object with some of its hooks
    metrics: MetricsLog | None = None  # rank 0 only
    flops_per_token: float = 0.0
    # The loader's cursor counts global samples and the stage keeps the global batch (by changing
    # grad_accum), so a checkpoint written at another world size may be resumed.
    elastic: bool = False
    state: TrainState = field(default_factory=TrainState)
    _last_ckpt: int = field(default=-1, init=False, repr=False)  # step of the newest checkpoint

    def restore(self, ckpt: TrainingCheckpoint) -> dict[str, dict[str, torch.Tensor]]:
        """Continue from ``ckpt``: weights, optimizer, loader, counters and this rank's RNG state.
        Returns the checkpoint's extra tensors (``checkpoint_tensors`` at save time).

        At another world size (``elastic`` only) rank r keeps saved rank r's RNG state when there was
        one and gets a fresh seed otherwise: dropout masks then differ from the original run's."""
        st = ckpt.trainer_state
        rngs, dd = st["rng"], self.dd
        if len(rngs) != dd.world_size and not self.elastic:
            raise ValueError(
                f"{ckpt.path} was written by {len(rngs)} rank(s), this run has {dd.world_size}; "
                "resume with the same --nproc_per_node"
            )
        try:
            load_full_state(self.module, self.optimizer, ckpt.model_state, ckpt.optimizer_state)
        except ValueError as e:
            raise ValueError(f"{ckpt.path} {e}") from e
        self.loader.load_state_dict(st["loader"])
        self.state.load_state_dict(st)
        set_rng_state(rngs[min(dd.rank, len(rngs) - 1)])
        if dd.rank >= len(rngs):  # a rank the checkpoint did not have: its own dropout stream
            torch.manual_seed(self.state.step * 1_000_003 + dd.rank)
        self._last_ckpt = self.state.step
        log.info("resumed from %s at step %d (written by %d rank(s))", ckpt.path, self.state.step, len(rngs))
        return ckpt.extra

    def fit(self) -> FitResult:
        plan, st = self.plan, self.state
        start, self._t_begin = st.step, time.perf_counter() - st.elapsed_s
        result = FitResult("max_steps", 0.0, 0, 0.0)
        bar = tqdm(
            total=plan.max_steps,
            initial=start,
            desc=plan.desc,
            unit="step",
            disable=not self.dd.master or not sys.stderr.isatty(),
            dynamic_ncols=True,
            leave=False,
        )
        self._reset_window()
        while st.step < plan.max_steps:
            t0 = time.perf_counter()
            loss, norm, tokens, out_of_time, lr = self._train_step()
            st.step += 1
            st.losses.append(loss)
            dt = time.perf_counter() - t0
            if self.model is not self.module and st.step == start + 1 and _compiled(self.model):
                result.compile_time_s = dt  # the first step compiles; keep it out of the throughput
                self._reset_window()
            else:
                result.train_time_s += dt
                result.train_tokens += tokens
                self._window_steps += 1
                self._window_tokens += tokens
            bar.update(1)
            if st.step % plan.log_interval == 0 and self.dd.master:
                self._log_step(bar, loss, lr, norm)
            reason = self._after_step(out_of_time)
            if reason:
                result.stopped_reason = reason
                break
        bar.close()
        st.elapsed_s = time.perf_counter() - self._t_begin
        if st.step == start:  # a resumed run that was already complete: evaluate and save its state
            if self._evaluates and (not st.evals or st.evals[-1]["step"] != st.step):
                self._evaluate()
            if self._last_ckpt != st.step and plan.checkpoint_at_end:
                self._checkpoint()
        return result

    def _train_step(self) -> tuple[float, float, int, bool, float]:
        plan, dd = self.plan, self.dd
        lr = self.schedule(self.state.step)
        set_lr(self.optimizer, lr)
        loss_sum, tokens = torch.zeros((), device=self.device), 0
        for micro in range(plan.grad_accum):
            batch = self.loader.next_batch()
            # Gradients are all-reduced only on the last micro-batch of a step.
            sync = not dd.enabled or micro == plan.grad_accum - 1
            with contextlib.nullcontext() if sync else no_sync(self.model):
                with autocast(self.device, self.amp):
                    loss, n = self.loss_fn(self.model, batch)
                (loss / plan.grad_accum).backward()
            loss_sum += loss.detach()
            tokens += n * dd.world_size
        max_norm = plan.grad_clip if plan.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a sharded model's norm is a DTensor (already reduced)
            grad_norm = grad_norm.full_tensor()
        # One small all-reduce: the mean loss for the log, and rank 0's time-budget verdict for all.
        out_of_time = plan.max_time > 0 and time.perf_counter() - self._t_begin >= plan.max_time
        packet = torch.stack(
            [loss_sum / plan.grad_accum, torch.tensor(float(out_of_time), device=self.device)]
        )
        if dd.enabled:
            packet[1] *= float(dd.master)
            dist.all_reduce(packet)
            packet[0] /= dd.world_size
        loss_value, norm_value = packet[0].item(), float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self._diverged(loss_value, norm_value)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value, tokens, bool(packet[1].item()), lr

    def _diverged(self, loss: float, norm: float) -> None:
        step = self.state.step + 1
        good = latest_checkpoint(self.checkpointer.run_dir) if self.checkpointer else None
        if self.metrics:
            self.metrics.write({"step": step, "loss": loss, "grad_norm": norm, "diverged": True})
        raise TrainingDiverged(
            f"loss={loss} grad_norm={norm} at step {step}: training stopped before applying that "
            f"update. Last good checkpoint: {good or 'none'}. Lower --lr, keep --grad-clip on, or try "
            "--precision fp32, then resume with --resume"
        )

    def _after_step(self, out_of_time: bool) -> str | None:
        """Evaluate, checkpoint and decide whether to stop; every rank returns the same verdict."""
        plan, st, dd = self.plan, self.state, self.dd
        due_eval = bool(plan.eval_interval) and st.step % plan.eval_interval == 0
        last = st.step == plan.max_steps or out_of_time
        reason = "max_time" if out_of_time else None
        if due_eval or last:
            early = False
            if self._evaluates:
                self._evaluate()
                early = bool(plan.patience) and st.bad_evals >= plan.patience
            if dd.enabled:  # the other ranks wait while rank 0 evaluates, then learn its verdict
                flag = torch.tensor([float(early)], device=self.device)
                dist.broadcast(flag, 0)
                early = bool(flag.item())
            if early:
                reason, last = "early_stopping", True
        due_ckpt = bool(plan.checkpoint_interval) and st.step % plan.checkpoint_interval == 0
        if self.checkpointer and (due_ckpt and not last or last and plan.checkpoint_at_end):
            self._checkpoint()
        if due_eval or last or self._last_ckpt == st.step:
            self._reset_window()  # keep eval/checkpoint time out of tokens/s
        if reason:
            log.info("stopping at step %d: %s", st.step, reason)
        return reason

    @property
    def _evaluates(self) -> bool:
        """Rank 0 evaluates; every rank does when the model is sharded (its forward is collective)."""
        return self.dd.master or is_sharded(self.module)

    def _evaluate(self) -> None:
        """On rank 0 (and, for a sharded model, on every rank: same numbers, same bookkeeping, so
        ``on_best`` runs everywhere and may gather the weights); only rank 0 logs."""
        st = self.state
        metrics = self.evaluate(st.step)
        record = {"step": st.step, **metrics}
        st.evals.append(record)
        if self.metrics:
            self.metrics.write(record)
        improved = not st.best or self.score(metrics) > self.score(st.best)
        if improved:
            st.best, st.bad_evals = dict(record), 0
            if self.on_best:
                self.on_best(st.step, metrics)
        else:
            st.bad_evals += 1
        if not self.dd.master:
            return
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        log.info("step %d/%d: %s%s", st.step, self.plan.max_steps, shown, " (best)" if improved else "")
        _call(self.callbacks, "on_eval", st.step, metrics)

    def _checkpoint(self) -> None:
        st = self.state
        st.elapsed_s = time.perf_counter() - self._t_begin
        trainer_state = {
            **st.state_dict(),
            "loader": self.loader.state_dict(),
            "lr": self.schedule(st.step),
            "grad_accum": self.plan.grad_accum,  # with world_size and the loader's batch: the global batch
        }
        last_val = st.evals[-1] if st.evals and st.evals[-1]["step"] == st.step else {}
        extra = self.checkpoint_tensors() if self.checkpoint_tensors else None
        meta = {k: v for k, v in last_val.items() if k != "step" and isinstance(v, int | float)}
        path = self.checkpointer.save(st.step, self.module, self.optimizer, trainer_state, extra, **meta)
        self._last_ckpt = st.step
        if self.dd.master:
            _call(self.callbacks, "on_checkpoint", st.step, path)

    def _log_step(self, bar: tqdm, loss: float, lr: float, norm: float) -> None:
        elapsed = time.perf_counter() - self._window_t
        tok_s = self._window_tokens / elapsed if self._window_steps and elapsed > 0 else 0.0
        metrics = {
            "loss": loss,
            "lr": lr,
            "grad_norm": norm,
            "tokens_per_s": tok_s,
            "flops_per_s": tok_s * self.flops_per_token,
            "elapsed_s": time.perf_counter() - self._t_begin,
        }
        if self.metrics:
            self.metrics.write({"step": self.state.step, **metrics})
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        if bar.disable and self.plan.log_interval > 1:
            log.info(
                "step %d/%d: loss %.4f, lr %.2e, %.0f tok/s",
                self.state.step,
                self.plan.max_steps,
                loss,
                lr,
                tok_s,
            )
        _call(self.callbacks, "on_step", self.state.step, metrics)
        self._reset_window()

    def _reset_window(self) -> None:
        self._window_t, self._window_steps, self._window_tokens = time.perf_counter(), 0, 0


def _call(callbacks: Any, name: str, *args: Any) -> None:
    """Callbacks may be any object with some of the hooks (a Callbacks subclass or not)."""
    hook = getattr(callbacks, name, None)
    if hook is not None:
        hook(*args)


def _compiled(model: torch.nn.Module) -> bool:
    return hasattr(getattr(model, "module", model), "_orig_mod")
