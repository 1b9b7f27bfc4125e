"""All MLflow calls in one place: store, experiment, nested stage runs, metrics, artifacts, registry.

Default store: ``sqlite:///<mlruns>/mlflow.db`` with artifacts under ``<mlruns>/artifacts`` (the plain
file store is in maintenance mode in MLflow 3). ``MLFLOW_TRACKING_URI`` overrides it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow

from gpt.bundle import BundleConfig
from gpt.engine import Callbacks

log = logging.getLogger(__name__)

# What deploy/ imports from gpt/: the bundle format, standard library only. A logged model carries
# these beside deploy/, and nothing else of gpt/ (which needs torch).
RUNTIME_GPT_FILES = ("__init__.py", "bundle.py", "io.py")

# mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI, so after the first configure() the
# variable no longer says what the user chose: read it once, as the process found it.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")

EXPERIMENT = "gptflow"
LM_MODEL_NAME = "gptflow-lm"


def configure(mlruns: str | Path = "mlruns", experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the store and make the experiment the active one; returns its id."""
    mlruns = Path(mlruns).resolve()
    if _USER_TRACKING_URI:
        mlflow.set_tracking_uri(_USER_TRACKING_URI)
    else:
        mlruns.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{mlruns / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        location = None if _USER_TRACKING_URI else (mlruns / "artifacts").as_uri()
        mlflow.create_experiment(experiment, artifact_location=location)
    return mlflow.set_experiment(experiment).experiment_id  # runs land here, not in "Default"


def flat_params(**configs: Any) -> dict[str, Any]:
    """``{"train": TrainConfig(...)}`` -> ``{"train.lr": ..., ...}`` (MLflow params are flat strings)."""
    out: dict[str, Any] = {}
    for prefix, cfg in configs.items():
        data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        for k, v in data.items():
            out[f"{prefix}.{k}"] = json.dumps(v) if isinstance(v, list | tuple | dict) else v
    return out


def numeric(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Keep the finite numbers of a (possibly nested) result dict, flattened with dots."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(numeric(v, f"{key}."))
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


@contextlib.contextmanager
def stage_run(stage: str, parent_run_id: str | None, params: dict[str, Any] | None = None) -> Iterator[str]:
    """A nested run for one stage under the pipeline's parent run (or a top-level run when alone)."""
    with mlflow.start_run(
        run_name=stage, nested=parent_run_id is not None, parent_run_id=parent_run_id
    ) as run:
        mlflow.set_tag("gptflow.stage", stage)
        if params:
            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        yield run.info.run_id


class MlflowCallbacks(Callbacks):
    """Per-step training curves into the active MLflow run."""

    def __init__(self, prefix: str = "", every: int = 1):
        self.prefix = prefix
        self.every = max(1, every)

    def on_step(self, step: int, metrics: dict) -> None:
        if step % self.every == 0:
            mlflow.log_metrics(numeric(metrics, f"{self.prefix}train_"), step=step)

    def on_eval(self, step: int, metrics: dict) -> None:
        mlflow.log_metrics(numeric(metrics, self.prefix), step=step)

    def on_checkpoint(self, step: int, path: Path) -> None:
        mlflow.set_tag(f"{self.prefix}last_checkpoint", str(path))


def log_dir(path: str | Path, name: str) -> None:
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=name)
    elif path.is_file():
        mlflow.log_artifact(str(path), artifact_path=name)


def log_loss_curve(metrics_jsonl: str | Path, name: str = "loss_curve.png") -> None:
    """Plot train/val loss from a training run's metrics.jsonl and log the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    mlflow.log_figure(fig, name)
    plt.close(fig)


def log_bundle_model(bundle_dir: str | Path, registered_name: str) -> int:
    """Log the ONNX bundle as a pyfunc model (torch-free runtime) and register it; returns the version.

    Which alias the version gets is decided by flows.registry, after a fair comparison.
    """
    from mlflow.models import infer_signature

    from deploy.mlflow_model import GENERATION_PARAMS

    root = Path(__file__).resolve().parents[1]
    code_file = root / "deploy" / "mlflow_model.py"
    kind = BundleConfig.read(bundle_dir).kind
    example = ["The market"]
    output = [{"label": "x", "probs": {"x": 1.0}}] if kind == "classifier" else ["text"]
    signature = infer_signature(example, output, params=GENERATION_PARAMS if kind == "lm" else None)
    with tempfile.TemporaryDirectory(prefix="gptflow-code-") as tmp:
        gpt_code = Path(tmp) / "gpt"
        gpt_code.mkdir()
        for name in RUNTIME_GPT_FILES:
            shutil.copyfile(root / "gpt" / name, gpt_code / name)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code_file),
            artifacts={"bundle": str(Path(bundle_dir).resolve())},
            code_paths=[str(root / "deploy"), str(gpt_code)],  # the torch-free runtime travels with the model
            pip_requirements=["onnxruntime", "sentencepiece", "numpy", "pandas"],
            signature=signature,
        )
    return int(mlflow.register_model(info.model_uri, registered_name).version)
