"""Generation in PyTorch: the one KV-cache decode loop, batched and left-padded, that evaluation,
export's parity checks and the benchmarks use. Greedy, temperature, top-k, top-p and stop ids.

A batch is left-padded: row r's real tokens are the last columns of the cache (its mask is 1 there)
and its positions count its own tokens from 0, so each row gets the tokens it would get alone.
torch/numpy mirror of ``deploy/runtime.py``'s ``DecodeBatch`` (the torch-free loop that serves).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpt.bundle import repeated_ngram_bans
from gpt.model import GPT, KVCache


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    no_repeat_ngram_size: int = 0  # never repeat an n-gram of the output (gpt.bundle.repeated_ngram_bans)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size={self.no_repeat_ngram_size} must be >= 0 (0 = off)")


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


def _ban_repeats(logits: torch.Tensor, outputs: list[list[int]], n: int) -> torch.Tensor:
    """``logits`` (B, V) with -inf where row b's next token would repeat an n-gram of ``outputs[b]``."""
    if n <= 0:
        return logits
    banned = [(b, t) for b, out in enumerate(outputs) for t in repeated_ngram_bans(out, n)]
    if not banned:
        return logits
    rows, cols = zip(*banned, strict=True)
    logits = logits.clone()
    logits[list(rows), list(cols)] = float("-inf")
    return logits


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) with every prompt ending at column T - 1, and the 0/1 mask of real tokens."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for r, p in enumerate(prompts):
        if len(p):
            ids[r, T - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[r, T - len(p) :] = 1
    return ids, mask


class KVBatch:
    """Sequences that decode together through ``GPT.decode``: one left-padded batch and its KV cache.

    ``prefill`` reads the prompts, ``step`` feeds one token per row, ``keep`` lets rows leave and
    ``extend`` lets a freshly prefilled batch join. A batch without padding calls the model without
    a mask or positions (the fused causal kernel, as for a single prompt); the explicit inputs of the
    last call are in ``inputs``, for another engine that must be fed the same (export's parity check).
    """

    def __init__(self, model: GPT):
        self.model = model
        self.device = next(model.parameters()).device
        self.inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # ids, mask, positions
        self._empty()

    def _empty(self) -> None:
        self.past: KVCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (B, S): 1 on real tokens
        self.last_pos = torch.zeros((0, 1), dtype=torch.long, device=self.device)  # (B, 1)

    @property
    def size(self) -> int:
        return self.mask.size(0)

    def cached(self) -> list[int]:
        """Real tokens in the cache, per row."""
        return self.mask.sum(dim=1).tolist()

    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Read non-empty prompts into an empty batch; logits (B, T, V), T the longest prompt."""
        if self.past is not None:
            raise ValueError("prefill starts a batch; use extend to add rows to a running one")
        ids, mask = left_pad(prompts, self.model.config.pad_token_id)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): each row's first real token is position 0
        return self._decode(ids, mask.to(self.device), pos)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); logits (B, 1, V)."""
        B = tokens.size(0)
        mask = torch.cat([self.mask, torch.ones((B, 1), dtype=torch.long, device=self.device)], dim=1)
        return self._decode(tokens.view(B, 1), mask, self.last_pos + 1)

    def _decode(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ids, pos = ids.to(self.device), pos.to(self.device)
        padded = not bool(mask.all())
        logits, self.past = self.model.decode(
            ids, self.past, mask if padded else None, pos if padded else None
        )
        self.mask, self.last_pos, self.inputs = mask, pos[:, -1:], (ids, mask, pos)
        return logits

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (batch indices, in this order), and the cache columns they use."""
        if list(rows) == list(range(self.size)):
            return
        if not rows:
            self._empty()
            return
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        mask = self.mask[idx]
        lead = int(mask.any(dim=0).long().argmax())  # columns before it only departed rows used
        self.mask, self.last_pos = mask[:, lead:], self.last_pos[idx]
        self.past = [(k[idx, :, lead:], v[idx, :, lead:]) for k, v in self.past]

    def extend(self, other: KVBatch) -> None:
        """Append ``other``'s rows after this batch's; the shorter cache is left-padded to match."""
        if not other.size:
            return
        if not self.size:
            self.past, self.mask, self.last_pos = other.past, other.mask, other.last_pos
            return
        S = max(self.mask.size(1), other.mask.size(1))

        def pad(t: torch.Tensor) -> torch.Tensor:  # left-pad dim 2 (cache) or dim 1 (mask) to S
            dim = 2 if t.dim() == 4 else 1
            shape = list(t.shape)
            shape[dim] = S - t.size(dim)
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        self.mask = torch.cat([pad(self.mask), pad(other.mask)])
        self.last_pos = torch.cat([self.last_pos, other.last_pos])
        self.past = [
            (torch.cat([pad(k), pad(k2)]), torch.cat([pad(v), pad(v2)]))
            for (k, v), (k2, v2) in zip(self.past, other.past, strict=True)
        ]


@torch.no_grad()
def generate_batch(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig | None = None,
    **overrides,
) -> list[list[int]]:
    """Continue each prompt; returns only the new token ids per prompt (a stop id ends a row, dropped).

    A prompt is cropped to its last ``block_size`` tokens. When a row's cache fills the window, the
    row re-reads its last ``block_size - 1`` tokens (positions restart), as a sliding window. A
    seeded batch draws its samples from one generator: the same batch gives the same tokens.
    """
    cfg = dataclasses.replace(cfg, **overrides) if cfg is not None else SamplingConfig(**overrides)
    contexts = [list(map(int, p.tolist() if torch.is_tensor(p) else p)) for p in prompts]
    if not contexts or any(not c for c in contexts):
        raise ValueError("prompt_ids must be a non-empty 1-D sequence of token ids")
    block = model.config.block_size
    contexts = [c[-block:] for c in contexts]
    out: list[list[int]] = [[] for _ in contexts]
    if cfg.max_new_tokens == 0:
        return out
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    stops = set(cfg.stop_token_ids)
    was_training = model.training
    model.eval()
    try:
        batch = KVBatch(model)
        logits = batch.prefill(contexts)[:, -1]
        live = list(range(len(contexts)))  # the prompt each batch row continues
        for n in range(1, cfg.max_new_tokens + 1):
            going = []
            logits = _ban_repeats(logits, [out[i] for i in live], cfg.no_repeat_ngram_size)
            for r, token in enumerate(sample_next(logits, cfg, generator).tolist()):
                if token not in stops:
                    out[live[r]].append(token)
                    contexts[live[r]].append(token)
                    going.append(r)
            batch.keep(going)
            live = [live[r] for r in going]
            if not live or n == cfg.max_new_tokens:
                break
            full = [r for r, c in enumerate(batch.cached()) if c == block]
            stay = [r for r in range(len(live)) if r not in full]
            batch.keep(stay)  # rows that fill the window leave, and re-read their recent tokens
            parts = []
            if stay:
                last = torch.tensor([contexts[live[r]][-1] for r in stay], device=batch.device)
                parts.append(batch.step(last)[:, -1])
            if full:
                slid = KVBatch(model)
                parts.append(slid.prefill([contexts[live[r]][-(block - 1) :] for r in full])[:, -1])
                batch.extend(slid)
            live = [live[r] for r in stay] + [live[r] for r in full]
            logits = torch.cat(parts)
    finally:
        model.train(was_training)
    return out


def generate(
    model: GPT,
    prompt_ids: Sequence[int] | torch.Tensor,
    cfg: SamplingConfig | None = None,
    **overrides,
) -> list[int]:
    """Continue one prompt (see ``generate_batch``); returns only the new token ids."""
    ids = prompt_ids.tolist() if torch.is_tensor(prompt_ids) else list(prompt_ids)
    if any(isinstance(i, list | tuple) for i in ids):
        raise ValueError("prompt_ids must be a non-empty 1-D sequence of token ids")
    return generate_batch(model, [ids], cfg, **overrides)[0]
