"""Stage fingerprints: Prefect cache keys and output directories derived from config, code and inputs.

A stage's fingerprint hashes its name, its config, the package version, a hash of the source it runs,
and the *content* of every path-like input: a file by its sha256 (and suffix, which decides how it
is read), a directory by a tree hash over relative paths and file contents, however the path is
spelled (``news.jsonl``, ``./news.jsonl``, ``docs``, ``docs/``, absolute). A sidecar database of
``(size, mtime_ns) → sha256`` per file keeps re-hashing a large unchanged tree cheap.

The stage writes to ``<workdir>/<stage>/<fp>``, so a changed input never overwrites an older output.
The Prefect cache key adds the MLflow tracking URI: a run against another tracking store re-runs the
task (which then finds its finished output and only logs it), so nothing is silently left unlogged.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import sqlite3
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from gpt.io import MANIFEST

log = logging.getLogger(__name__)

CACHE_VERSION = "2"  # bump to invalidate every cached stage after a change in stage semantics
ROOT = Path(__file__).resolve().parents[1]
LIBRARY_DIRS = ("gpt", "deploy")  # the code whose behaviour decides every stage's result
RACY_SECONDS = 2.0  # a file modified this recently may change again within one mtime tick: not cached


# --------------------------------------------------------------------------------------------------
# Content hashes of files and directories


def _cache_db() -> Path:
    root = Path(os.environ.get("GPTFLOW_CACHE_DIR") or Path.home() / ".cache" / "gptflow")
    root.mkdir(parents=True, exist_ok=True)
    return root / "file-hashes.sqlite"


class _HashCache:
    """``path → (size, mtime_ns, inode, sha256)`` in sqlite; an entry counts only while the stat matches."""

    def __init__(self) -> None:
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection | None:
        if self._db is None:
            try:
                self._db = sqlite3.connect(_cache_db(), timeout=30, check_same_thread=False)
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, "
                    "mtime_ns INTEGER, inode INTEGER, sha256 TEXT)"
                )
            except (OSError, sqlite3.Error) as e:  # a read-only home: hash every time, still correct
                log.warning("file-hash cache unavailable (%s); hashing inputs in full", e)
                self._db = None
        return self._db

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        db = self._conn()
        if db is not None:
            row = db.execute(
                "SELECT size, mtime_ns, inode, sha256 FROM files WHERE path = ?", (str(path),)
            ).fetchone()
            if row is not None and tuple(row[:3]) == key:
                return row[3]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        digest = h.hexdigest()
        if db is not None and time.time() - st.st_mtime_ns / 1e9 > RACY_SECONDS:
            with db:
                db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", (str(path), *key, digest))
        return digest


_hashes = _HashCache()


def file_sha256(path: str | Path) -> str:
    return _hashes.sha256(Path(path).resolve())


def tree_sha256(root: str | Path) -> str:
    """Hash of every file below ``root``: relative POSIX paths and contents, in sorted order."""
    root = Path(root).resolve()
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not path.is_file():  # a dangling link or a socket: not content
                continue
            rel = path.relative_to(root).as_posix()
            h.update(f"{rel}\0{file_sha256(path)}\n".encode())
    return h.hexdigest()


def path_fingerprint(path: str | Path) -> dict[str, str]:
    """Content of a file or directory, independent of how its path is spelled."""
    p = Path(path)
    if p.is_dir():
        return {"tree": tree_sha256(p)}
    return {"file": file_sha256(p), "suffix": p.suffix.lower()}


# --------------------------------------------------------------------------------------------------
# Names that are not paths: built-in corpora and tasks, hub datasets, registry URIs


@functools.cache
def builtin_names() -> frozenset[str]:
    from gpt.corpora import BUILTIN
    from gpt.tasks import TASKS

    return frozenset(BUILTIN) | frozenset(TASKS)


def is_path_like(value: str) -> bool:
    """A string that names an existing file or directory (built-in names and URIs never do)."""
    if not value or value in builtin_names() or value.startswith("hf:") or ":/" in value:
        return False
    return os.path.exists(value)


def pin_corpus(corpus: str) -> str:
    """``hf:name`` -> ``hf:name@<current revision>`` when online, so the cache follows the hub dataset.

    Unpinned names are logged: offline, the key can only be the name, and a new upload goes unseen.
    """
    if not corpus.startswith("hf:") or "@" in corpus:
        return corpus
    name = corpus[3:]
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        log.warning(
            "%s is not pinned and the hub is offline: cached on its name only (pin hf:NAME@REV)", corpus
        )
        return corpus
    try:
        from huggingface_hub import HfApi

        revision = HfApi().dataset_info(name).sha
    except Exception as e:  # noqa: BLE001 (any hub failure: say so, keep the name)
        log.warning(
            "%s is not pinned and its revision could not be resolved (%s): cached on its name", corpus, e
        )
        return corpus
    log.warning("%s is not pinned; using its current revision: hf:%s@%s", corpus, name, revision)
    return f"hf:{name}@{revision}"


def fingerprint_value(value: Any) -> Any:
    """Replace paths by the content they hold; leave plain values as they are."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, dict):
        return {k: fingerprint_value(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [fingerprint_value(v) for v in value]
    if isinstance(value, Path) or (isinstance(value, str) and is_path_like(value)):
        return path_fingerprint(value) if Path(value).exists() else str(value)
    return value


def data_fingerprint(value: Any) -> str:
    """A short content hash of an input (a corpus, a task file): what a model version 'saw'."""
    blob = json.dumps(fingerprint_value(value), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Code identity


def package_version() -> str:
    try:
        return metadata.version("gptflow")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@functools.cache
def source_hash(module: str | None = None) -> str:
    """Hash of the library (``gpt/``, ``deploy/``) plus the stage's own module: a bug fix changes it."""
    files = sorted(p for d in LIBRARY_DIRS for p in (ROOT / d).rglob("*.py"))
    if module:
        spec_file = ROOT / Path(*module.split(".")).with_suffix(".py")
        if spec_file.is_file():
            files.append(spec_file)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(ROOT).as_posix()}\0".encode() + f.read_bytes() + b"\n")
    return h.hexdigest()[:16]


def stage_module(fn) -> str:
    """Dotted name of the module that defines ``fn``, from its file: a deployment's entrypoint
    ``flows/shard.py:shard_flow`` makes Prefect run that file as a module named ``shard``, and the
    stage's code and fingerprint must be those of ``flows.shard`` all the same."""
    source = inspect.getsourcefile(fn)
    path = Path(source).resolve() if source else None
    if path is None or not path.is_relative_to(ROOT):  # defined outside this checkout (a test's task)
        return fn.__module__
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


# --------------------------------------------------------------------------------------------------
# Stage keys


def fingerprint(stage: str, module: str | None = None, **inputs: Any) -> str:
    blob = json.dumps(
        {
            "stage": stage,
            "v": CACHE_VERSION,
            "package": package_version(),
            "code": source_hash(module),
            "inputs": fingerprint_value(inputs),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# Task parameters that say where, under which run, on which workers, or with what description to
# work, not what to compute. ``lineage`` describes a warm start's parent (registry version); its
# weights are an input. ``dask_address`` names the cluster a stage runs on: same result anywhere.
NOT_INPUTS = ("workdir", "out_dir", "parent_run_id", "lineage", "dask_address")


def stage_inputs(parameters: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in parameters.items() if k not in NOT_INPUTS}


def stage_dir(stage: str, workdir: str | Path, module: str | None = None, **inputs: Any) -> Path:
    """``<workdir>/<stage>/<fingerprint>``: where a stage with these inputs writes its output."""
    return Path(workdir) / stage / fingerprint(stage, module, **stage_inputs(inputs))


def stage_cache_key(context, parameters: dict[str, Any]) -> str:
    """Prefect ``cache_key_fn``: task, fingerprint, where the output lives, and the tracking store."""
    import mlflow

    name = context.task.name
    where = str(Path(parameters["out_dir"]).resolve())
    store = mlflow.get_tracking_uri()
    fp = fingerprint(name, stage_module(context.task.fn), **stage_inputs(parameters))
    salt = hashlib.sha256(f"{where}\0{store}".encode()).hexdigest()[:12]
    return f"gptflow-{name}-{salt}-{fp}"


def is_complete(out_dir: str | Path) -> bool:
    """A stage output is complete once its manifest exists (manifests are written last)."""
    return (Path(out_dir) / MANIFEST).is_file()
