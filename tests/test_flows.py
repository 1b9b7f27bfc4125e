"""The main job end to end: `gptflow pipeline --preset tiny` with Prefect caching and MLflow tracking."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

from flows.caching import fingerprint, stage_dir
from gpt.io import write_manifest
from gptflow.cli import main as cli

# Small enough for CI: the tiny preset, two task kinds, short finetuning.
TASKS = ["bbc-topic", "qa"]


def test_fingerprint_follows_config_and_input_manifests(tmp_path):
    data = tmp_path / "shards"
    write_manifest(data, tokenizer="a")
    base = fingerprint("pretrain", config={"lr": 1.0}, data=str(data))
    assert fingerprint("pretrain", config={"lr": 1.0}, data=str(data)) == base
    assert fingerprint("pretrain", config={"lr": 2.0}, data=str(data)) != base
    write_manifest(data, tokenizer="b")  # new input content under the same path
    assert fingerprint("pretrain", config={"lr": 1.0}, data=str(data)) != base


def test_stage_dir_ignores_where_and_under_which_run(tmp_path):
    a = stage_dir("shard", tmp_path, corpus="bbc", parent_run_id="run-1")
    b = stage_dir("shard", tmp_path, corpus="bbc", parent_run_id="run-2")
    assert a == b and a.parent == tmp_path / "shard"


def pipeline_args(root: Path, tasks: list[str], *extra: str) -> list[str]:
    args = ["pipeline", "--preset", "tiny", "--tasks", *tasks, "--finetune-epochs", "1"]
    return args + ["--workdir", str(root / "artifacts"), "--mlruns", str(root / "mlruns"), *extra]


def run_pipeline(root: Path, *extra: str, tasks: list[str] = TASKS) -> tuple[dict, float]:
    """Run the CLI in-process; returns its JSON result and the wall time."""
    buf = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        assert cli([*pipeline_args(root, tasks, *extra), "--json"]) == 0
    return json.loads(buf.getvalue()), time.perf_counter() - t


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    result, elapsed = run_pipeline(root)
    return root, result, elapsed


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_tracks_it_in_mlflow(first_run):
    import mlflow
    from mlflow import MlflowClient

    root, result, _ = first_run
    assert set(result["states"].values()) == {"Completed"}
    expected = {"tokenizer", "shard", "pretrain", "export:lm"} | {
        f"{s}:{t}" for t in TASKS for s in ("finetune", "evaluate")
    }
    assert expected <= set(result["states"])
    assert "export:bbc-topic" in result["states"]  # classifiers are exported and registered too

    client = MlflowClient()
    parent = client.get_run(result["run_id"])
    assert parent.info.experiment_id == mlflow.get_experiment_by_name("gptflow").experiment_id
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result['run_id']}'"
    )
    stages = {r.data.tags["gptflow.stage"] for r in children}
    assert {
        "tokenizer",
        "shard",
        "pretrain",
        "finetune:bbc-topic",
        "evaluate:qa",
        "export",
        "register:gptflow-lm",
        "register:gptflow-bbc-topic",
    } <= stages
    assert parent.data.params["preset"] == "tiny" and "train.lr" in parent.data.params
    assert "lm.val_bpb" in parent.data.metrics and "bbc-topic.model.accuracy" in parent.data.metrics

    pretrain = next(r for r in children if r.data.tags["gptflow.stage"] == "pretrain")
    assert len(client.get_metric_history(pretrain.info.run_id, "train_loss")) > 10  # a per-step curve
    assert "best_val_bpb" in pretrain.data.metrics
    artifacts = {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    assert {"loss_curve.png", "checkpoint"} <= artifacts
    evaluation = next(r for r in children if r.data.tags["gptflow.stage"] == "evaluate:bbc-topic")
    eval_files = {a.path for a in client.list_artifacts(evaluation.info.run_id, "evaluation")}
    assert "evaluation/metrics.json" in eval_files and "evaluation/confusion_matrix.png" in eval_files

    champion = client.get_model_version_by_alias("gptflow-lm", "champion")
    assert champion.tags["promotion.alias"] == "champion"
    model = mlflow.pyfunc.load_model("models:/gptflow-lm@champion")
    texts = model.predict(["The market"], params={"max_new_tokens": 8})
    assert len(texts) == 1 and isinstance(texts[0], str) and texts[0]


@pytest.mark.slow
def test_report_and_summary_show_the_numbers_of_metrics_json(first_run):
    from prefect.artifacts import Artifact

    from flows.pipeline import REPORT_KEY, render_summary

    root, result, _ = first_run
    report = Artifact.get(REPORT_KEY).data
    summary = render_summary(result)
    for task in TASKS:
        ev = json.loads(
            (Path(result["results"]["tasks"][task]["evaluate"]["dir"]) / "metrics.json").read_text()
        )
        metric = ev["primary_metric"]
        value = f"{ev['metrics'][metric]:.4f}"
        assert f"| {task} | {metric} | {value} |" in report
        assert any(line.split()[:3] == [task, metric, value] for line in summary.splitlines())
        for name, baseline in ev["baselines"].items():
            assert f"{name} {baseline[metric]:.4f}" in report and f"{name} {baseline[metric]:.4f}" in summary
    bpb = f"{json.loads((Path(result['results']['pretrain']['dir']) / 'manifest.json').read_text())['metrics']['best_val_bpb']:.4f}"
    assert f"val bits per byte: **{bpb}**" in report and f"val bits per byte {bpb}" in summary
    assert f"gptflow generate --bundle {result['results']['export_lm']['bundle']}" in summary


def newest_lm_bundle(root: Path, result: dict) -> Path:
    """The first run's LM bundle, as a command run in ``root`` names it (these tests run before the
    re-runs below, so it is still the newest)."""
    return Path(result["results"]["export_lm"]["bundle"]).relative_to(root.resolve())


@pytest.mark.slow
def test_generate_without_bundle_uses_the_newest_pipeline_lm_bundle(first_run, monkeypatch, capsys, caplog):
    root, result, _ = first_run
    monkeypatch.chdir(root)  # where the pipeline ran: its outputs are in ./artifacts
    assert cli(["generate", "The market", "-n", "6"]) == 0
    assert capsys.readouterr().out.strip()
    assert f"using {newest_lm_bundle(root, result)} " in caplog.text  # it says which bundle it took


@pytest.mark.slow
def test_serve_without_bundle_serves_the_newest_pipeline_lm_bundle(first_run, monkeypatch, caplog):
    import deploy.server
    from flows.tracking import LM_MODEL_NAME

    root, result, _ = first_run
    served = []
    monkeypatch.setattr(deploy.server, "serve", lambda app, config, **kw: served.append(app))
    monkeypatch.chdir(root)
    assert cli(["serve", "--port", "0"]) == 0
    assert f"using {newest_lm_bundle(root, result)} " in caplog.text
    # Under the name the registry and the README's OpenAI example use, not the folder's (`bundle`).
    assert served[0].state.models.ids() == [LM_MODEL_NAME]


@pytest.mark.slow
def test_bundle_may_name_the_export_stage_directory(first_run, monkeypatch, capsys):
    import deploy.server

    root, result, _ = first_run
    lm_stage = result["results"]["export_lm"]["dir"]
    topic_stage = result["results"]["tasks"]["bbc-topic"]["export"]["dir"]
    assert cli(["generate", "--bundle", lm_stage, "The market", "-n", "6"]) == 0
    assert capsys.readouterr().out.strip()
    assert cli(["classify", "--bundle", topic_stage, "Arsenal won the cup final"]) == 0
    labels = json.loads((Path(topic_stage) / "bundle" / "config.json").read_text())["labels"]
    assert json.loads(capsys.readouterr().out)["label"] in labels
    served = []
    monkeypatch.setattr(deploy.server, "serve", lambda app, config, **kw: served.append(app))
    assert cli(["serve", "--bundle", lm_stage, "--classifier", topic_stage, "--port", "0"]) == 0
    assert len(served[0].state.models.ids()) == 2  # the language model and the classifier


@pytest.mark.slow
def test_stage_flows_reuse_the_pipelines_finished_outputs(first_run):
    from flows.shard import shard_flow
    from flows.tokenizer import tokenizer_flow

    root, _, _ = first_run
    where = dict(workdir=str(root / "artifacts"), mlruns=str(root / "mlruns"))
    before = sorted((root / "artifacts").glob("*/*"))
    tok = tokenizer_flow(corpus="bbc", vocab_size=512, **where)  # the tiny preset's vocabulary
    shards = shard_flow(tokenizer=tok["dir"], corpus="bbc", **where)
    assert sorted((root / "artifacts").glob("*/*")) == before  # nothing new: the same fingerprints
    assert {Path(tok["dir"]), Path(shards["dir"])} <= set(before)


@pytest.mark.slow
def test_rerun_is_fully_cached_and_5x_faster(first_run):
    root, first, first_s = first_run
    result, elapsed = run_pipeline(root)
    assert set(result["states"].values()) == {"Cached"}, result["states"]
    assert elapsed * 5 <= first_s, f"re-run took {elapsed:.1f} s vs first {first_s:.1f} s"
    assert result["results"]["pretrain"]["best"] == first["results"]["pretrain"]["best"]


@pytest.mark.slow
def test_worse_model_does_not_take_the_champion_alias(first_run):
    from mlflow import MlflowClient

    root, first, _ = first_run
    before = MlflowClient().get_model_version_by_alias("gptflow-lm", "champion").version
    result, _ = run_pipeline(root, "--pretrain-steps", "3", tasks=[])  # the LM alone is what is promoted
    promo = result["results"]["registry"]["gptflow-lm"]
    assert promo["alias"] == "challenger" and promo["candidate"] > promo["champion_before"]
    assert promo["champion_version_before"] == int(before)  # re-scored on this run's eval set
    client = MlflowClient()
    assert client.get_model_version_by_alias("gptflow-lm", "champion").version == before  # unchanged
    assert int(client.get_model_version_by_alias("gptflow-lm", "challenger").version) == promo["version"]


@pytest.mark.slow
def test_failing_stage_fails_the_flow_and_a_fixed_rerun_resumes_after_it(first_run, tmp_path, capsys):
    root, first, _ = first_run
    task_file = tmp_path / "topics.csv"
    # Valid columns, but the test split holds a label the model never saw: finetuning must refuse.
    rows = ["text,label,split"] + [f"sport news number {i},sport,train" for i in range(12)]
    rows += [f"market news number {i},business,train" for i in range(12)]
    rows += ["sport news again,sport,val", "market news again,business,val", "a cooking article,food,test"]
    task_file.write_text("\n".join(rows) + "\n")
    assert cli(pipeline_args(root, [str(task_file)])) != 0
    assert "food" in capsys.readouterr().err  # the message names the unknown label
    assert (
        Path(first["results"]["pretrain"]["best"]) / "model.safetensors"
    ).is_file()  # earlier outputs intact

    task_file.write_text(
        task_file.read_text().replace("a cooking article,food,test", "sport again,sport,test")
    )
    fixed, _ = run_pipeline(root, tasks=[str(task_file)])
    assert fixed["states"]["tokenizer"] == fixed["states"]["shard"] == fixed["states"]["pretrain"] == "Cached"
    assert fixed["states"][f"finetune:{task_file.stem}"] == "Completed"


@pytest.mark.slow
def test_mlflow_models_serve_returns_generated_text(first_run):
    root, _, _ = first_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scripts = sysconfig.get_path("scripts")  # mlflow starts `uvicorn` from PATH: this environment's
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
        "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")]),
    }
    mlflow_cli = str(Path(scripts) / "mlflow")
    args = [mlflow_cli, "models", "serve", "-m", "models:/gptflow-lm@champion", "--env-manager", "local"]
    proc = subprocess.Popen(
        [*args, "--host", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "mlflow models serve did not come up"
                time.sleep(1)
        body = json.dumps({"inputs": ["The market"], "params": {"max_new_tokens": 6}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            predictions = json.loads(r.read())["predictions"]
        assert len(predictions) == 1 and isinstance(predictions[0], str) and predictions[0]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
