"""Flow: train the sentencepiece tokenizer on a corpus's train split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import mlflow
from prefect import flow
from pydantic import Field

from flows.caching import is_complete
from flows.common import quiet_defaults, run_stage, stage_task
from flows.tracking import configure, flat_params, numeric, stage_run
from gpt.corpora import load_corpus
from gpt.io import read_manifest
from gpt.tokenizer import Tokenizer, TokenizerConfig


@stage_task("tokenizer", retries=1)
def tokenizer_task(corpus: str, config: dict, out_dir: str, parent_run_id: str | None = None) -> dict:
    cfg = TokenizerConfig.from_dict(config)
    out = Path(out_dir)
    with stage_run("tokenizer", parent_run_id, {"corpus": corpus, **flat_params(tokenizer=cfg)}):
        if not is_complete(out):
            texts = (doc.text for doc in load_corpus(corpus).documents("train"))
            Tokenizer.train(texts, out, cfg, source=corpus)
        manifest = read_manifest(out)
        mlflow.log_metrics(numeric(manifest.get("metrics", manifest.get("stats", {}))))
        mlflow.log_artifact(str(out / "tokenizer.model"), artifact_path="tokenizer")
    tok = Tokenizer(out / "tokenizer.model")
    return {
        "dir": str(out),
        "model": str(out / "tokenizer.model"),
        "hash": tok.hash,
        "vocab_size": tok.vocab_size,
    }


@flow(name="tokenizer", log_prints=True)
def tokenizer_flow(
    corpus: str = "bbc",
    vocab_size: Annotated[int, Field(ge=261, le=1_000_000)] = 4096,
    model_type: Literal["bpe", "unigram"] = "bpe",
    workdir: str = "artifacts",
    mlruns: str = "mlruns",
) -> dict:
    """Train a sentencepiece tokenizer (byte fallback: every UTF-8 string round-trips)."""
    quiet_defaults()
    configure(mlruns)
    cfg = TokenizerConfig(vocab_size=vocab_size, model_type=model_type)
    return run_stage(tokenizer_task, corpus=corpus, config=cfg.to_dict(), workdir=workdir)
