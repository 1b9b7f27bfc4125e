"""``gptflow serve``: the OpenAI-compatible HTTP server over an ONNX bundle (see deploy/server.py)."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from deploy.server_config import ServerConfig
from gptflow.args import add_config_args, config_overrides

HELP = "serve an exported ONNX bundle over HTTP (OpenAI-compatible /v1/completions, /v1/classify)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path, help="language-model (or classifier) bundle directory")
    source.add_argument(
        "--model-uri",
        help="MLflow model URI of a logged bundle, e.g. models:/gptflow-lm@champion (uses MLFLOW_TRACKING_URI)",
    )
    parser.add_argument(
        "--classifier",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="classifier bundle to serve on /v1/classify (repeatable)",
    )
    parser.add_argument(
        "--providers",
        nargs="*",
        default=None,
        help="onnxruntime execution providers (default: CUDA when available, else CPU)",
    )
    parser.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=True, help="log every request"
    )
    add_config_args(parser, ServerConfig)


def resolve_model_uri(uri: str, dst: Path) -> tuple[Path, str]:
    """Download an MLflow model and find the bundle in it; returns (bundle dir, model name)."""
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    candidates = sorted(p.parent for p in local.rglob("config.json") if (p.parent / "model.onnx").is_file())
    if not candidates:
        raise FileNotFoundError(
            f"{uri} downloaded to {local} holds no bundle (a directory with config.json and model.onnx); "
            "log the model with its bundle under the artifact key 'bundle'"
        )
    # A registered model "models:/NAME@alias" or "models:/NAME/3" is served under NAME.
    name = uri.split("models:/", 1)[1].split("/")[0].split("@")[0] if uri.startswith("models:/") else ""
    return candidates[0], name or candidates[0].name


def run(args: argparse.Namespace) -> int:
    from deploy.server import create_app, load_models, serve

    overrides = config_overrides(args, ServerConfig)
    if "api_key" not in overrides and os.environ.get("GPTFLOW_API_KEY"):
        overrides["api_key"] = os.environ["GPTFLOW_API_KEY"]  # keeps the key out of `ps` output
    config = ServerConfig(**overrides)
    with tempfile.TemporaryDirectory(prefix="gptflow-serve-") as tmp:
        bundle, uri_name = args.bundle, None
        if args.model_uri:
            bundle, uri_name = resolve_model_uri(args.model_uri, Path(tmp))
            log.info("serving %s from %s", args.model_uri, bundle)
        lm, lm_name, classifiers = load_models(bundle, args.classifier, providers=args.providers)
        app = create_app(lm, classifiers, config, lm_name=uri_name or lm_name)
        log.info(
            "gptflow serve: models %s on http://%s:%d (workers %d, queue %d%s)",
            ", ".join(app.state.models.ids()),
            config.host,
            config.port,
            config.workers,
            config.queue_size,
            ", API key required" if config.api_key else "",
        )
        if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
            log.warning(
                "binding %s without --api-key: anyone who can reach it can use the model", config.host
            )
        serve(app, config, log_level="debug" if args.verbose else "info", access_log=args.access_log)
    return 0
