"""Suite-wide settings: offline, quiet telemetry, deterministic threads; an empty run fails loudly."""

import os
import tempfile

# No network at test time: every hub/telemetry lookup is disabled before any library is imported.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prefect keeps its database and result cache under PREFECT_HOME: one throwaway home per session.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="gptflow-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def pytest_sessionfinish(session, exitstatus):
    # pytest exits 5 when it collects nothing; CI must not mistake an empty run for a pass or a crash.
    if session.testscollected == 0:
        print("\nno tests were collected: failing on purpose (check tests/ and the -k/-m filters)")
        session.exitstatus = 1
