"""Writing token shards: a corpus cut into partitions, each tokenized on its own, then one manifest.

``plan_shards`` cuts the corpus (``gpt.corpora.plan_partitions``) and names a work directory keyed by
the corpus, tokenizer and config; ``shard_partition`` streams one partition into its own shard files
there (any process, any machine that sees the directory; a finished partition is never redone);
``finish_shards`` links the partitions' files into the output in partition order under global names
(``train_000000.bin``, ...) and writes the manifest last, in one directory rename. The result depends
only on the corpus, the tokenizer and the config, not on how many workers ran the partitions.
``shard_corpus`` does all three, on a local process pool. Orchestrators (``flows/shard.py``) map
``shard_partition`` over their own workers.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpt.bundle import EOS_ID, TOKENIZER_FILE
from gpt.config import ConfigBase, _in_range, _positive, _whole
from gpt.io import atomic_dir, atomic_path, atomic_write_json, read_json, sha256_file, write_manifest
from gpt.tokenizer import Tokenizer

if TYPE_CHECKING:
    from gpt.corpora import Corpus, Partition

log = logging.getLogger(__name__)

FORMAT = "gptflow-shards-v1"
SPLITS = ("train", "val", "test")
SUMMARY = "summary.json"  # a partition's done-marker, written last inside it
# Fields that say how the work was run, not what it computes: not part of the output's identity.
EXECUTION_FIELDS = ("num_proc", "batch_size")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class ShardConfig(ConfigBase):
    """How a corpus is split, tokenized and cut into shards."""

    shard_tokens: int = 2**24  # tokens per shard file (each partition's last shard of a split may be shorter)
    val_fraction: float = 0.05  # fraction of documents in the val split (by content hash)
    test_fraction: float = 0.05  # fraction of documents held out as test (not sharded)
    split_salt: str = ""  # salt for the content hash that assigns splits (change to re-draw them)
    partition_mb: float = 8.0  # input MB per partition (the unit of parallel work and of resume)
    num_proc: int = 0  # worker processes, each tokenizing one partition at a time (0 = one per core)
    batch_size: int = 1000  # documents per encode batch

    def __post_init__(self) -> None:
        _positive(self, "shard_tokens", "batch_size", "partition_mb")
        for name in ("shard_tokens", "batch_size"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"ShardConfig.{name}={getattr(self, name)!r} must be an integer")
        _whole(self, "num_proc")
        _in_range(self, "val_fraction", 0.0, 1.0)
        _in_range(self, "test_fraction", 0.0, 1.0)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"ShardConfig: val_fraction + test_fraction = {self.val_fraction + self.test_fraction} "
                "must be < 1 so that some documents are left for training"
            )

    @property
    def workers(self) -> int:
        return self.num_proc or os.cpu_count() or 1

    def output_fields(self) -> dict[str, Any]:
        """The fields that decide the shards' bytes (the manifest records these)."""
        return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}


class _ShardWriter:
    """Appends tokens of one split to fixed-size shard files, each written atomically when full."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.out_dir, self.split, self.shard_tokens, self.dtype = out_dir, split, shard_tokens, dtype
        self.shards: list[dict[str, Any]] = []
        self._buf = np.empty(shard_tokens, dtype=dtype)  # pages are touched only as tokens arrive
        self._fill = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            n = min(len(ids), self.shard_tokens - self._fill)
            self._buf[self._fill : self._fill + n] = ids[:n]
            self._fill += n
            ids = ids[n:]
            if self._fill == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if self._fill == 0:
            return
        name = f"{self.split}_{len(self.shards):06d}.bin"
        data = self._buf[: self._fill].astype(self.dtype.newbyteorder("<"), copy=False)
        with atomic_path(self.out_dir / name) as tmp:
            data.tofile(tmp)
        self.shards.append(
            {
                "file": name,
                "n_tokens": int(self._fill),
                "bytes": int(data.nbytes),
                "sha256": sha256_file(self.out_dir / name),
            }
        )
        self._fill = 0

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        return self.shards


# --------------------------------------------------------------------------------------------------
# The plan


@dataclass
class ShardPlan:
    """What ``finish_shards`` needs: the partitions, where they are written, and with what."""

    corpus: str
    partitions: list[Partition]
    work_dir: Path
    tokenizer: str
    tokenizer_hash: str
    config: ShardConfig
    started: float = field(default_factory=time.time)


def plan_shards(
    corpus: str, tokenizer_path: str | Path, out_dir: str | Path, config: ShardConfig
) -> ShardPlan:
    """Partitions of ``corpus`` and the work directory ``.<out>.partial-<key>`` beside ``out_dir``.

    The key hashes the partitions (with the size and mtime of what each reads), the tokenizer and the
    config, so a rerun after a crash finds the partitions it finished, and a changed input starts afresh.
    """
    from gpt.corpora import plan_partitions

    parts = plan_partitions(str(corpus), int(config.partition_mb * 1e6))  # a bad corpus fails first
    tok = Tokenizer(tokenizer_path)
    blob = json.dumps(
        {
            "format": FORMAT,
            "partitions": [(p.corpus, p.describe(), p.stamp, p.options) for p in parts],
            "tokenizer": tok.hash,
            "config": config.output_fields(),
        },
        sort_keys=True,
        default=str,
    )
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    out = Path(out_dir).resolve()
    work = out.parent / f".{out.name}.partial-{key}"
    return ShardPlan(str(corpus), parts, work, str(tok.path.resolve()), tok.hash, config)


# --------------------------------------------------------------------------------------------------
# One partition


def _part_dir(work_dir: Path, index: int) -> Path:
    return Path(work_dir) / f"part-{index:05d}"


def _finished(part: Partition, done: Path, tokenizer_hash: str) -> dict[str, Any] | None:
    """The summary of an earlier run of this very partition, if it finished and its files are whole."""
    path = done / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = read_json(path, "partition summary")
    except ValueError:
        return None
    same = summary.get("partition") == part.describe() and summary.get("stamp") == part.stamp
    if not same or summary.get("tokenizer") != tokenizer_hash:
        return None
    for split in ("train", "val"):
        for shard in summary["splits"][split]["shards"]:
            f = done / shard["file"]
            if not f.is_file() or f.stat().st_size != shard["bytes"]:
                return None
    return summary


def shard_partition(
    part: Partition,
    tokenizer_path: str | Path,
    work_dir: str | Path,
    config: ShardConfig,
    corpus: Corpus | None = None,
) -> dict[str, Any]:
    """Tokenize one partition into ``work_dir/part-NNNNN/`` and return its summary.

    Streams: documents are encoded ``batch_size`` at a time and appended to per-split shard files, so
    memory stays bounded by a batch and one shard buffer per split. The directory appears (rename)
    only when complete, with ``summary.json`` inside; a partition already finished is returned as is.
    ``corpus`` replaces the partition's reader (an in-memory ``Corpus`` is one partition).
    """
    from gpt.corpora import load_partition, split_of

    work_dir = Path(work_dir)
    done = _part_dir(work_dir, part.index)
    tokenizer = Tokenizer(tokenizer_path)
    if (summary := _finished(part, done, tokenizer.hash)) is not None:
        log.info("partition %d of %s: already finished, kept", part.index, part.corpus)
        return summary
    t0 = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    docs = corpus if corpus is not None else load_partition(part)
    tmp = work_dir / f".part-{part.index:05d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writers = {s: _ShardWriter(tmp, s, config.shard_tokens, dtype) for s in ("train", "val")}
        sizes = {s: {"n_docs": 0, "n_tokens": 0, "n_bytes": 0} for s in SPLITS}
        pending: dict[str, list[str]] = {"train": [], "val": []}

        def flush(split: str) -> None:
            if pending[split]:
                ids = np.concatenate(tokenizer.encode_arrays(pending[split], add_eos=True))
                sizes[split]["n_tokens"] += len(ids)
                writers[split].write(ids.astype(dtype, copy=False))
                pending[split] = []

        for doc in docs:
            split = split_of(doc.text, config.val_fraction, config.test_fraction, config.split_salt)
            sizes[split]["n_docs"] += 1
            sizes[split]["n_bytes"] += len(doc.text.encode("utf-8"))
            if split != "test":
                pending[split].append(doc.text)
                if len(pending[split]) >= config.batch_size:
                    flush(split)
        flush("train")
        flush("val")
        splits = {s: {**sizes[s], "shards": writers[s].close() if s != "test" else []} for s in SPLITS}
        splits["test"]["n_tokens"] = None  # held out: not tokenized here
        summary = {
            "partition": part.describe(),
            "stamp": part.stamp,
            "tokenizer": tokenizer.hash,
            "corpus_stats": dict(docs.stats),
            "splits": splits,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        atomic_write_json(tmp / SUMMARY, summary)
        shutil.rmtree(done, ignore_errors=True)  # a stale attempt (other stamp) of this partition
        os.replace(tmp, done)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "partition %d of %s: %d documents, %d tokens in %.1fs",
        part.index,
        part.corpus,
        sum(s["n_docs"] for s in sizes.values()),
        sizes["train"]["n_tokens"] + sizes["val"]["n_tokens"],
        summary["seconds"],
    )
    return summary


# --------------------------------------------------------------------------------------------------
# The manifest


def _link(src: Path, dst: Path) -> None:
    """Hard-link (no second copy on disk); copy where the filesystem cannot link."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def finish_shards(
    plan: ShardPlan, summaries: list[dict[str, Any]], out_dir: str | Path, seconds: float | None = None
) -> dict[str, Any]:
    """Combine the partitions' shards, in partition order, into ``out_dir`` with its manifest.

    Shards get global names (``train_000000.bin``, ``train_000001.bin``, ... across partitions), so
    loaders see the same layout as ever. ``out_dir`` is replaced in one rename; the work directory
    (and any stale one beside it) is removed afterwards.
    """
    by_index = {s["partition"]["index"]: s for s in summaries}
    missing = [p.index for p in plan.partitions if p.index not in by_index]
    if missing:
        raise ValueError(f"partitions {missing} of {plan.corpus!r} have no summary; run them first")
    ordered = [by_index[p.index] for p in plan.partitions]
    sizes = {s: {k: sum(o["splits"][s][k] for o in ordered) for k in ("n_docs", "n_bytes")} for s in SPLITS}
    for s in ("train", "val"):
        sizes[s]["n_tokens"] = sum(o["splits"][s]["n_tokens"] for o in ordered)
    stats = {
        k: sum(o["corpus_stats"].get(k, 0) for o in ordered)
        for k in ("n_docs", "n_duplicates", "n_empty", "n_decode_errors")
    }
    if stats["n_docs"] == 0:
        raise ValueError(
            f"corpus {plan.corpus!r} has no documents; check the --corpus name or path "
            "(empty files and blank lines are skipped)"
        )
    if sizes["train"]["n_tokens"] == 0:
        raise ValueError(
            f"no training tokens: all {sizes['val']['n_docs'] + sizes['test']['n_docs']} documents fell in "
            "val/test; use a larger corpus or lower --val-fraction/--test-fraction"
        )
    out = Path(out_dir)
    shards: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    partitions = []
    with atomic_dir(out) as tmp:
        for part, summary in zip(plan.partitions, ordered, strict=True):
            src = _part_dir(plan.work_dir, part.index)
            entry = {**part.describe(), "n_docs": {s: summary["splits"][s]["n_docs"] for s in SPLITS}}
            for split in ("train", "val"):
                first = len(shards[split])
                for shard in summary["splits"][split]["shards"]:
                    name = f"{split}_{len(shards[split]):06d}.bin"
                    _link(src / shard["file"], tmp / name)
                    shards[split].append({**shard, "file": name})
                entry[f"{split}_shards"] = [first, len(shards[split])]
            partitions.append(entry)
        shutil.copyfile(plan.tokenizer, tmp / TOKENIZER_FILE)
        tokenized = sizes["train"]["n_bytes"] + sizes["val"]["n_bytes"]
        seconds = time.time() - plan.started if seconds is None else seconds
        tok = Tokenizer(tmp / TOKENIZER_FILE)
        manifest = dict(
            stage="shard",
            format=FORMAT,
            dtype=token_dtype(tok.vocab_size).name,
            eos_id=EOS_ID,
            tokenizer={"file": TOKENIZER_FILE, "sha256": tok.hash, "vocab_size": tok.vocab_size},
            source=plan.corpus,
            corpus_stats=stats,
            config=plan.config.output_fields(),
            splits={s: {**sizes[s], "shards": shards[s]} for s in SPLITS},
            partitions=partitions,
            # The only fields that vary between runs of the same inputs: timings.
            metrics={
                "seconds": round(seconds, 3),
                "mb_per_s": round(tokenized / 1e6 / max(seconds, 1e-9), 3),
                "n_bytes": sum(s["n_bytes"] for s in sizes.values()),
                "n_bytes_tokenized": tokenized,
            },
        )
        manifest["splits"]["test"]["n_tokens"] = None
        write_manifest(tmp, **manifest)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(plan.work_dir, ignore_errors=True)
    log.info(
        "sharded %s in %d partitions: train %d docs / %d tokens, val %d docs / %d tokens, "
        "test %d docs held out (%.1fs)",
        plan.corpus,
        len(partitions),
        sizes["train"]["n_docs"],
        sizes["train"]["n_tokens"],
        sizes["val"]["n_docs"],
        sizes["val"]["n_tokens"],
        sizes["test"]["n_docs"],
        seconds,
    )
    return manifest


# --------------------------------------------------------------------------------------------------
# All of it, on a local process pool


def _process_pool(workers: int) -> ProcessPoolExecutor:
    import multiprocessing

    # spawn: workers start clean (no inherited threads or locks from the caller), import gpt only.
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def map_partitions(fn, parts: list, workers: int, *args: Any) -> list:
    """``[fn(part, *args) for part in parts]``, on ``workers`` processes when there is more than one."""
    workers = min(workers, len(parts))
    if workers <= 1:
        return [fn(p, *args) for p in parts]
    results: dict[int, Any] = {}
    with _process_pool(workers) as pool:
        futures = {pool.submit(fn, p, *args): i for i, p in enumerate(parts)}
        try:
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return [results[i] for i in range(len(parts))]


def shard_corpus(
    corpus: Corpus | str, tokenizer_path: str | Path, out_dir: str | Path, config: ShardConfig
) -> dict[str, Any]:
    """Split, tokenize and shard ``corpus`` into ``out_dir``; return the manifest (written last).

    A corpus name or path is planned into partitions run on ``config.num_proc`` processes; after a
    crash, a rerun keeps the partitions that finished. A ``Corpus`` object (in memory, not picklable)
    is one partition, run here. Either way a failed run leaves the previous ``out_dir`` as it was.
    """
    from gpt.corpora import Partition

    t0 = time.perf_counter()
    if isinstance(corpus, str | Path):
        plan = plan_shards(str(corpus), tokenizer_path, out_dir, config)
        summaries = map_partitions(
            shard_partition, plan.partitions, config.workers, plan.tokenizer, plan.work_dir, config
        )
        return finish_shards(plan, summaries, out_dir, time.perf_counter() - t0)
    tok = Tokenizer(tokenizer_path)
    out = Path(out_dir).resolve()
    part = Partition(corpus.name, 0)
    plan = ShardPlan(
        corpus.name, [part], out.parent / f".{out.name}.work-{os.getpid()}", str(tok.path), tok.hash, config
    )
    try:
        summary = shard_partition(part, tok.path, plan.work_dir, config, corpus=corpus)
        return finish_shards(plan, [summary], out_dir, time.perf_counter() - t0)
    finally:
        shutil.rmtree(plan.work_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The tokenizer's training sample, from the same partitions


def _sample_key(text: str, seed: int) -> int:
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    )


def sample_partition(
    part: Partition,
    max_bytes: int,
    seed: int,
    split: str | None = "train",
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> list[tuple[int, int, int, str]]:
    """Candidates of one partition for the tokenizer sample: ``(key, partition, position, text)``.

    A document's key is a seeded hash of its text; the sample is the documents with the smallest
    keys whose bytes reach ``max_bytes`` (0: all of them). This partition keeps only its own smallest
    keys up to ``max_bytes``, which always contains its share of the corpus-wide sample, so memory is
    bounded and the result does not depend on how the corpus was partitioned or on worker count.
    """
    from gpt.corpora import load_partition, split_of

    heap: list[tuple[int, int, int, str]] = []  # (-key, -position, bytes, text): largest key on top
    total = 0
    for pos, doc in enumerate(load_partition(part)):
        if split is not None and split_of(doc.text, val_fraction, test_fraction) != split:
            continue
        n = len(doc.text.encode("utf-8"))
        if max_bytes == 0:
            heap.append((0, -pos, n, doc.text))
            continue
        heapq.heappush(heap, (-_sample_key(doc.text, seed), -pos, n, doc.text))
        total += n
        while total - heap[0][2] >= max_bytes:  # the rest still reach max_bytes without the top
            total -= heapq.heappop(heap)[2]
    return [(-k, part.index, -p, text) for k, p, _, text in heap]


def merge_samples(candidates: list[list[tuple[int, int, int, str]]], max_bytes: int) -> list[str]:
    """The corpus-wide sample from the partitions' candidates, in corpus order."""
    pool = sorted(c for cands in candidates for c in cands)  # by key, then (partition, position)
    if max_bytes:
        chosen, total = [], 0
        for c in pool:
            if total >= max_bytes:
                break
            chosen.append(c)
            total += len(c[3].encode("utf-8"))
        pool = chosen
    return [c[3] for c in sorted(pool, key=lambda c: (c[1], c[2]))]


def training_sample(
    corpus: str,
    max_bytes: int,
    seed: int = 0,
    split: str | None = "train",
    workers: int = 1,
    partition_mb: float = ShardConfig.partition_mb,
) -> list[str]:
    """A seeded sample of ``corpus``'s documents (of ``split``, ``None`` for all) up to ``max_bytes``
    for training the tokenizer, drawn partition by partition on ``workers`` processes. A corpus
    smaller than ``max_bytes`` is returned whole, in order."""
    from gpt.corpora import plan_partitions

    parts = plan_partitions(corpus, int(partition_mb * 1e6))
    return merge_samples(map_partitions(sample_partition, parts, workers, max_bytes, seed, split), max_bytes)
