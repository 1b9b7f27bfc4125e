"""Partitioned sharding: record-aligned partitions, worker-count independence, resume after SIGKILL,
no corpus copy, and the tokenizer's sample drawn from the same partitions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt.corpora import load_corpus, load_partition, plan_partitions
from gpt.data import ShardConfig, ShardDataset, shard_corpus
from gpt.sharding import plan_shards, training_sample
from gpt.tokenizer import Tokenizer, TokenizerConfig

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = ("seconds", "mb_per_s")  # the only manifest fields that may differ between runs


def _texts(n: int = 300) -> list[str]:
    rng = np.random.default_rng(0)
    words = ["market", "shares", "goal", "team", "film", "vote", "chip", "rain", "crédit", "新闻", "🙂"]
    return [" ".join(rng.choice(words, size=int(rng.integers(5, 60)))) + f" {i}" for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(_texts()):
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
            if i % 50 == 0:
                f.write("\n")  # blank lines are skipped, wherever a cut lands
    return path


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok")
    return Tokenizer.train(_texts(), out, TokenizerConfig(vocab_size=400, num_threads=1))


CFG = dict(partition_mb=0.012, shard_tokens=1000, val_fraction=0.1)  # ~6 partitions, several shards each


def _tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _without_timings(manifest: dict) -> dict:
    return {**manifest, "metrics": {k: v for k, v in manifest["metrics"].items() if k not in TIMINGS}}


def _docs(parts) -> list[str]:
    return [d.text for p in parts for d in load_partition(p)]


@pytest.mark.parametrize(
    ("name", "body", "options"),
    [
        ("lines.txt", "".join(f"line {i} {'x' * (i % 37)}\r\n" for i in range(400)), {"sample_by": "line"}),
        ("paras.txt", "".join(f"para {i}\nsecond line {i}\n\n\n" for i in range(300)), {}),
    ],
)
def test_byte_ranges_read_every_record_exactly_once(tmp_path, name, body, options):
    path = tmp_path / name
    path.write_bytes(body.encode())
    parts = plan_partitions(str(path), 500, **options)
    assert len(parts) > 5 and parts[0].unit == "bytes"
    assert [p.start for p in parts[1:]] == [p.stop for p in parts[:-1]]  # contiguous, no gap
    assert _docs(parts) == [d.text for d in load_corpus(str(path), **options)]


def test_jsonl_directory_and_parquet_partitions_cover_the_corpus(tmp_path, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = plan_partitions(str(corpus), 2000)
    assert len(parts) > 5 and _docs(parts) == [d.text for d in load_corpus(str(corpus))]
    texts = _texts(120)
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet", row_group_size=10)
    parts = plan_partitions(str(tmp_path / "t.parquet"), 500)
    assert len(parts) > 3 and parts[0].unit == "row-groups" and _docs(parts) == texts
    for i, t in enumerate(texts[:30]):
        (tmp_path / "dir" / f"t{i % 3}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "dir" / f"t{i % 3}" / f"{i:03d}.txt").write_text(t)
    parts = plan_partitions(str(tmp_path / "dir"), 600)
    assert len(parts) > 3 and _docs(parts) == [d.text for d in load_corpus(str(tmp_path / "dir"))]


def test_shards_and_manifest_are_identical_whatever_the_number_of_workers(tok, corpus, tmp_path):
    one = shard_corpus(str(corpus), tok.path, tmp_path / "one", ShardConfig(**CFG, num_proc=1))
    two = shard_corpus(str(corpus), tok.path, tmp_path / "two", ShardConfig(**CFG, num_proc=2))
    assert len(one["partitions"]) > 3 and len(one["splits"]["train"]["shards"]) > len(one["partitions"])
    a, b = _tree(tmp_path / "one"), _tree(tmp_path / "two")
    manifests = json.loads(a.pop("manifest.json")), json.loads(b.pop("manifest.json"))
    assert a == b  # every shard file and the tokenizer, byte for byte
    assert _without_timings(manifests[0]) == _without_timings(manifests[1]) == _without_timings(one)
    assert _without_timings(one) == _without_timings(two)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # work dirs removed


def test_partitioning_changes_where_shards_end_but_not_the_token_stream(tok, corpus, tmp_path):
    many = shard_corpus(str(corpus), tok.path, tmp_path / "many", ShardConfig(**CFG, num_proc=1))
    whole = shard_corpus(
        str(corpus), tok.path, tmp_path / "whole", ShardConfig(**{**CFG, "partition_mb": 100}, num_proc=1)
    )
    assert len(whole["partitions"]) == 1 < len(many["partitions"])
    for split in ("train", "val"):
        a, b = ShardDataset(tmp_path / "many", split), ShardDataset(tmp_path / "whole", split)
        np.testing.assert_array_equal(a.window(0, len(a)), b.window(0, len(b)))
        assert many["splits"][split]["n_docs"] == whole["splits"][split]["n_docs"]
    assert many["metrics"]["n_bytes_tokenized"] == sum(many["splits"][s]["n_bytes"] for s in ("train", "val"))


KILLER = r"""
import os, signal, sys
import gpt.sharding as sh
from gpt.data import ShardConfig
corpus, tok, out, cfg = sys.argv[1], sys.argv[2], sys.argv[3], ShardConfig.from_dict(eval(sys.argv[4]))
run = sh.shard_partition
def dying(part, *args, **kw):
    summary = run(part, *args, **kw)
    if part.index == 2:  # three partitions finished: the process dies as if the machine went away
        os.kill(os.getpid(), signal.SIGKILL)
    return summary
sh.shard_partition = dying
sh.shard_corpus(corpus, tok, out, cfg)
"""


def test_sharding_killed_midway_resumes_without_redoing_finished_partitions(
    tok, corpus, tmp_path, monkeypatch
):
    cfg = ShardConfig(**CFG, num_proc=1)
    reference = shard_corpus(str(corpus), tok.path, tmp_path / "reference", cfg)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(corpus), str(tok.path), str(out), repr(cfg.to_dict())],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()  # nothing that looks like an output
    work = plan_shards(str(corpus), tok.path, out, cfg).work_dir
    finished = sorted(p.name for p in work.iterdir() if (p / "summary.json").is_file())
    assert finished == ["part-00000", "part-00001", "part-00002"]

    import gpt.corpora as corpora

    seen, encoded = [], []
    real_load, real_encode = corpora.load_partition, Tokenizer.encode_arrays
    monkeypatch.setattr(corpora, "load_partition", lambda part: seen.append(part.index) or real_load(part))
    monkeypatch.setattr(
        Tokenizer,
        "encode_arrays",
        lambda self, t, add_eos=False: encoded.append(len(t)) or real_encode(self, t, add_eos),
    )
    resumed = shard_corpus(str(corpus), tok.path, out, cfg)
    assert seen == list(range(3, len(reference["partitions"])))  # the finished ones were not even read
    assert 0 < sum(encoded) < sum(reference["splits"][s]["n_docs"] for s in ("train", "val"))
    a, b = _tree(tmp_path / "reference"), _tree(out)
    assert _without_timings(json.loads(a.pop("manifest.json"))) == _without_timings(
        json.loads(b.pop("manifest.json"))
    )
    assert a == b and _without_timings(resumed) == _without_timings(reference)
    assert not work.exists()  # finished: the work dir is gone


def test_a_changed_input_is_not_resumed_from_the_old_partitions(tok, corpus, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(corpus.read_bytes())
    cfg = ShardConfig(**CFG, num_proc=1)
    before = plan_shards(str(path), tok.path, tmp_path / "out", cfg)
    with open(path, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    after = plan_shards(str(path), tok.path, tmp_path / "out", cfg)
    assert before.work_dir != after.work_dir


def test_disk_used_while_sharding_stays_near_the_output_size(tok, corpus, tmp_path, monkeypatch):
    """No copy of the corpus (the old arrow scratch dir) or of the shards is made along the way."""
    from gpt.sharding import _ShardWriter

    peak = [0]
    flush = _ShardWriter._flush

    def measuring(self):
        flush(self)
        peak[0] = max(peak[0], sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()))

    monkeypatch.setattr(_ShardWriter, "_flush", measuring)
    shard_corpus(str(corpus), tok.path, tmp_path / "out", ShardConfig(**CFG, num_proc=1))
    out = sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    assert 0 < peak[0] <= out


def test_bad_partition_size_and_unknown_corpus_are_clear_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="partition_mb"):
        ShardConfig(partition_mb=0)
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        shard_corpus("nope", tok.path, tmp_path / "x", ShardConfig())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl: line at byte 17 is not valid JSON"):
        shard_corpus(str(bad), tok.path, tmp_path / "x", ShardConfig())


def test_tokenizer_sample_is_the_same_whatever_the_partitioning_and_workers(corpus):
    small = training_sample(str(corpus), 3000, seed=1, workers=1, partition_mb=0.002)
    assert small == training_sample(str(corpus), 3000, seed=1, workers=2, partition_mb=0.004)
    assert small == training_sample(str(corpus), 3000, seed=1, workers=1, partition_mb=100)
    sizes = [len(t.encode()) for t in small]
    assert sum(sizes) - max(sizes) < 3000 <= sum(sizes)  # bounded: stops at the doc that reaches it
    assert small != training_sample(str(corpus), 3000, seed=2, workers=1, partition_mb=0.002)
    train = [d.text for d in load_corpus(str(corpus)).documents("train")]
    assert set(small) < set(train)
    # A corpus under the bound is used whole, in its order: the tokenizer it trains is unchanged.
    assert training_sample(str(corpus), 10**9, seed=1, workers=2, partition_mb=0.002) == train
