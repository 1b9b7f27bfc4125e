"""Sharding throughput and peak memory: BBC News, and a large corpus built by repeating it.

Each sharding run happens in its own child process so that its peak RSS (ru_maxrss, including its
datasets.map workers) is measured alone. Prints one JSON object.

    python benchmarks/shard_throughput.py                   # BBC + a 200 MB corpus
    python benchmarks/shard_throughput.py --large-mb 20     # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
from gpt.data import ShardConfig, shard_corpus
corpus, tokenizer, out, num_proc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = time.perf_counter()
manifest = shard_corpus(corpus, tokenizer, out, ShardConfig(num_proc=num_proc))
seconds = time.perf_counter() - t0
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
splits = manifest["splits"]
print(json.dumps({
    "seconds": seconds,
    "n_bytes": sum(s["n_bytes"] for s in splits.values()),
    "n_docs": sum(s["n_docs"] for s in splits.values()),
    "n_tokens": splits["train"]["n_tokens"] + splits["val"]["n_tokens"],
    "peak_rss_mb": max(self_kb, child_kb) / 1024,
}))
"""


def build_large_corpus(path: Path, target_mb: float) -> dict:
    """JSONL of BBC articles repeated until ``target_mb``; each copy tagged so deduplication keeps it."""
    from gpt.corpora import load_corpus

    articles = [d.text for d in load_corpus("bbc")]
    written, copies = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_mb * 1e6:
            for text in articles:
                line = json.dumps({"text": f"[copy {copies}] {text}"}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
            copies += 1
    return {"file_mb": round(written / 1e6, 1), "copies": copies}


def shard_in_child(corpus: str, tokenizer: Path, out: Path, num_proc: int) -> dict:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, corpus, str(tokenizer), str(out), str(num_proc)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sharding {corpus} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["mb_per_s"] = round(r["n_bytes"] / 1e6 / r["seconds"], 2)
    r["tokens_per_s"] = round(r["n_tokens"] / r["seconds"])
    r["seconds"] = round(r["seconds"], 2)
    r["peak_rss_mb"] = round(r["peak_rss_mb"], 1)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large-mb", type=float, default=200.0, help="size of the repeated corpus (MB)")
    parser.add_argument("--num-proc", type=int, default=1, help="datasets.map worker processes")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument(
        "--rss-limit-mb", type=float, default=1536.0, help="peak RSS the large run must stay under"
    )
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from gpt.corpora import load_corpus
    from gpt.tokenizer import Tokenizer, TokenizerConfig

    with tempfile.TemporaryDirectory(prefix="shard-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        Tokenizer.train(
            (d.text for d in load_corpus("bbc")), tmp / "tok", TokenizerConfig(vocab_size=args.vocab_size)
        )
        tokenizer_seconds = time.perf_counter() - t0
        bbc = shard_in_child("bbc", tmp / "tok", tmp / "bbc", args.num_proc)
        large_path = tmp / "large.jsonl"
        built = build_large_corpus(large_path, args.large_mb)
        large = shard_in_child(str(large_path), tmp / "tok", tmp / "large", args.num_proc)
        large.update(built)
    print(
        json.dumps(
            {
                "benchmark": "shard_throughput",
                "num_proc": args.num_proc,
                "vocab_size": args.vocab_size,
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "tokenizer_train_seconds_bbc": round(tokenizer_seconds, 2),
                "bbc": bbc,
                "large": large,
                "large_peak_rss_under_limit": large["peak_rss_mb"] < args.rss_limit_mb,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
