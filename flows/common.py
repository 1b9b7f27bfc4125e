"""What every stage flow shares: the cached task decorator, environment defaults, and the call
that skips a finished stage or recomputes one whose output has gone missing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from flows.caching import is_complete, stage_cache_key, stage_dir, stage_inputs, stage_module
from flows.env import TELEMETRY_OFF, quiet_defaults  # noqa: F401  (the stage flows import them here)


def stage_task(name: str, retries: int = 0) -> Callable:
    """A Prefect task whose JSON result is cached on its inputs' fingerprint (see flows.caching)."""
    return task(
        name=name,
        cache_key_fn=stage_cache_key,
        persist_result=True,
        result_serializer="json",
        retries=retries,
        retry_delay_seconds=2,
    )


def call_stage(stage_fn, workdir: str, **params: Any) -> tuple[dict[str, Any], str]:
    """Run a stage task in its own ``<workdir>/<stage>/<fingerprint>`` directory.

    Returns (result, Prefect state name: "Completed" or "Cached"). A cache entry whose output
    directory has gone missing or was never finished is refreshed instead of trusted.
    """
    out_dir = stage_dir(stage_fn.name, workdir, stage_module(stage_fn.fn), **stage_inputs(params))
    fn = stage_fn.with_options(refresh_cache=not is_complete(out_dir))
    state = fn(**params, out_dir=str(out_dir), return_state=True)
    return state.result(), state.name


def run_stage(stage_fn, workdir: str, **params: Any) -> dict[str, Any]:
    """``call_stage`` for a single-stage flow: absolute output paths (the next stage's inputs, valid from
    any directory), and a log line that says where they are and whether the stage ran or was cached."""
    result, state = call_stage(stage_fn, str(Path(workdir).resolve()), **params)
    get_run_logger().info("%s %s: %s", stage_fn.name, state, result["dir"])
    return result
