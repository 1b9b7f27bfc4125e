"""Which bundle a command uses when none is named: the newest pipeline output in ``./artifacts``.

Torch-free (stdlib only), so ``gptflow generate`` / ``classify`` still run where torch is absent.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gpt.bundle import BUNDLE_DIR, CONFIG_FILE, BundleConfig
from gpt.io import MANIFEST

LM_NAME = "gptflow-lm"  # what the pipeline registers its language model as (flows.tracking.LM_MODEL_NAME)

log = logging.getLogger(__name__)


def _kind(bundle: Path) -> str | None:
    try:
        return BundleConfig.read(bundle).kind
    except (OSError, ValueError):
        return None


def resolve_bundle(path: str | Path | None, kind: str, workdir: str | Path = "artifacts") -> Path:
    """``path`` itself, the ``bundle/`` inside a stage directory, or (None) the newest finished
    export of ``kind`` (``lm`` or ``classifier``) under ``workdir``."""
    if path is not None:
        path = Path(path)
        if not (path / CONFIG_FILE).is_file() and (path / BUNDLE_DIR / CONFIG_FILE).is_file():
            return path / BUNDLE_DIR
        return path
    found = [
        b
        for b in Path(workdir).glob(f"export/*/{BUNDLE_DIR}")
        if (b.parent / MANIFEST).is_file() and _kind(b) == kind
    ]
    if not found:
        raise FileNotFoundError(
            f"no exported {kind} bundle under {Path(workdir).resolve()}; run `gptflow pipeline` here "
            "first, or pass --bundle DIR"
        )
    newest = max(found, key=lambda b: (b.parent / MANIFEST).stat().st_mtime_ns)
    log.warning("using %s (the newest %s bundle in %s; --bundle picks another)", newest, kind, workdir)
    return newest
