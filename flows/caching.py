"""Stage fingerprints: Prefect cache keys and output directories derived from config + inputs.

A stage's fingerprint hashes its name, its config, and for each input path the checksum of that
input's ``manifest.json`` (or of the file itself). The stage writes to ``<workdir>/<stage>/<fp>``,
so a changed config or input never overwrites an older output, and a re-run with unchanged inputs
finds both the Prefect cache entry and the finished directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from gpt.io import MANIFEST, sha256_file

CACHE_VERSION = "1"  # bump to invalidate every cached stage after a change in stage semantics


def fingerprint_value(value: Any) -> Any:
    """Replace paths by the checksum of what they hold; leave plain values as they are."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, dict):
        return {k: fingerprint_value(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [fingerprint_value(v) for v in value]
    if isinstance(value, Path) or (isinstance(value, str) and ("/" in value or value.endswith(".model"))):
        p = Path(value)
        if (p / MANIFEST).is_file():
            return {"manifest": sha256_file(p / MANIFEST)}
        if p.is_file():
            return {"file": sha256_file(p)}
        return str(value)
    return value


def fingerprint(stage: str, **inputs: Any) -> str:
    blob = json.dumps(
        {"stage": stage, "v": CACHE_VERSION, "inputs": fingerprint_value(inputs)}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# Task parameters that say where or under which run to work, not what to compute.
NOT_INPUTS = ("workdir", "out_dir", "parent_run_id")


def stage_inputs(parameters: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in parameters.items() if k not in NOT_INPUTS}


def stage_dir(stage: str, workdir: str | Path, **inputs: Any) -> Path:
    """``<workdir>/<stage>/<fingerprint>``: where a stage with these inputs writes its output."""
    return Path(workdir) / stage / fingerprint(stage, **stage_inputs(inputs))


def stage_cache_key(context, parameters: dict[str, Any]) -> str:
    """Prefect ``cache_key_fn``: task name, fingerprint of its inputs, and where the output lives."""
    name = context.task.name
    where = hashlib.sha256(str(Path(parameters["out_dir"]).resolve()).encode()).hexdigest()[:8]
    return f"gptflow-{name}-{where}-{fingerprint(name, **stage_inputs(parameters))}"


def is_complete(out_dir: str | Path) -> bool:
    """A stage output is complete once its manifest exists (manifests are written last)."""
    return (Path(out_dir) / MANIFEST).is_file()
