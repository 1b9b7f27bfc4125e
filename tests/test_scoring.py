"""The LM scorer: special tokens cost no bits and add no bytes, and the torch scorer and the
torch-free runtime give the same bits per byte on the same texts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lm_fixtures import TEXT, random_lm_checkpoint

from deploy.runtime import load_bundle
from gpt.checkpoint import load_model
from gpt.export import ExportConfig, export_bundle
from gpt.scoring import copy_probe, copy_probe_fits, evaluate_lm, score_texts, text_windows
from gpt.tokenizer import EOS_ID, Tokenizer


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """(torch model, tokenizer, runtime) for one random tiny LM and its exported bundle."""
    root = tmp_path_factory.mktemp("scoring")
    ckpt = random_lm_checkpoint(root, seed=3)
    export_bundle(ckpt, root / "bundle", ExportConfig(greedy_tokens=0, parity_decode_steps=4))
    model, _ = load_model(ckpt)
    return model, Tokenizer(ckpt / "tokenizer.model"), load_bundle(root / "bundle")


class Stream:
    """The slice of gpt.data.ShardDataset that evaluate_lm reads, over an in-memory token array."""

    split, shard_dir = "val", "<memory>"

    def __init__(self, ids: list[int]):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.num_tokens = len(ids)

    def window(self, start: int, length: int) -> np.ndarray:
        return self.ids[start : start + length]


def test_eos_targets_count_in_the_loss_but_in_neither_sum_of_bits_per_byte(lm):
    model, tok, _ = lm
    docs = [tok.encode(t) for t in ("The quick brown fox.", "Markets rose as investors cheered.", "sea")]
    ids = [i for d in docs for i in (*d, EOS_ID)]
    assert len(ids) <= model.config.block_size
    got = evaluate_lm(model, Stream(ids), model.config.block_size, 2, tok.token_byte_lengths(), "cpu")
    # Direct: one pass over the whole stream (it fits the context), targets ids[1:].
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").double()
    text = torch.tensor(ids[1:]) != EOS_ID
    n_bytes = len(tok.decode(ids[1:]).encode("utf-8"))  # the targets' text; EOS decodes to nothing
    assert got["val_tokens"] == len(ids) - 1 and got["val_bytes"] == n_bytes
    assert got["val_loss"] == pytest.approx(float(nll.mean()), rel=1e-5)  # EOS included
    assert got["val_bpb"] == pytest.approx(float(nll[text].sum()) / math.log(2) / n_bytes, rel=1e-5)
    assert float(nll[~text].sum()) > 0.1  # the EOS losses left out were not negligible


def test_windows_predict_every_token_after_the_first_once():
    windows = text_windows(list(range(10)), 4)
    assert [x for x, _ in windows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert [t for _, y in windows for t in y] == list(range(1, 10))


def test_torch_scorer_and_onnx_runtime_agree_on_bits_per_byte(lm):
    model, tok, runtime = lm
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        TEXT[:700],  # ~200 tokens: several windows of the 64-token context
        "数据 😀 ok",  # not in the tokenizer's training text: byte-fallback pieces
        "",  # skipped by both
        "sea",
    ]
    assert len(tok.encode(TEXT[:700])) > 2 * model.config.block_size
    torch_bpb = score_texts(model, tok, texts, batch_size=3)["bpb"]
    numpy_bpb = runtime.bits_per_byte(texts)
    assert abs(torch_bpb - numpy_bpb) < 1e-4, (torch_bpb, numpy_bpb)
    # Per text too: the runtime's per-token log-probs are the torch scorer's, text by text.
    for text in (t for t in texts if t):
        one = score_texts(model, tok, [text])
        assert one["n_bytes"] == len(text.encode("utf-8"))
        assert -runtime.logprobs(text).sum() == pytest.approx(one["loss"] * one["n_tokens"], rel=1e-5)


class _ContextModel(torch.nn.Module):
    """A stand-in LM over a 512-token vocabulary whose logits come from a rule, not weights."""

    config = type("Config", (), {"vocab_size": 512, "block_size": 128})

    def __init__(self, copies: bool):
        super().__init__()
        self.copies = copies
        self.bigram = torch.nn.Parameter(
            3.0 * torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.bigram[idx].detach().clone()  # (B, T, V): the current token alone decides
        if self.copies:  # an induction oracle: what followed this token's last occurrence, at 50 nats
            logits.zero_()
            for b, row in enumerate(idx.tolist()):
                for t, tok in enumerate(row):
                    seen = [s for s in range(t) if row[s] == tok]
                    if seen:
                        logits[b, t, row[seen[-1] + 1]] = 50.0
        return logits


def test_copy_probe_scores_the_repeat_apart_from_the_first_pass():
    copier = _ContextModel(copies=True).train()
    oracle = copy_probe(copier, rows=4, length=40)
    assert copier.training  # the probe runs in eval mode and gives the model back as it was
    assert oracle["first"] > math.log(512) - 0.2  # nothing to copy yet: about uniform
    assert oracle["repeat"] < 1e-6  # the repeat's unannounced first token is left out
    assert oracle["gain"] == pytest.approx(oracle["first"] - oracle["repeat"])
    # A model that reads only the current token sees the same pairs twice: no gain.
    blind = copy_probe(_ContextModel(copies=False), rows=4, length=40)
    assert blind["first"] > 3.0 and abs(blind["gain"]) < 0.15 * blind["first"]


def test_copy_probe_names_a_context_too_short_for_a_repeat():
    model = _ContextModel(copies=False)
    assert copy_probe_fits(model)
    model.config = type("Config", (), {"vocab_size": 512, "block_size": 4})
    assert not copy_probe_fits(model)  # what evaluate asks before probing
    with pytest.raises(ValueError, match="block_size >= 5"):
        copy_probe(model)
