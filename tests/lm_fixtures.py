"""Shared test helpers (one definition, not copies): a small random LM checkpoint for the runtime,
scheduler and interop tests, incremental decoding for the KV-cache parity tests, and the kill
of a training process for the resume tests."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import torch

from gpt.checkpoint import save_model
from gpt.config import ModelConfig
from gpt.model import GPT
from gpt.tokenizer import Tokenizer, TokenizerConfig

TEXT = "The quick brown fox jumps over the lazy dog. Markets rose as investors cheered the news.\n" * 40


def random_lm_checkpoint(root: Path, seed: int, **model_overrides) -> Path:
    """``root/ckpt``: a tiny GPT over a 300-piece tokenizer, weights scaled up 6x so that greedy
    output does not repeat one token. Its vocabulary is the tokenizer's pieces: our runtime never
    samples ids past them, other engines do not know that."""
    tok = Tokenizer.train([TEXT], root / "tok", TokenizerConfig(vocab_size=300))
    torch.manual_seed(seed)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, **model_overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(6.0)
    save_model(root / "ckpt", model, tokenizer_hash=tok.hash)
    shutil.copyfile(tok.path, root / "ckpt" / "tokenizer.model")
    return root / "ckpt"


def decode_stepwise(model: GPT, x: torch.Tensor, prefill: int) -> tuple[torch.Tensor, list]:
    """Logits for all of ``x`` from a KV-cache prefill of ``prefill`` tokens, then one token per step
    (to compare with ``model(x)``), and the final cache."""
    logits, past = model.decode(x[:, :prefill])
    steps = [logits]
    for t in range(prefill, x.size(1)):
        logits, past = model.decode(x[:, t : t + 1], past)
        steps.append(logits)
    return torch.cat(steps, dim=1), past


def sigkill_after(proc: subprocess.Popen, ready: Path, what: str) -> float:
    """SIGKILL ``proc`` and every process it started (torchrun's ranks run in sessions of their own,
    so a launcher's process group is not enough) at a random moment (0-0.1 s) after ``ready``
    appears; returns the delay. Fails if ``ready`` never appears or the process finished first."""
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert ready.exists(), f"the run never wrote its {what}"
    delay = random.Random(os.getpid()).uniform(0.0, 0.1)
    time.sleep(delay)
    with contextlib.suppress(psutil.NoSuchProcess):
        victims = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.send_signal(signal.SIGKILL)
        psutil.wait_procs(victims[:-1], timeout=30)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run finished before the kill (delay {delay:.3f}s)"
    return delay
