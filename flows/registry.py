"""The MLflow model registry side of (re)training.

- ``resolve_init``: a warm start's parent from ``scratch``, a model directory, or ``models:/NAME@ALIAS``
  / ``models:/NAME/VERSION``; registry versions lead back to their torch checkpoint (tag
  ``gptflow.checkpoint_uri``), fetched once into ``<workdir>/registry/NAME/vN``.
- ``register_candidate``: score the candidate bundle and the current champion on the *same*
  evaluation set, register the candidate with both numbers, the eval set's hash, the margin, the
  threshold and the decision as tags, and move ``champion`` only for a real improvement. A bundle that
  is already registered (same export fingerprint) is not registered again.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from flows.promotion import EvalSet, decide
from flows.tracking import log_bundle_model, stage_run
from gpt.bundle import BUNDLE_DIR
from gpt.checkpoint import WEIGHTS
from gpt.io import atomic_dir, sha256_file

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
SCRATCH = "scratch"
TAG_BUILD = "gptflow.fingerprint"  # export-stage fingerprint: registering the same bundle twice is a no-op
TAG_DATA = "gptflow.data_fingerprint"  # content hash of the corpus (or task file) the version saw
TAG_PARENT = "gptflow.parent"  # "scratch", models:/NAME/VERSION, or a model directory
TAG_PARENT_SHA = "gptflow.parent_sha256"
TAG_CKPT = "gptflow.checkpoint_uri"  # runs:/<pretrain run>/checkpoint: the torch weights behind the ONNX
TAG_CKPT_SHA = "gptflow.checkpoint_sha256"


@dataclass
class Parent:
    """Where a warm start begins: a local model directory and what it is."""

    ref: str  # models:/NAME/VERSION, or the resolved model directory
    model_dir: Path
    sha256: str  # of model.safetensors
    version: int | None = None
    data_fingerprint: str | None = None  # what the registry version was trained on
    parent_ref: str | None = None  # the registry version's own parent

    def lineage(self) -> dict[str, Any]:
        return {"init_from": self.ref, "version": self.version, "sha256": self.sha256}


def parse_models_uri(uri: str) -> tuple[str, str | None, int | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/VERSION`` -> (NAME, None, VERSION)."""
    body = uri.removeprefix("models:/")
    if "@" in body:
        name, alias = body.split("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, int(version)
    raise ValueError(f"bad model URI {uri!r}; use models:/NAME@ALIAS or models:/NAME/VERSION")


def _lookup(client: MlflowClient, name: str, alias: str | None, version: int | None) -> ModelVersion | None:
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException:
        return None


def resolve_init(init_from: str | None, workdir: str | Path) -> Parent | None:
    """The parent model a run starts from, or None for random weights."""
    if not init_from or init_from == SCRATCH:
        return None
    if init_from.startswith("models:/"):
        name, alias, version = parse_models_uri(init_from)
        mv = _lookup(MlflowClient(), name, alias, version)
        if mv is None:
            if alias is None:
                raise ValueError(f"{init_from} does not exist in the registry at {mlflow.get_tracking_uri()}")
            log.info("%s does not exist yet: starting from scratch", init_from)
            return None
        return _registry_parent(name, mv, Path(workdir))
    from gpt.checkpoint import resolve_model_dir

    model_dir = resolve_model_dir(init_from).resolve()
    return Parent(ref=str(model_dir), model_dir=model_dir, sha256=sha256_file(model_dir / WEIGHTS))


def _registry_parent(name: str, mv: ModelVersion, workdir: Path) -> Parent:
    uri, want = mv.tags.get(TAG_CKPT), mv.tags.get(TAG_CKPT_SHA)
    if not uri or not want:
        raise ValueError(
            f"models:/{name}/{mv.version} has no linked torch checkpoint (tag {TAG_CKPT}); it was "
            "registered by an older gptflow. Pass --init-from <model dir> or --init-from scratch"
        )
    dest = workdir / "registry" / name / f"v{mv.version}"
    model_dir = dest / "checkpoint"
    if not (model_dir / WEIGHTS).is_file() or sha256_file(model_dir / WEIGHTS) != want:
        with atomic_dir(dest) as tmp:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
            got.rename(tmp / "checkpoint")
        if sha256_file(model_dir / WEIGHTS) != want:
            raise ValueError(f"{uri} does not hold the weights registered as models:/{name}/{mv.version}")
    log.info("warm start from models:/%s/%s (%s)", name, mv.version, model_dir)
    return Parent(
        ref=f"models:/{name}/{mv.version}",
        model_dir=model_dir,
        sha256=want,
        version=int(mv.version),
        data_fingerprint=mv.tags.get(TAG_DATA),
        parent_ref=mv.tags.get(TAG_PARENT),
    )


def find_version(name: str, build: str) -> ModelVersion | None:
    """The registered version of ``name`` built from export fingerprint ``build``, if any."""
    try:
        versions = MlflowClient().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get(TAG_BUILD) == build), None)


def champion_score(name: str, eval_set: EvalSet) -> tuple[ModelVersion | None, float | None]:
    """The current champion and its score on ``eval_set`` (its bundle fetched from the registry)."""
    client = MlflowClient()
    champion = _lookup(client, name, CHAMPION, None)
    if champion is None:
        return None, None
    with tempfile.TemporaryDirectory(prefix="gptflow-champion-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{champion.version}", dst_path=tmp))
        # MLflow keeps a logged directory under its own name: the export stage's bundle/ folder.
        return champion, eval_set.score_bundle(local / "artifacts" / BUNDLE_DIR)


def register_candidate(
    bundle_dir: str | Path,
    name: str,
    build: str,
    make_eval_set: Callable[[], EvalSet],
    min_improvement: float,
    parent_run_id: str | None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Register ``bundle_dir`` as a version of ``name`` unless it already is; promote it only if it
    beats the champion by at least ``min_improvement`` on the set ``make_eval_set`` builds (only
    built when there is something to register). Returns the decision."""
    existing = find_version(name, build)
    if existing is not None:
        log.info("%s: this bundle is already version %s; nothing registered", name, existing.version)
        return {"model": name, "version": int(existing.version), "registered": False}
    eval_set = make_eval_set()
    candidate = eval_set.score_bundle(bundle_dir)
    champion, champion_value = champion_score(name, eval_set)
    promote, margin = decide(candidate, champion_value, eval_set.lower_is_better, min_improvement)
    with stage_run(f"register:{name}", parent_run_id):
        version = log_bundle_model(bundle_dir, name)
        decision = {
            "model": name,
            "version": version,
            "registered": True,
            "alias": CHAMPION if promote else CHALLENGER,
            "metric": eval_set.metric,
            "eval_set": eval_set.name,
            "eval_set_sha256": eval_set.sha256,
            "eval_items": len(eval_set.items),
            "candidate": candidate,
            "champion_before": champion_value,
            "champion_version_before": int(champion.version) if champion is not None else None,
            "margin": margin,
            "threshold": min_improvement,
            "decision": ("promoted" if champion else "first champion") if promote else "kept champion",
        }
        mlflow.log_metric("promotion.candidate", candidate)
        if champion_value is not None:
            mlflow.log_metric("promotion.champion_before", champion_value)
    client = MlflowClient()
    for k, v in {**(tags or {}), TAG_BUILD: build}.items():
        client.set_model_version_tag(name, str(version), k, str(v))
    client.set_model_version_tag(name, str(version), eval_set.metric, str(candidate))
    client.set_model_version_tag(name, str(version), "eval_set_sha256", eval_set.sha256)
    for k, v in decision.items():
        client.set_model_version_tag(name, str(version), f"promotion.{k}", str(v))
    client.set_registered_model_alias(name, decision["alias"], str(version))
    log.info(
        "%s v%s -> %s (%s %.4f vs champion %s on the same %d items; margin %s, threshold %s)",
        name, version, decision["alias"], eval_set.metric, candidate, champion_value,
        len(eval_set.items), margin, min_improvement,
    )  # fmt: skip
    return decision
