"""``gptflow serve``: the OpenAI-compatible HTTP server over an ONNX bundle (see deploy/server.py)."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from deploy.server_config import ServerConfig
from gpt.bundle import BUNDLE_DIR
from gptflow.args import add_config_args, config_overrides
from gptflow.bundles import LM_NAME, resolve_bundle

HELP = "serve an exported ONNX bundle over HTTP (OpenAI-compatible /v1/completions, /v1/classify)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--bundle",
        type=Path,
        help="language-model (or classifier) bundle directory, or an export stage directory holding bundle/ "
        "(default: the newest language-model bundle in ./artifacts)",
    )
    source.add_argument(
        "--model-uri",
        help="MLflow model URI of a logged bundle, e.g. models:/gptflow-lm@champion (uses MLFLOW_TRACKING_URI)",
    )
    parser.add_argument(
        "--reload-interval",
        type=float,
        default=0.0,
        metavar="S",
        help="with --model-uri models:/NAME@ALIAS: check the alias every S seconds and swap in the version "
        "it moves to, without dropping requests (0 = never)",
    )
    parser.add_argument(
        "--classifier",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="classifier bundle (or export stage directory) to serve on /v1/classify (repeatable)",
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
    from deploy.registry import resolve

    bundle, name, _ = resolve(uri, dst)
    return bundle, name


def run(args: argparse.Namespace) -> int:
    from deploy.runtime import load_bundle
    from deploy.server import create_app, load_models, serve

    overrides = config_overrides(args, ServerConfig)
    if "api_key" not in overrides and os.environ.get("GPTFLOW_API_KEY"):
        overrides["api_key"] = os.environ["GPTFLOW_API_KEY"]  # keeps the key out of `ps` output
    config = ServerConfig(**overrides)
    if args.reload_interval < 0:
        raise ValueError(f"--reload-interval {args.reload_interval} must be >= 0 seconds (0 = never)")
    follower = None
    with tempfile.TemporaryDirectory(prefix="gptflow-serve-") as tmp:
        bundle, uri_name, version = args.bundle, None, None
        if args.model_uri:
            from deploy.registry import RegistryFollower, parse_model_uri, resolve

            bundle, uri_name, version = resolve(args.model_uri, Path(tmp))
            log.info("serving %s (version %s) from %s", args.model_uri, version, bundle)
        else:
            bundle = resolve_bundle(args.bundle, "lm")  # says which one when it picks the newest
        classifier_dirs = [resolve_bundle(path, "classifier") for path in args.classifier]
        lm, lm_name, classifiers = load_models(
            bundle, classifier_dirs, providers=args.providers, threads=config.threads
        )
        if lm is not None and uri_name is None and Path(bundle).name == BUNDLE_DIR:
            lm_name = (
                LM_NAME  # a pipeline export's folder is just `bundle/`: serve it under its registry name
            )
        app = create_app(lm, classifiers, config, lm_name=uri_name or lm_name, version=version)
        if args.reload_interval > 0:
            parsed = parse_model_uri(args.model_uri or "")
            if not parsed or parsed[1] is None or lm is None:
                raise ValueError(
                    "--reload-interval follows a registry alias: give --model-uri models:/NAME@ALIAS of a language model"
                )
            follower = RegistryFollower(
                parsed[0],
                parsed[1],
                version,
                Path(tmp),
                load=lambda path: load_bundle(path, providers=args.providers, threads=config.threads),
                swap=app.state.models.swap,
                interval_s=args.reload_interval,
            )
            follower.start()
            log.info("following %s every %g s", args.model_uri, args.reload_interval)
        log.info(
            "gptflow serve: models %s on http://%s:%d (max %d active sequences, queue %d%s)",
            ", ".join(app.state.models.ids()),
            config.host,
            config.port,
            config.max_active,
            config.queue_size,
            ", API key required" if config.api_key else "",
        )
        if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
            log.warning(
                "binding %s without --api-key: anyone who can reach it can use the model", config.host
            )
        try:
            serve(app, config, log_level="debug" if args.verbose else "info", access_log=args.access_log)
        finally:
            if follower is not None:
                follower.stop()
    return 0
