"""Flow: export a checkpoint to a verified ONNX bundle, log it as a pyfunc model, register, promote."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import mlflow
from prefect import flow
from pydantic import Field

from flows.caching import is_complete
from flows.common import quiet_defaults, run_stage, stage_task
from flows.promotion import DEFAULT_MIN_IMPROVEMENT, lm_eval_set, task_eval_set
from flows.registry import register_candidate
from flows.tracking import LM_MODEL_NAME, configure, flat_params, log_dir, numeric, stage_run
from gpt.bundle import BUNDLE_DIR
from gpt.checkpoint import read_model_meta, resolve_model_dir
from gpt.corpora import load_corpus
from gpt.export import ExportConfig, Quantize, export_bundle
from gpt.io import read_manifest, write_manifest
from gpt.tasks import get_task


@stage_task("export", retries=1)
def export_task(
    checkpoint: str,
    config: dict,
    out_dir: str,
    eval_corpus: str | None = None,
    parent_run_id: str | None = None,
) -> dict:
    """Export ``checkpoint`` (a model dir) to a verified ONNX bundle. With int8 quantization,
    ``eval_corpus``'s held-out test documents measure its bits-per-byte cost. Registration is not
    part of this cached stage: it depends on the registry's state (see flows.registry)."""
    cfg = ExportConfig.from_dict(config)
    out = Path(out_dir)
    bundle = out / BUNDLE_DIR
    with stage_run("export", parent_run_id, {"checkpoint": checkpoint, **flat_params(export=cfg)}):
        if not is_complete(out):
            eval_text = held_out_text(eval_corpus) if eval_corpus and cfg.quantize != "none" else None
            result = export_bundle(Path(checkpoint), bundle, cfg, eval_text=eval_text)
            write_manifest(out, stage="export", checkpoint=checkpoint, result=result)
        result = read_manifest(out)["result"]
        mlflow.log_metrics(numeric(result.get("parity", {}), "parity."))
        mlflow.log_metric("onnx_size_bytes", float(result.get("size_bytes", 0)))
        for precision in cfg.precisions:  # the fp32 bundle goes to MLflow inside its registered model
            mlflow.log_metrics(numeric(result.get(f"quality_cost_{precision}", {}), f"{precision}."))
            if result.get(f"bundle_{precision}"):
                log_dir(result[f"bundle_{precision}"], f"onnx_bundle_{precision}")
    return {
        "dir": str(out),
        "bundle": str(bundle),
        "build": out.name,  # the stage fingerprint: what a registry version was built from
        "parity": result.get("parity", {}),
    }


def held_out_text(corpus: str, max_chars: int = 100_000) -> str:
    """The corpus's test-split documents (never trained on), up to ``max_chars``."""
    text = "\n".join(doc.text for doc in load_corpus(corpus).documents("test"))
    return text[:max_chars]


@flow(name="export", log_prints=True)
def export_flow(
    checkpoint: str,
    eval_data: str,
    registered_name: str | None = None,
    min_improvement: Annotated[float, Field(ge=0)] = DEFAULT_MIN_IMPROVEMENT,
    quantize: Quantize = "none",
    workdir: str = "artifacts",
    mlruns: str = "mlruns",
) -> dict:
    """Export a model to a parity-checked ONNX bundle and register it in MLflow; the new version
    becomes ``champion`` only if it beats the champion on ``eval_data``, both scored here on the same
    items. The same cached task and registration as the pipeline's.

    Args:
        checkpoint: pretraining or finetuning run directory (uses its best/), or a model directory.
        eval_data: what to compare against the champion on: for a language model a corpus (its held-out
            documents, bits per byte), for a classifier its task (the test split, the task's metric).
        registered_name: registry name (default: gptflow-lm, or gptflow-TASK for a classifier of TASK).
        min_improvement: how much the new version must beat the champion by to be promoted.
        quantize: also export weight-only quantized bundles: int8, int4 or int8,int4 (for a language
            model, their bits-per-byte cost on eval_data; refused above ExportConfig.max_bpb_increase).
        workdir: output root; the bundle goes to WORKDIR/export/FINGERPRINT/bundle.
        mlruns: local MLflow store (ignored when MLFLOW_TRACKING_URI is set).
    """
    quiet_defaults()
    configure(mlruns)
    model_dir = resolve_model_dir(checkpoint).resolve()
    kind = "classifier" if read_model_meta(model_dir)["model"].get("n_classes", 0) > 0 else "lm"
    name = registered_name or (LM_MODEL_NAME if kind == "lm" else f"gptflow-{get_task(eval_data).name}")
    cfg = ExportConfig(quantize=quantize)
    with mlflow.start_run(run_name=f"export-{name}") as run:
        out = run_stage(
            export_task,
            workdir,
            checkpoint=str(model_dir),
            config=cfg.to_dict(),
            eval_corpus=eval_data if quantize != "none" and kind == "lm" else None,
            parent_run_id=run.info.run_id,
        )
        make_eval_set = functools.partial(lm_eval_set if kind == "lm" else task_eval_set, eval_data)
        out["promotion"] = register_candidate(
            out["bundle"], name, out["build"], make_eval_set, min_improvement, run.info.run_id
        )
    return out
