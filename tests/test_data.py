"""Sharding and loading: token totals, integrity checks, deterministic and disjoint sampling, exact eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpt.corpora import Corpus, Document, load_corpus, split_of
from gpt.data import (
    IGNORE_INDEX,
    ShardConfig,
    ShardDataset,
    TrainLoader,
    shard_corpus,
    token_dtype,
    val_batches,
)
from gpt.io import read_manifest
from gpt.tokenizer import EOS_ID, Tokenizer, TokenizerConfig

SHARD_TOKENS = 200_000  # small, so the BBC train split spans several shards


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok")
    return Tokenizer.train((d.text for d in load_corpus("bbc")), out, TokenizerConfig(vocab_size=2000))


@pytest.fixture(scope="module")
def bbc_shards(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    manifest = shard_corpus("bbc", tok.path, out, ShardConfig(shard_tokens=SHARD_TOKENS))
    return out, manifest


def _corpus(texts: list[str], name: str = "synthetic") -> Corpus:
    return Corpus(name, lambda decode: (Document(t) for t in texts))


def test_manifest_token_totals_equal_document_tokens_plus_one_eos_each(tok, bbc_shards):
    _, manifest = bbc_shards
    cfg = ShardConfig()
    for split in ("train", "val"):
        texts = [
            d.text
            for d in load_corpus("bbc")
            if split_of(d.text, cfg.val_fraction, cfg.test_fraction) == split
        ]
        expected = sum(len(ids) + 1 for ids in tok.encode_batch(texts))
        info = manifest["splits"][split]
        assert info["n_tokens"] == expected == sum(s["n_tokens"] for s in info["shards"])
        assert info["n_docs"] == len(texts)
        assert info["n_bytes"] == sum(len(t.encode("utf-8")) for t in texts)


def test_shards_hold_the_documents_in_order_separated_by_eos(tok, bbc_shards):
    out, _ = bbc_shards
    ds = ShardDataset(out, "val")
    tokens = ds.window(0, ds.num_tokens)
    assert tokens[-1] == EOS_ID
    docs = np.split(tokens, np.flatnonzero(tokens == EOS_ID) + 1)[:-1]
    texts = [d.text for d in load_corpus("bbc").documents("val")]
    assert [tok.decode(d[:-1]) for d in docs] == texts


def test_test_split_is_counted_but_not_sharded(bbc_shards):
    out, manifest = bbc_shards
    test = manifest["splits"]["test"]
    assert test["n_docs"] > 50 and test["shards"] == [] and test["n_tokens"] is None
    assert not list(out.glob("test_*.bin"))
    total = sum(manifest["splits"][s]["n_docs"] for s in ("train", "val", "test"))
    assert total == 2127  # every unique BBC article, once
    with pytest.raises(ValueError, match="held out"):
        ShardDataset(out, "test")


def test_manifest_records_dtype_tokenizer_source_and_shard_sizes(tok, bbc_shards):
    out, manifest = bbc_shards
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["sha256"] == tok.hash
    assert manifest["source"] == "bbc" and manifest["config"]["shard_tokens"] == SHARD_TOKENS
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) >= 3
    assert all(s["n_tokens"] == SHARD_TOKENS for s in shards[:-1])
    assert all((out / s["file"]).stat().st_size == 2 * s["n_tokens"] for s in shards)
    assert Tokenizer(out).hash == tok.hash  # the tokenizer travels with the shards
    assert read_manifest(out) == manifest


def test_vocab_above_65536_uses_uint32():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_window_reads_across_shard_boundaries(bbc_shards):
    out, manifest = bbc_shards
    ds = ShardDataset(out, "train")
    files = [np.fromfile(out / s["file"], dtype="<u2") for s in manifest["splits"]["train"]["shards"]]
    full = np.concatenate(files)
    assert ds.num_tokens == len(full)
    for start in (0, SHARD_TOKENS - 10, 2 * SHARD_TOKENS - 1, ds.num_tokens - 50):
        np.testing.assert_array_equal(ds.window(start, 50), full[start : start + 50])
    with pytest.raises(IndexError):
        ds.window(ds.num_tokens - 10, 11)


def _copy_shards(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_changed_shard_fails_checksum_on_load(bbc_shards, tmp_path):
    out = _copy_shards(bbc_shards[0], tmp_path / "s")
    path = out / "train_000001.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        ShardDataset(out, "train")
    ShardDataset(out, "val")  # other splits are unaffected


def test_truncated_shard_is_detected(bbc_shards, tmp_path):
    out = _copy_shards(bbc_shards[0], tmp_path / "s")
    path = out / "train_000000.bin"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="truncated"):
        ShardDataset(out, "train", verify=False)


def test_tokenizer_hash_mismatch_is_rejected_naming_both_hashes(tok, bbc_shards):
    out, _ = bbc_shards
    other = "0" * 64
    with pytest.raises(ValueError, match=f"tokenizer mismatch.*{tok.hash}.*{other}"):
        ShardDataset(out, "train", tokenizer_hash=other)
    assert ShardDataset(out, "train", tokenizer_hash=tok.hash, verify=False).num_tokens > 0


def test_directory_without_manifest_is_not_a_shard_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShardDataset(tmp_path)


def test_failed_reshard_leaves_previous_shards_and_manifest_intact(tok, bbc_shards, tmp_path):
    out = _copy_shards(bbc_shards[0], tmp_path / "s")  # a finished run is being redone
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(decode):
        yield from (Document(f"document number {i} " * 20) for i in range(500))
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        shard_corpus(Corpus("broken", broken), tok.path, out, ShardConfig(shard_tokens=1000))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the good output, byte for byte
    assert ShardDataset(out, "train").num_tokens > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temp siblings left behind


def test_reshard_of_a_bad_corpus_file_keeps_the_earlier_shards(tok, bbc_shards, tmp_path):
    out = _copy_shards(bbc_shards[0], tmp_path / "s")
    manifest = (out / "manifest.json").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text column here"}\n')
    with pytest.raises(ValueError, match="no 'text' column"):
        shard_corpus(str(bad), tok.path, out, ShardConfig())
    assert (out / "manifest.json").read_bytes() == manifest
    assert ShardDataset(out, "train").num_tokens > 0


def test_empty_corpus_is_a_clear_error(tok, tmp_path):
    with pytest.raises(ValueError, match="no documents"):
        shard_corpus(_corpus(["", "   "]), tok.path, tmp_path, ShardConfig())
    assert not (tmp_path / "manifest.json").exists()


def test_corpus_smaller_than_one_window_is_a_clear_error(tok, tmp_path):
    shard_corpus(
        _corpus(["a few words only"]), tok.path, tmp_path, ShardConfig(val_fraction=0, test_fraction=0)
    )
    ds = ShardDataset(tmp_path, "train")
    with pytest.raises(ValueError, match=r"fewer than one window of block_size\+1=65"):
        TrainLoader(ds, block_size=64, batch_size=2)


@pytest.mark.slow
def test_num_proc_does_not_change_the_shards(tok, bbc_shards, tmp_path):
    manifest = shard_corpus("bbc", tok.path, tmp_path, ShardConfig(shard_tokens=SHARD_TOKENS, num_proc=2))
    for split in ("train", "val"):
        a = [s["sha256"] for s in manifest["splits"][split]["shards"]]
        assert a == [s["sha256"] for s in bbc_shards[1]["splits"][split]["shards"]]


# ---------------------------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def train_ds(bbc_shards) -> ShardDataset:
    return ShardDataset(bbc_shards[0], "train")


def test_batch_targets_are_inputs_shifted_by_one(train_ds):
    loader = TrainLoader(train_ds, block_size=32, batch_size=4, seed=1)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    for row, start in zip(range(4), TrainLoader(train_ds, 32, 4, seed=1).sample_starts(0), strict=True):
        window = torch.from_numpy(train_ds.window(int(start), 33).astype(np.int64))
        assert torch.equal(x[row], window[:-1]) and torch.equal(y[row], window[1:])


def test_batches_are_a_function_of_seed_and_step(train_ds):
    a, b = TrainLoader(train_ds, 32, 4, seed=7), TrainLoader(train_ds, 32, 4, seed=7)
    for _ in range(3):
        assert all(torch.equal(u, v) for u, v in zip(a.next_batch(), b.next_batch(), strict=True))
    other = TrainLoader(train_ds, 32, 4, seed=8)
    assert not torch.equal(other.next_batch()[0], TrainLoader(train_ds, 32, 4, seed=7).next_batch()[0])


def test_resume_from_saved_state_continues_with_the_same_batches(train_ds):
    loader = TrainLoader(train_ds, 32, 4, seed=3)
    for _ in range(5):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [loader.next_batch() for _ in range(3)]
    resumed = TrainLoader(train_ds, 32, 4, seed=0)
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(expected, (resumed.next_batch() for _ in range(3)), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_loading_state_with_a_different_batch_size_is_rejected(train_ds):
    state = TrainLoader(train_ds, 32, 4).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        TrainLoader(train_ds, 32, 8).load_state_dict(state)


def test_ranks_draw_disjoint_windows(train_ds):
    ranks = [TrainLoader(train_ds, 64, 8, seed=5, rank=r, world_size=3) for r in range(3)]
    for step in range(20):
        starts = [set(r.sample_starts(step).tolist()) for r in ranks]
        assert not (starts[0] & starts[1]) and not (starts[0] & starts[2]) and not (starts[1] & starts[2])


def test_ranks_and_micro_batches_split_the_same_windows_per_optimizer_step(train_ds):
    # Optimizer step k with grad_accum A takes loader steps kA..kA+A-1 on every rank.
    def step_windows(world_size: int, accum: int, k: int) -> list[int]:
        ranks = [
            TrainLoader(train_ds, 32, 4, seed=2, rank=r, world_size=world_size) for r in range(world_size)
        ]
        return sorted(s for r in ranks for m in range(accum) for s in r.sample_starts(k * accum + m).tolist())

    for k in range(6):
        two_ranks = step_windows(2, 1, k)
        assert step_windows(1, 2, k) == two_ranks and step_windows(4, 1, k) == step_windows(2, 2, k)
        assert len(set(two_ranks)) == 8
    assert step_windows(2, 1, 0) != step_windows(2, 1, 1)


def test_loader_state_resumes_at_another_world_size_in_global_samples(train_ds):
    ranks = [TrainLoader(train_ds, 32, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        for r in ranks:
            r.next_batch()
    state = json.loads(json.dumps(ranks[0].state_dict()))
    assert state["samples"] == 3 * 4 * 2
    expected = [b for _ in range(2) for b in (ranks[0].next_batch(), ranks[1].next_batch())]
    old = {k: v for k, v in state.items() if k != "samples"}  # written before the cursor was global
    for saved in (state, old):
        single = TrainLoader(train_ds, 32, 4, seed=0)
        single.load_state_dict(saved)
        assert single.step == 6
        for (x, y), (x2, y2) in zip(expected, (single.next_batch() for _ in range(4)), strict=True):
            assert torch.equal(x, x2) and torch.equal(y, y2)
    three = TrainLoader(train_ds, 32, 4, seed=3, rank=0, world_size=3)
    three.next_batch()  # 12 samples: not a whole number of 2 x 4 batches
    with pytest.raises(ValueError, match="global sample 12.*world size that divides"):
        TrainLoader(train_ds, 32, 4, world_size=2).load_state_dict(three.state_dict())


def test_an_epoch_visits_every_window_once(tok, tmp_path):
    texts = [f"sentence {i} of a small corpus" for i in range(200)]
    shard_corpus(_corpus(texts), tok.path, tmp_path, ShardConfig(val_fraction=0, test_fraction=0))
    ds = ShardDataset(tmp_path)
    loader = TrainLoader(ds, block_size=16, batch_size=1)
    n = loader.n_windows
    starts = np.concatenate([loader.sample_starts(s) for s in range(n)])
    offset = starts[0] % 16
    assert sorted(starts.tolist()) == [offset + 16 * k for k in range(n)]
    assert n == (ds.num_tokens - 16) // 16


def test_val_batches_predict_every_token_exactly_once(bbc_shards):
    ds = ShardDataset(bbc_shards[0], "val")
    tokens = ds.window(0, ds.num_tokens).astype(np.int64)
    T = 100
    assert (ds.num_tokens - 1) % T != 0  # the last window is partial
    targets, inputs = [], []
    for x, y in val_batches(ds, block_size=T, batch_size=7):
        assert x.shape == y.shape and x.shape[1] == T
        keep = y != IGNORE_INDEX
        targets.append(y[keep])
        inputs.append(x[keep])
    np.testing.assert_array_equal(torch.cat(targets).numpy(), tokens[1:])
    np.testing.assert_array_equal(torch.cat(inputs).numpy(), tokens[:-1])


def test_val_batches_max_batches_stops_early(bbc_shards):
    ds = ShardDataset(bbc_shards[0], "val")
    assert len(list(val_batches(ds, 64, 4, max_batches=3))) == 3


def test_cli_trains_a_tokenizer_then_shards_with_it(tmp_path, capsys):
    from gptflow.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox {i % 7} jumps." for i in range(300)))
    tok_dir, shard_dir = tmp_path / "tok", tmp_path / "shards"
    assert main(["tokenizer", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(tok_dir)]) == 0
    assert main(["shard", "--corpus", str(corpus), "--tokenizer", str(tok_dir), "--out", str(shard_dir),
                 "--val-fraction", "0.1", "--shard-tokens", "1000"]) == 0  # fmt: skip
    manifest = read_manifest(shard_dir)
    assert manifest["tokenizer"]["sha256"] == Tokenizer(tok_dir).hash
    assert manifest["config"]["val_fraction"] == 0.1 and len(manifest["splits"]["train"]["shards"]) > 1
    assert main(["shard", "--corpus", "no-such-corpus", "--out", str(tmp_path / "x")]) == 2
    assert "unknown corpus 'no-such-corpus'" in capsys.readouterr().err
