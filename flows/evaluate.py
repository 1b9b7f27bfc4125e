"""Flow: evaluate a finetuned checkpoint on a task's test split, beside the task's baseline."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow

from flows.caching import is_complete
from flows.common import quiet_defaults, run_stage, stage_task
from flows.tracking import configure, log_dir, numeric, stage_run
from gpt.checkpoint import resolve_model_dir
from gpt.evaluate import evaluate
from gpt.io import read_json, read_manifest


@stage_task("evaluate", retries=1)
def evaluate_task(
    task: str, checkpoint: str, pretrained: str | None, out_dir: str, parent_run_id: str | None = None
) -> dict:
    out = Path(out_dir)
    with stage_run(f"evaluate:{task}", parent_run_id, {"task": task, "checkpoint": checkpoint}):
        if not is_complete(out):
            evaluate(task, Path(checkpoint), out, pretrained_dir=Path(pretrained) if pretrained else None)
        read_manifest(out)  # raises unless the evaluation finished
        metrics = read_json(out / "metrics.json", what="evaluation report")
        mlflow.log_metrics(numeric(metrics))
        log_dir(out, "evaluation")
    return {"task": task, "dir": str(out), "metrics": metrics}


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    task: str,
    checkpoint: str,
    pretrained: str | None = None,
    workdir: str = "artifacts",
    mlruns: str = "mlruns",
) -> dict:
    """The task's metric on its test split, beside baselines on the same split (TF-IDF + logistic
    regression, lead-1, nearest-train, the un-finetuned model). The same cached task as the pipeline's.

    Args:
        task: the task the model was finetuned on (a built-in name or the same .csv/.jsonl file).
        checkpoint: finetuning run directory (the finetune flow's output; uses its best/) or a model directory.
        pretrained: the un-finetuned model (run or model directory) for its baseline and bits per byte.
        workdir: output root; the report goes to WORKDIR/evaluate/FINGERPRINT/metrics.json.
        mlruns: local MLflow store (ignored when MLFLOW_TRACKING_URI is set).
    """
    quiet_defaults()
    configure(mlruns)
    checkpoint = str(resolve_model_dir(checkpoint).resolve())
    pretrained = str(resolve_model_dir(pretrained).resolve()) if pretrained else None
    return run_stage(evaluate_task, workdir, task=task, checkpoint=checkpoint, pretrained=pretrained)
