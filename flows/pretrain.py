"""Flow: pretrain the GPT on the shards; resumes from the last checkpoint if a previous run died."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import mlflow
from prefect import flow
from pydantic import Field

from flows.caching import is_complete
from flows.common import quiet_defaults, run_stage, stage_task
from flows.tracking import (
    MlflowCallbacks,
    configure,
    flat_params,
    log_dir,
    log_loss_curve,
    numeric,
    stage_run,
)
from gpt.config import ModelConfig, Preset
from gpt.io import read_manifest
from gpt.train import train
from gpt.train_config import TrainConfig


@stage_task("pretrain", retries=1)
def pretrain_task(
    model: dict,
    train_config: dict,
    data: str,
    out_dir: str,
    init_from: str | None = None,
    lineage: dict | None = None,
    parent_run_id: str | None = None,
) -> dict:
    """Pretrain on ``data``, from random weights or from the model directory ``init_from`` (a warm
    start: new warmup + cosine schedule over this run's steps). ``lineage`` says what that parent is
    (registry version, sha256); it is recorded, not hashed: the weights themselves are the input."""
    model_cfg, train_cfg = ModelConfig.from_dict(model), TrainConfig.from_dict(train_config)
    out = Path(out_dir)
    params = flat_params(model=model_cfg, train=train_cfg) | flat_params(
        parent=lineage or {"init_from": "scratch"}
    )
    with stage_run("pretrain", parent_run_id, params) as run_id:
        if not is_complete(out):
            # A retry, or a re-run after a crash, continues from the last checkpoint in `out`.
            train(
                model_cfg, train_cfg, data, out, resume=True, callbacks=MlflowCallbacks(), init_from=init_from
            )
        summary = read_manifest(out)["metrics"]
        mlflow.log_metrics(numeric(summary))
        if (out / "metrics.jsonl").is_file():
            log_loss_curve(out / "metrics.jsonl")
        log_dir(out / "best", "checkpoint")
    best = out / "best"
    return {
        "dir": str(out),
        "best": str(best),
        "checkpoint_uri": f"runs:/{run_id}/checkpoint",  # what a registry version links back to
        "val_bpb": summary.get("best_val_bpb"),
        "summary": numeric(summary),
    }


@flow(name="pretrain", log_prints=True)
def pretrain_flow(
    data: str,
    preset: Preset = "cpu",
    max_steps: Annotated[int, Field(gt=0)] | None = None,
    max_time: Annotated[float, Field(ge=0)] | None = None,
    workdir: str = "artifacts",
    mlruns: str = "mlruns",
) -> dict:
    """Pretrain a GPT preset on a shard directory (bf16 autocast where the CPU/GPU supports it); a
    re-run after a crash resumes from the last checkpoint. The same cached task as the pipeline's.

    Args:
        data: shard directory (the shard flow's output); its tokenizer decides the vocabulary size.
        preset: model shape and training recipe.
        max_steps: optimizer steps (default: the preset's).
        max_time: wall-clock budget in seconds (default: none).
        workdir: output root; the run goes to WORKDIR/pretrain/FINGERPRINT, the model to its best/.
        mlruns: local MLflow store (ignored when MLFLOW_TRACKING_URI is set).
    """
    quiet_defaults()
    configure(mlruns)
    overrides = {k: v for k, v in dict(max_steps=max_steps, max_time=max_time).items() if v is not None}
    train_cfg = TrainConfig.preset(preset, **overrides)
    return run_stage(
        pretrain_task,
        workdir,
        model=ModelConfig.preset(preset).to_dict(),
        train_config=train_cfg.to_dict(),
        data=str(Path(data).resolve()),
        init_from=None,
    )
