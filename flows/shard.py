"""Flow: split, tokenize and shard a corpus with the trained tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import mlflow
from prefect import flow
from pydantic import Field

from flows.caching import is_complete
from flows.common import quiet_defaults, run_stage, stage_task
from flows.tracking import configure, flat_params, numeric, stage_run
from gpt.data import ShardConfig, shard_corpus
from gpt.io import MANIFEST, read_manifest


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
    """Shard a corpus into uint16/uint32 token files (train/val) with a checksummed manifest."""
    quiet_defaults()
    configure(mlruns)
    cfg = ShardConfig(val_fraction=val_fraction, test_fraction=test_fraction)
    return run_stage(shard_task, corpus=corpus, tokenizer=tokenizer, config=cfg.to_dict(), workdir=workdir)
