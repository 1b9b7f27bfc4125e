"""Flow: export a checkpoint to a verified ONNX bundle, log it as a pyfunc model, register, promote."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow

from flows.caching import is_complete
from flows.common import quiet_defaults, run_stage, stage_task
from flows.tracking import (
    LM_MODEL_NAME,
    configure,
    flat_params,
    log_bundle_model,
    log_dir,
    numeric,
    stage_run,
)
from gpt.corpora import load_corpus
from gpt.export import ExportConfig, export_bundle
from gpt.io import read_manifest, write_manifest


@stage_task("export", retries=1)
def export_task(
    checkpoint: str,
    config: dict,
    registered_name: str,
    metric: str,
    value: float | None,
    lower_is_better: bool,
    out_dir: str,
    eval_corpus: str | None = None,
    parent_run_id: str | None = None,
) -> dict:
    """Export ``checkpoint`` (a model dir), then register the bundle as ``registered_name``.

    ``value`` of ``metric`` decides the promotion (see flows.tracking.promote). With int8
    quantization, ``eval_corpus``'s held-out test documents measure its bits-per-byte cost.
    """
    cfg = ExportConfig.from_dict(config)
    out = Path(out_dir)
    bundle = out / "bundle"
    with stage_run(
        f"export:{registered_name}", parent_run_id, {"checkpoint": checkpoint, **flat_params(export=cfg)}
    ):
        if not is_complete(out):
            eval_text = held_out_text(eval_corpus) if eval_corpus and cfg.quantize != "none" else None
            result = export_bundle(Path(checkpoint), bundle, cfg, eval_text=eval_text)
            write_manifest(out, stage="export", checkpoint=checkpoint, result=result)
        result = read_manifest(out)["result"]
        mlflow.log_metrics(numeric(result.get("parity", {}), "parity."))
        mlflow.log_metric("onnx_size_bytes", float(result.get("size_bytes", 0)))
        mlflow.log_metrics(numeric(result.get("quality_cost_int8", {}), "int8."))
        if result.get("bundle_int8"):
            log_dir(result["bundle_int8"], "onnx_bundle_int8")
        decision = None
        if value is None:
            log_dir(bundle, "onnx_bundle")
        else:  # the pyfunc model carries the bundle itself: no second copy
            decision = log_bundle_model(bundle, registered_name, metric, float(value), lower_is_better)
    return {"dir": str(out), "bundle": str(bundle), "parity": result.get("parity", {}), "promotion": decision}


def held_out_text(corpus: str, max_chars: int = 100_000) -> str:
    """The corpus's test-split documents (never trained on), up to ``max_chars``."""
    text = "\n".join(doc.text for doc in load_corpus(corpus).documents("test"))
    return text[:max_chars]


@flow(name="export", log_prints=True)
def export_flow(
    checkpoint: str,
    registered_name: str = LM_MODEL_NAME,
    metric: str = "val_bpb",
    value: float | None = None,
    lower_is_better: bool = True,
    quantize: bool = False,
    workdir: str = "artifacts",
    mlruns: str = "mlruns",
) -> dict:
    """Export a model dir to ONNX (parity-checked); register it when ``value`` is given."""
    quiet_defaults()
    configure(mlruns)
    cfg = ExportConfig(quantize="int8" if quantize else "none")
    return run_stage(
        export_task,
        checkpoint=checkpoint,
        config=cfg.to_dict(),
        registered_name=registered_name,
        metric=metric,
        value=value,
        lower_is_better=lower_is_better,
        workdir=workdir,
    )
