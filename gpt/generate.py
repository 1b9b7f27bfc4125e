"""Sampling from a GPT in PyTorch with the KV cache: greedy, temperature, top-k, top-p, stop ids."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpt.model import GPT


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (B, V) logits outside the top-k set and outside the smallest top-p nucleus with -inf."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token id (B,) from last-position logits (B, V)."""
    if cfg.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    prompt_ids: Sequence[int] | torch.Tensor,
    cfg: SamplingConfig | None = None,
    **overrides,
) -> list[int]:
    """Continue one prompt; returns only the new token ids (a stop id ends generation and is dropped).

    The context is cropped to the last ``block_size`` tokens. When the cache fills the window, the
    cache is rebuilt from the last ``block_size - 1`` tokens (positions restart), as a sliding window.
    """
    cfg = dataclasses.replace(cfg, **overrides) if cfg is not None else SamplingConfig(**overrides)
    device = next(model.parameters()).device
    ids = torch.as_tensor(
        list(prompt_ids) if not torch.is_tensor(prompt_ids) else prompt_ids, dtype=torch.long
    )
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError("prompt_ids must be a non-empty 1-D sequence of token ids")
    block = model.config.block_size
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    context = ids[-block:].tolist()
    out: list[int] = []
    past = None
    pending = context  # tokens not yet in the cache
    try:
        for _ in range(cfg.max_new_tokens):
            cached = 0 if past is None else past[0][0].size(2)
            if cached + len(pending) > block:  # window full: re-prefill the most recent tokens
                pending = context[-(block - 1) :]
                past = None
            x = torch.tensor([pending], dtype=torch.long, device=device)
            logits, past = model.decode(x, past)
            nxt = int(sample_next(logits[:, -1, :], cfg, generator)[0])
            if nxt in cfg.stop_token_ids:
                break
            out.append(nxt)
            context.append(nxt)
            pending = [nxt]
    finally:
        model.train(was_training)
    return out
