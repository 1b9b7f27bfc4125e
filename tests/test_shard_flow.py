"""The shard stage as mapped Prefect tasks: a Dask cluster and the local process pool write the same
shards and manifest, byte for byte, as the library run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt.data import ShardConfig, shard_corpus
from gpt.tokenizer import Tokenizer, TokenizerConfig

pytestmark = pytest.mark.slow

TIMINGS = ("seconds", "mb_per_s")


def _tree(d: Path) -> tuple[dict, dict[str, bytes]]:
    files = {p.name: p.read_bytes() for p in sorted(d.iterdir())}
    manifest = json.loads(files.pop("manifest.json"))
    manifest["metrics"] = {k: v for k, v in manifest["metrics"].items() if k not in TIMINGS}
    return manifest, files


def test_dask_local_cluster_and_process_pool_write_identical_shards(tmp_path):
    from distributed import LocalCluster
    from prefect import flow

    from flows.shard import shard_on_runner

    texts = [f"document {i}: " + " ".join(f"w{(i * j) % 97}" for j in range(40)) for i in range(400)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = Tokenizer.train(texts, tmp_path / "tok", TokenizerConfig(vocab_size=300, num_threads=1))
    cfg = ShardConfig(partition_mb=0.02, shard_tokens=2000, num_proc=2)

    @flow
    def run(out: str, address: str | None = None) -> dict:
        return shard_on_runner(str(corpus), str(tok.path), out, cfg, address)

    library = shard_corpus(
        str(corpus), tok.path, tmp_path / "library", ShardConfig(**{**cfg.to_dict(), "num_proc": 1})
    )
    assert len(library["partitions"]) >= 4
    run(str(tmp_path / "pool"))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        run(str(tmp_path / "dask"), cluster.scheduler_address)
    reference = _tree(tmp_path / "library")
    assert _tree(tmp_path / "pool") == reference
    assert _tree(tmp_path / "dask") == reference


def test_a_dask_address_that_is_not_one_is_a_clear_error():
    from flows.shard import task_runner

    with pytest.raises(ValueError, match="not a Dask scheduler address; use tcp://HOST:PORT"):
        task_runner("localhost:8786")
