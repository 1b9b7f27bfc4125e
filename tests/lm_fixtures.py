"""Shared test helpers (one definition, not copies): a small random LM checkpoint for the runtime,
scheduler and interop tests, and incremental decoding for the KV-cache parity tests."""

from __future__ import annotations

import shutil
from pathlib import Path

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
