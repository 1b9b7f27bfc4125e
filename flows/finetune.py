"""Flow: finetune a pretrained checkpoint on one task (classification or completion)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import mlflow
from prefect import flow
from pydantic import Field

from flows.caching import is_complete
from flows.common import quiet_defaults, run_stage, stage_task
from flows.tracking import MlflowCallbacks, configure, flat_params, numeric, stage_run
from gpt.checkpoint import resolve_model_dir
from gpt.finetune import finetune
from gpt.finetune_config import METHODS, FinetuneConfig
from gpt.io import read_manifest


@stage_task("finetune", retries=1)
def finetune_task(
    task: str, config: dict, pretrained: str, out_dir: str, parent_run_id: str | None = None
) -> dict:
    cfg = FinetuneConfig.from_dict(config)
    out = Path(out_dir)
    with stage_run(f"finetune:{task}", parent_run_id, {"task": task, **flat_params(finetune=cfg)}):
        if not is_complete(out):
            finetune(task, resolve_model_dir(pretrained), out, cfg, callbacks=MlflowCallbacks())
        summary = read_manifest(out)["metrics"]
        mlflow.log_metrics(numeric(summary))
    return {"task": task, "dir": str(out), "best": str(out / "best"), "summary": numeric(summary)}


@flow(name="finetune", log_prints=True)
def finetune_flow(
    task: str,
    pretrained: str,
    method: Literal[METHODS] | None = None,
    epochs: Annotated[int, Field(gt=0)] | None = None,
    lr: Annotated[float, Field(gt=0)] | None = None,
    workdir: str = "artifacts",
    mlruns: str = "mlruns",
) -> dict:
    """Finetune a pretrained model on a built-in task or a CSV/JSONL task file, with the task's
    recommended settings unless overridden. The same cached task as the pipeline's.

    Args:
        task: built-in task (bbc-topic, zh-sentiment, bbc-headline, qa) or a .csv/.jsonl task file.
        pretrained: pretraining run directory (the pretrain flow's output; uses its best/) or a model directory.
        method: full, freeze (only the last blocks train) or lora (default: the task's, else full).
        epochs: passes over the train split (default: the task's).
        lr: peak learning rate (default: the task's).
        workdir: output root; the run goes to WORKDIR/finetune/FINGERPRINT, the model to its best/.
        mlruns: local MLflow store (ignored when MLFLOW_TRACKING_URI is set).
    """
    quiet_defaults()
    configure(mlruns)
    overrides = {k: v for k, v in dict(method=method, epochs=epochs, lr=lr).items() if v is not None}
    cfg = FinetuneConfig.for_task(task, **overrides)
    pretrained = str(Path(pretrained).resolve())
    return run_stage(finetune_task, workdir, task=task, config=cfg.to_dict(), pretrained=pretrained)
