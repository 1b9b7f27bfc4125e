"""Serve a model from the MLflow registry and follow its alias (``models:/NAME@ALIAS``).

``RegistryFollower`` polls the alias; when it points at a new version, that version is downloaded
and loaded on the follower's thread, then handed to ``swap`` (the server's ``_Models.swap``), which
replaces the served model in one reference assignment: requests already admitted finish on the old
model, the next one is served by the new. A version that fails to download or load is logged and the
old model stays. Imports mlflow lazily: the rest of ``deploy/`` does not need it.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpt.bundle import CONFIG_FILE, ONNX_FILE

log = logging.getLogger(__name__)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/3`` -> (NAME, None, "3"); else None."""
    if not uri.startswith("models:/"):
        return None
    rest = uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, None
    name, _, version = rest.partition("/")
    return name, None, version or None


def find_bundle(local: Path, uri: str) -> Path:
    """The bundle (a directory with config.json and model.onnx) inside a downloaded MLflow model."""
    candidates = sorted(p.parent for p in local.rglob(CONFIG_FILE) if (p.parent / ONNX_FILE).is_file())
    if not candidates:
        raise FileNotFoundError(
            f"{uri} downloaded to {local} holds no bundle (a directory with {CONFIG_FILE} and {ONNX_FILE}); "
            "log the model with its bundle under the artifact key 'bundle'"
        )
    return candidates[0]


def download_bundle(uri: str, dst: Path) -> Path:
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    return find_bundle(local, uri)


def alias_version(name: str, alias: str) -> str:
    """The version ``NAME@ALIAS`` points at now (MLFLOW_TRACKING_URI / the registry URI decide where)."""
    from mlflow import MlflowClient

    return str(MlflowClient().get_model_version_by_alias(name, alias).version)


def resolve(uri: str, dst: Path) -> tuple[Path, str, str | None]:
    """Download ``uri``; returns (bundle dir, served name, registry version or None).

    An alias is read once and the version it names is downloaded, so the version reported is the
    one served even if the alias moves meanwhile.
    """
    parsed = parse_model_uri(uri)
    if parsed is None:
        bundle = download_bundle(uri, dst)
        return bundle, bundle.name, None
    name, alias, version = parsed
    if alias is not None:
        version = alias_version(name, alias)
    target = f"models:/{name}/{version}" if version else uri
    return download_bundle(target, dst / f"v{version}"), name, version


class RegistryFollower:
    """Poll ``NAME@ALIAS`` every ``interval_s`` seconds; load a new version and ``swap`` it in."""

    def __init__(
        self,
        name: str,
        alias: str,
        version: str | None,
        workdir: Path,
        load: Callable[[Path], Any],
        swap: Callable[[Any, str], None],
        interval_s: float,
    ):
        self.name, self.alias, self.version = name, alias, version
        self.workdir, self.load, self.swap, self.interval_s = Path(workdir), load, swap, interval_s
        self.failed: dict[str, str] = {}  # version -> why it could not be loaded
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one poll at a time (the thread, or a direct poll_once)

    def poll_once(self) -> bool:
        """Check the alias now; True when a new version was loaded and swapped in."""
        with self._lock:
            version = alias_version(self.name, self.alias)
            if version == self.version:
                return False
            dst = self.workdir / f"v{version}"
            try:
                shutil.rmtree(dst, ignore_errors=True)
                model = self.load(download_bundle(f"models:/{self.name}/{version}", dst))
            except Exception as e:
                shutil.rmtree(dst, ignore_errors=True)
                first = version not in self.failed  # retried at every poll, logged once
                self.failed[version] = f"{type(e).__name__}: {e}"
                log.log(
                    logging.WARNING if first else logging.DEBUG,
                    "%s@%s moved to version %s, which failed to load (%s); still serving version %s",
                    self.name,
                    self.alias,
                    version,
                    self.failed[version],
                    self.version,
                )
                return False
            old, self.version = self.version, version
            self.swap(model, version)
            if old is not None:  # the old session holds its graph in memory; its files can go
                shutil.rmtree(self.workdir / f"v{old}", ignore_errors=True)
            log.info("%s@%s: version %s -> %s", self.name, self.alias, old, version)
            return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll_once()
            except Exception as e:  # the registry is unreachable: keep serving, try again later
                log.warning(
                    "could not read %s@%s (%s: %s); trying again", self.name, self.alias, type(e).__name__, e
                )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gptflow-registry-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
