"""The language-model scorer: loss, perplexity and bits per byte, over token shards or over texts.

Bits per byte (the one definition; every other place that reports it points here):

    bpb = Σ nats over the counted targets / ln 2 / Σ UTF-8 bytes of those targets

where a target is counted when its token has at least one UTF-8 byte. Special tokens (EOS, BOS,
pad, unk) have 0 bytes (``Tokenizer.token_byte_lengths``), so they are left out of both sums, as
nanochat's ``evaluate_bpb`` does: a document boundary costs no bits and adds no bytes. The measure
does not depend on the tokenizer, so models with different vocabularies compare on the same bytes.

``val_loss`` / ``loss`` and perplexity are per token, over every real target (EOS included): the
quantity the model is trained to minimise, comparable with the training loss.

Texts are scored each on its own, after EOS (the token before every document in the pretraining
shards, see gpt.data): a text longer than the context is read in consecutive windows, every token
predicted once. ``deploy/runtime.py`` (``OnnxLM.bits_per_byte``) is its numpy mirror.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gpt.checkpoint import unwrap
from gpt.data import IGNORE_INDEX, ShardDataset, val_batches
from gpt.device import autocast
from gpt.tokenizer import EOS_ID


class _Sums:
    """Running sums over scored targets, on the model's device (no sync per batch)."""

    def __init__(self, token_bytes: np.ndarray, device: torch.device):
        self.bytes_of = torch.as_tensor(np.asarray(token_bytes), dtype=torch.int64, device=device)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.nats, self.counted_nats = zero.clone(), zero.clone()
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.bytes = self.tokens.clone()

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """logits (B, T, V); targets (B, T), IGNORE_INDEX where nothing is predicted."""
        y = targets.reshape(-1)
        nll = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), y, ignore_index=IGNORE_INDEX, reduction="none"
        ).double()  # (B*T,), 0 where ignored
        real = y != IGNORE_INDEX
        nbytes = torch.where(real, self.bytes_of[y.clamp(min=0)], 0)
        self.nats += nll.sum()
        self.counted_nats += nll[nbytes > 0].sum()
        self.tokens += real.sum()
        self.bytes += nbytes.sum()


def _score(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_bytes: np.ndarray,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    where: str,
) -> dict[str, float]:
    """loss, ppl (per real target), bpb (NaN when no target has a byte), tokens and bytes over (x, y) batches."""
    was_training = model.training
    model.eval()
    sums = _Sums(token_bytes, device)
    try:
        for x, y in batches:
            with autocast(device, autocast_dtype):
                logits = model(x)  # (B, T, vocab)
            sums.add(logits, y)
    finally:
        model.train(was_training)
    tokens, nbytes = int(sums.tokens.item()), int(sums.bytes.item())
    if tokens == 0:
        raise ValueError(f"evaluation saw no target tokens in {where}")
    loss = sums.nats.item() / tokens
    return {
        "loss": loss,
        "bpb": sums.counted_nats.item() / math.log(2) / nbytes if nbytes else math.nan,
        "ppl": math.exp(min(loss, 700.0)),
        "tokens": tokens,
        "bytes": nbytes,
    }


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    dataset: ShardDataset,
    block_size: int,
    batch_size: int,
    token_bytes: np.ndarray,
    device: str | torch.device,
    max_batches: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Loss, bits per byte and perplexity over a shard split (or its first ``max_batches`` batches).

    Returns val_loss and val_ppl (per token, every real target), val_bpb (module docstring),
    val_tokens (real targets) and val_bytes (their UTF-8 bytes).
    """
    device = torch.device(device)
    batches = val_batches(dataset, block_size, batch_size, device=device, max_batches=max_batches)
    where = f"the {dataset.split} split of {dataset.shard_dir}"
    m = _score(unwrap(model), batches, token_bytes, device, autocast_dtype, where)
    return {f"val_{k}": m[k] for k in ("loss", "bpb", "ppl", "tokens", "bytes")}


def _pass_length(config, length: int) -> int:
    """Tokens per pass of ``copy_probe``: ``length``, at most what the context (EOS + two passes) and
    the non-special vocabulary hold."""
    return min(length, (config.block_size - 1) // 2, config.vocab_size - EOS_ID - 1)


def copy_probe_fits(model: torch.nn.Module, length: int = 48) -> bool:
    """Whether ``copy_probe`` can run on ``model``: passes of 2+ tokens (block_size >= 5)."""
    return _pass_length(unwrap(model).config, length) >= 2


@torch.no_grad()
def copy_probe(model: torch.nn.Module, rows: int = 16, length: int = 48, seed: int = 0) -> dict[str, float]:
    """In-context copying: loss on random tokens, then on the same tokens repeated right after them.

    Each row is EOS, ``length`` distinct random non-special tokens, then those tokens again. A model that can
    copy from its context (induction heads, Olsson et al. 2022) predicts the repeat almost for free;
    one that cannot scores both halves alike. Returns ``first`` and ``repeat`` (mean nats per token;
    the repeat's first token is left out, nothing announces it) and ``gain`` = first - repeat.
    Completion tasks that mostly reuse their input's words (headlines, extraction) need the gain.
    """
    model = unwrap(model)
    cfg = model.config
    L = _pass_length(cfg, length)
    if L < 2:
        raise ValueError(
            f"copy_probe needs block_size >= 5 and 2+ ordinary tokens (block_size {cfg.block_size}, "
            f"vocab_size {cfg.vocab_size})"
        )
    gen = torch.Generator().manual_seed(seed)
    # Distinct tokens within a row, so that what to copy after each token is unambiguous.
    ordinary = cfg.vocab_size - EOS_ID - 1
    first = torch.stack([torch.randperm(ordinary, generator=gen)[:L] for _ in range(rows)]) + EOS_ID + 1
    seq = torch.cat([torch.full((rows, 1), EOS_ID), first, first], dim=1).to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        logits = model(seq[:, :-1])
    finally:
        model.train(was_training)
    nll = F.cross_entropy(logits.float().transpose(1, 2), seq[:, 1:], reduction="none")  # (rows, 2L)
    out = {"first": float(nll[:, :L].mean()), "repeat": float(nll[:, L + 1 :].mean())}
    return {**out, "gain": out["first"] - out["repeat"]}


def text_windows(ids: Sequence[int], context: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows of ``ids`` that predict every token after the first once."""
    out = []
    for s in range(0, len(ids) - 1, context):
        y = list(ids[s + 1 : s + context + 1])
        out.append((list(ids[s : s + len(y)]), y))
    return out


@torch.no_grad()
def score_texts(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 16,
    max_tokens: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Bits per byte, loss and perplexity of ``texts``, each scored on its own after EOS.

    ``max_tokens`` stops after the text that reaches that many tokens (whole texts only). Empty
    texts are skipped. Returns bpb, loss, ppl, n_tokens, n_bytes and n_texts.
    torch/numpy mirror: deploy/runtime.py's ``OnnxLM.bits_per_byte`` and ``logprobs``.
    """
    model = unwrap(model)
    device = next(model.parameters()).device
    windows: list[tuple[list[int], list[int]]] = []
    n_texts = n_ids = 0
    for text in texts:
        ids = tokenizer.encode(text)
        if not ids:
            continue
        windows += text_windows([EOS_ID, *ids], model.config.block_size)
        n_texts += 1
        n_ids += len(ids)
        if max_tokens is not None and n_ids >= max_tokens:
            break
    if not windows:
        raise ValueError(f"score_texts: no text to score among {len(texts)} texts (all empty?)")
    windows.sort(key=lambda w: len(w[0]))  # similar lengths per batch: little padding

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pad = model.config.pad_token_id
        for start in range(0, len(windows), batch_size):
            rows = windows[start : start + batch_size]
            T = max(len(x) for x, _ in rows)
            # Right padding: causal attention keeps it out of every real position.
            x = [w + [pad] * (T - len(w)) for w, _ in rows]
            y = [t + [IGNORE_INDEX] * (T - len(t)) for _, t in rows]
            yield torch.tensor(x, device=device), torch.tensor(y, device=device)

    m = _score(model, batches(), tokenizer.token_byte_lengths(), device, autocast_dtype, f"{n_texts} texts")
    return {
        "bpb": m["bpb"],
        "loss": m["loss"],
        "ppl": m["ppl"],
        "n_tokens": m["tokens"],
        "n_bytes": m["bytes"],
        "n_texts": n_texts,
    }
