"""Environment defaults for every flow (telemetry off, offline datasets, a patient temporary
Prefect server), each set only if the user has not set it.

Standard library only, and imported before prefect: Prefect reads its settings when it is first
imported, so a default set after that (as ``flows.common`` imports prefect) would be ignored; the
ephemeral server's startup timeout then stayed at 20 s and the pipeline failed on a busy machine.
"""

from __future__ import annotations

import os

TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # The temporary (ephemeral) API server needs more than the 20 s default on a busy 2-core box.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def quiet_defaults() -> None:
    """Telemetry off unless the user chose otherwise (each variable only if unset)."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
