"""deploy/prefect.yaml against a real Prefect server on loopback: deploy, schedule, worker, run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sysconfig.get_path("scripts")) / "prefect")

# Reads deployments and waits for the newest run of pipeline/pipeline; prints JSON.
CLIENT_SCRIPT = """
import json, sys, time
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    if sys.argv[1] == "deployments":
        out = {}
        for d in client.read_deployments():
            crons = [getattr(s.schedule, "cron", None) for s in (d.schedules or [])]
            out[d.name] = {"entrypoint": d.entrypoint, "pool": d.work_pool_name, "crons": crons,
                           "parameters": d.parameters}
        print(json.dumps(out))
    else:
        deadline = time.time() + float(sys.argv[2])
        dep = client.read_deployment_by_name("pipeline/pipeline")
        while True:
            runs = client.read_flow_runs()
            runs = [r for r in runs if r.deployment_id == dep.id]
            state = runs[0].state if runs else None
            if state is not None and state.is_final():
                print(json.dumps({"state": state.name, "message": state.message}))
                break
            if time.time() > deadline:
                print(json.dumps({"state": state.name if state else None, "message": "timed out"}))
                break
            time.sleep(2)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout} s")


@pytest.mark.slow
def test_prefect_yaml_deploys_schedules_and_runs_on_a_process_worker(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PWD": str(ROOT),  # deploy/prefect.yaml's pull step resolves {{ $PWD }} at deploy time
    }
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(args: list[str], name: str, environ: dict) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            args, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        procs.append(proc)
        return proc

    def cli(*args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            [PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def client(*args: str, timeout: float = 60) -> dict:
        done = subprocess.run(
            [sys.executable, "-c", CLIENT_SCRIPT, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    try:
        server = start(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], "server", server_env
        )
        wait_healthy(api, server, timeout=180)
        cli("work-pool", "create", "gptflow", "--type", "process")
        cli("--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml", timeout=300)

        deployments = client("deployments")
        assert set(deployments) == {"pipeline", "retrain"}
        assert deployments["retrain"]["crons"] == ["0 3 * * 1"]
        assert deployments["pipeline"]["crons"] == []
        retrain = deployments["retrain"]["parameters"]
        assert retrain["init_from"] == "models:/gptflow-lm@champion" and retrain["corpus"] != "bbc"
        assert all(d["pool"] == "gptflow" for d in deployments.values())

        start([PREFECT, "worker", "start", "--pool", "gptflow"], "worker", env)
        work = tmp_path / "work"
        cli(
            "deployment", "run", "pipeline/pipeline",
            "--param", "preset=tiny",
            "--param", 'tasks=["qa"]',
            "--param", "finetune_epochs=1",
            "--param", f"workdir={work / 'artifacts'}",
            "--param", f"mlruns={work / 'mlruns'}",
        )  # fmt: skip
        final = client("wait", "600", timeout=660)
        worker_log = (logs / "worker.log").read_text()[-3000:]
        assert final["state"] == "Completed", f"{final}\n--- worker log ---\n{worker_log}"
        assert any((work / "artifacts" / "export").glob("*/bundle/model.onnx"))
    finally:
        for proc in procs:  # every process this test started, by PID (their whole process groups)
            with_group = proc.poll() is None
            if with_group:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
