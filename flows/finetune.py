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
from gpt.finetune import FinetuneConfig, finetune, resolve_model_dir
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
    method: Literal["full", "freeze", "lora"] = "full",
    epochs: Annotated[int, Field(gt=0)] | None = None,
    lr: Annotated[float, Field(gt=0)] | None = None,
    workdir: str = "artifacts",
    mlruns: str = "mlruns",
) -> dict:
    """Finetune the pretraining run in ``pretrained`` on a built-in task or a CSV/JSONL task file."""
    quiet_defaults()
    configure(mlruns)
    overrides = {k: v for k, v in dict(method=method, epochs=epochs, lr=lr).items() if v is not None}
    cfg = FinetuneConfig.for_task(task, **overrides)
    return run_stage(finetune_task, task=task, config=cfg.to_dict(), pretrained=pretrained, workdir=workdir)
