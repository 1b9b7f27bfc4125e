"""Flow: split, tokenize and shard a corpus with the trained tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import mlflow
from prefect import flow
from pydantic import Field

from flows.caching import is_complete, pin_corpus
from flows.common import quiet_defaults, run_stage, stage_task
from flows.tracking import configure, flat_params, numeric, stage_run
from gpt.data import ShardConfig, shard_corpus
from gpt.io import MANIFEST, read_manifest
from gpt.tokenizer import MODEL_FILE


@stage_task("shard", retries=1)
def shard_task(
    corpus: str, tokenizer: str, config: dict, out_dir: str, parent_run_id: str | None = None
) -> dict:
    cfg = ShardConfig.from_dict(config)
    out = Path(out_dir)
    with stage_run("shard", parent_run_id, {"corpus": corpus, **flat_params(shard=cfg)}):
        if not is_complete(out):
            shard_corpus(corpus, tokenizer, out, cfg)
        manifest = read_manifest(out)
        mlflow.log_metrics(numeric(manifest.get("splits", {})))
        mlflow.log_artifact(str(out / MANIFEST), artifact_path="shards")
    return {"dir": str(out), "splits": manifest.get("splits", {})}


@flow(name="shard", log_prints=True)
def shard_flow(
    tokenizer: str,
    corpus: str = "bbc",
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.05,
    test_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.05,
    workdir: str = "artifacts",
    mlruns: str = "mlruns",
) -> dict:
    """Split a corpus into train/val/test documents and tokenize train/val into uint16/uint32 shards
    with a checksummed manifest. The same cached task as the pipeline's shard stage.

    Args:
        tokenizer: tokenizer.model file, or the directory holding it (the tokenizer flow's output).
        corpus: built-in corpus, a local file or directory, or hf:NAME (the one the tokenizer saw).
        val_fraction: fraction of documents in the val split (assigned by a hash of each document).
        test_fraction: fraction of documents held out for testing (not sharded).
        workdir: output root; the shards go to WORKDIR/shard/FINGERPRINT.
        mlruns: local MLflow store (ignored when MLFLOW_TRACKING_URI is set).
    """
    quiet_defaults()
    configure(mlruns)
    cfg = ShardConfig(val_fraction=val_fraction, test_fraction=test_fraction)
    model = Path(tokenizer).resolve()
    model = model / MODEL_FILE if model.is_dir() else model  # the pipeline's input: the same fingerprint
    return run_stage(
        shard_task, workdir, corpus=pin_corpus(corpus), tokenizer=str(model), config=cfg.to_dict()
    )
