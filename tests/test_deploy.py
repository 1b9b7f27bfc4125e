"""deploy/prefect.yaml: every deployment loads as a flow that accepts its parameters, every flow is
deployed; then against a real Prefect server on loopback: deploy, schedule, worker, run."""

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
import yaml

from gpt.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sysconfig.get_path("scripts")) / "prefect")
DEPLOYMENTS = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text(encoding="utf-8"))["deployments"]
STAGES = ("tokenizer", "shard", "pretrain", "finetune", "evaluate", "export")


def load_entrypoint(entrypoint: str, monkeypatch):
    """The flow as a process worker loads it: the entrypoint's file, from the repository root."""
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)
    return load_flow_from_entrypoint(entrypoint)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_deployment_entrypoint_is_a_flow_that_accepts_its_parameters(deployment, monkeypatch):
    from prefect import Flow
    from prefect.utilities.callables import parameter_schema

    flow = load_entrypoint(deployment["entrypoint"], monkeypatch)
    assert isinstance(flow, Flow)
    schema = parameter_schema(flow).model_dump()
    params = deployment.get("parameters") or {}
    assert set(params) <= set(schema["properties"]), "a parameter the flow does not take"
    # The UI's form asks for the required inputs (paths to earlier outputs) the YAML leaves unset.
    required = {name: "some/path" for name in schema.get("required", []) if name not in params}
    flow.validate_parameters({**required, **params})  # raises on a wrong type or a value out of range


def test_every_flow_in_flows_is_deployed():
    import importlib
    import pkgutil

    from prefect import Flow

    import flows

    defined = set()
    for info in pkgutil.iter_modules(flows.__path__):
        module = importlib.import_module(f"flows.{info.name}")
        defined |= {
            f"flows/{info.name}.py:{name}"
            for name, obj in vars(module).items()
            if isinstance(obj, Flow) and obj.fn.__module__ == module.__name__
        }
    assert defined == {d["entrypoint"] for d in DEPLOYMENTS}


@pytest.mark.parametrize("entrypoint", ["flows/pipeline.py:pipeline", "flows/pretrain.py:pretrain_flow"])
def test_preset_renders_as_a_choice_of_the_config_presets(entrypoint, monkeypatch):
    from prefect.utilities.callables import parameter_schema

    preset = parameter_schema(load_entrypoint(entrypoint, monkeypatch)).model_dump()["properties"]["preset"]
    assert preset["enum"] == list(PRESETS)


def test_a_stage_deployment_fingerprints_its_stage_as_the_pipeline_does(monkeypatch):
    """Prefect runs ``flows/shard.py`` as a module named ``shard``; its task's code identity (and so its
    output directory and cache key) must still be ``flows.shard``'s, the module the pipeline imports."""
    from flows.caching import stage_module
    from flows.shard import shard_task

    loaded = load_entrypoint("flows/shard.py:shard_flow", monkeypatch).fn.__globals__["shard_task"]
    assert loaded.fn.__module__ != "flows.shard"  # the premise: a module loaded from its file
    assert stage_module(loaded.fn) == stage_module(shard_task.fn) == "flows.shard"


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
        assert set(deployments) == {"pipeline", "retrain", *STAGES}
        assert deployments["retrain"]["crons"] == ["0 3 * * 1"]
        assert all(deployments[name]["crons"] == [] for name in ("pipeline", *STAGES))
        retrain = deployments["retrain"]["parameters"]
        assert retrain["init_from"] == "models:/gptflow-lm@champion" and retrain["corpus"] != "bbc"
        assert all(d["pool"] == "gptflow" for d in deployments.values())

        start([PREFECT, "worker", "start", "--pool", "gptflow"], "worker", env)
        work = tmp_path / "work"
        cli(
            "deployment", "run", "pipeline/pipeline",
            "--param", "preset=tiny",
            "--param", "tasks=[]",  # the language model alone: the deployment, not finetuning, is on test
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
