"""Evaluation: metric functions on hand-checked examples, batched greedy decoding, reports and baselines."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from test_finetune import keyword_rows, make_checkpoint, write_csv
from test_tasks import write_jsonl

from gpt.checkpoint import load_model, save_model
from gpt.evaluate import evaluate, evaluate_pretrained, greedy_complete, lead1
from gpt.generate import generate
from gpt.metrics import (
    accuracy,
    bleu,
    chrf,
    classification_metrics,
    completion_metrics,
    exact_match,
    macro_f1,
    rouge,
    token_f1,
)
from gpt.tasks import Example, Task
from gpt.tokenizer import Tokenizer

# ------------------------------------------------------------------------------------------------
# Metrics


def test_classification_metrics_on_a_hand_checked_example():
    y_true = ["a", "a", "b", "b", "c"]
    y_pred = ["a", "b", "b", "b", "a"]
    assert accuracy(y_true, y_pred) == pytest.approx(3 / 5)
    # F1 per class: a: P=1/2 R=1/2 -> 1/2; b: P=2/3 R=1 -> 4/5; c: 0.  Macro = 1.3 / 3.
    assert macro_f1(y_true, y_pred) == pytest.approx(1.3 / 3)
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_squad_exact_match_and_token_f1():
    assert exact_match("The  Eiffel tower!", "eiffel Tower") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    # pred tokens {cat, sat}, ref {cat, sat, down}: P = 1, R = 2/3, F1 = 0.8
    assert token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0


def test_rouge_bleu_chrf_on_hand_checked_examples():
    r = rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert r == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    # unigrams: pred {police, kill, gunman} vs ref {gunman, kill, police}: R1 = 1; bigrams share none.
    r = rouge(["police kill gunman"], ["gunman kill police"])
    assert r["rouge1"] == pytest.approx(1.0) and r["rouge2"] == 0.0 and r["rougeL"] == pytest.approx(1 / 3)
    assert bleu(["a b c d e f"], ["a b c d e f"]) == pytest.approx(100.0)
    assert bleu(["x y z w"], ["a b c d"]) == pytest.approx(0.0)
    assert chrf(["bonjour"], ["bonjour"]) == pytest.approx(100.0)
    assert 0 < chrf(["bonjour monde"], ["bonjour le monde"]) < 100
    assert bleu(["我爱北京"], ["我爱北京"]) == pytest.approx(100.0)  # Chinese is split into characters
    assert list(completion_metrics(["token_f1", "exact_match"], ["x"], ["x"])) == ["token_f1", "exact_match"]
    with pytest.raises(ValueError, match="pair up"):
        bleu(["a"], ["a", "b"])


def test_lead1_cuts_the_first_sentence_to_the_median_headline_length():
    train = [Example("", "one two three"), Example("", "a b c"), Example("", "x y z w v")]
    test = [Example("Shares rose sharply on Monday. Then they fell.", "?"), Example("Short one! More.", "?")]
    assert lead1(train, test) == ["Shares rose sharply", "Short one!"]


# ------------------------------------------------------------------------------------------------
# Decoding and LM quality


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    rows = keyword_rows(200)
    return make_checkpoint(tmp_path_factory.mktemp("lm"), [r["text"] for r in rows], seed=1)


def test_batched_greedy_matches_one_prompt_at_a_time(lm_dir):
    model, _ = load_model(lm_dir)
    tok = Tokenizer(lm_dir)
    task = Task(
        "t", "completion", "x.jsonl", ("exact_match",), prompt_template="{input}:", max_target_tokens=12
    )
    inputs = ["the apple", "a truck is in the", "dog", "to be or not to be that is"]
    batched = greedy_complete(model, tok, task, inputs, batch_size=4)
    for text, got in zip(inputs, batched, strict=True):
        prompt = [tok.eos_id, *tok.encode(text), *tok.encode(":")]
        alone = generate(
            model,
            prompt,
            max_new_tokens=12,
            stop_token_ids=(tok.eos_id,),
            no_repeat_ngram_size=task.no_repeat_ngram_size,
        )
        assert got == tok.decode(alone).strip()


def test_bits_per_byte_is_nats_over_bytes(lm_dir):
    model, _ = load_model(lm_dir)
    tok = Tokenizer(lm_dir)
    texts = ["the car is in the truck", "a cat"]
    got = evaluate_pretrained(lm_dir, texts)
    # Direct computation: each text on its own after EOS, every text token predicted once, EOS never.
    nats, n = 0.0, 0
    for text in texts:
        ids = [tok.eos_id, *tok.encode(text)]
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]]))[0]
        nats += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
        n += len(ids) - 1
    n_bytes = sum(len(t.encode()) for t in texts)
    assert got["n_tokens"] == n and got["n_bytes"] == n_bytes
    assert got["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nats / n), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Reports


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """An untrained 3-class classifier checkpoint over the keyword task file (evaluation needs no training)."""
    root = tmp_path_factory.mktemp("clf")
    rows = keyword_rows(240)
    task_file = write_csv(root / "keywords.csv", rows)
    pre = make_checkpoint(root, [r["text"] for r in rows])
    model, meta = load_model(pre, n_classes=3)
    save_model(
        root / "clf", model, tokenizer_hash=meta["tokenizer_hash"], labels=["animal", "fruit", "vehicle"]
    )
    shutil.copyfile(pre / "tokenizer.model", root / "clf" / "tokenizer.model")
    return task_file, root / "clf"


def test_classification_report_has_metrics_baseline_plot_and_samples(classifier, tmp_path):
    task_file, ckpt = classifier
    report = evaluate(str(task_file), ckpt, tmp_path / "ev", precision="fp32")
    assert set(report["metrics"]) >= {"accuracy", "macro_f1", "confusion_matrix"}
    assert sum(map(sum, report["metrics"]["confusion_matrix"])) == report["n_test"] == report["n_scored"]
    base = report["baselines"]["tfidf_logreg"]
    assert base["accuracy"] == 1.0  # the keyword decides the label: TF-IDF + LR finds it
    written = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert written["metrics"]["accuracy"] == report["metrics"]["accuracy"]
    assert (tmp_path / "ev" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "ev" / "samples.md").read_text().startswith("| input | expected | predicted |")
    assert json.loads((tmp_path / "ev" / "manifest.json").read_text())["stage"] == "evaluate"


def test_unknown_label_at_test_time_is_a_clear_error(classifier, tmp_path):
    task_file, ckpt = classifier
    rows = keyword_rows(240)
    for r in rows:
        if r["label"] == "animal":
            r["label"] = "mammal"
    other = write_csv(tmp_path / "renamed.csv", rows)
    with pytest.raises(ValueError, match=r"'mammal'.*not among the classifier's labels"):
        evaluate(str(other), ckpt, tmp_path / "ev")
    assert not (tmp_path / "ev" / "manifest.json").exists()


def test_completion_report_scores_the_untuned_model_as_a_baseline(lm_dir, tmp_path):
    rows = [
        {"prompt": f"{w} {w} item{i}{w[0]}", "completion": w} for i in range(60) for w in ("apple", "car")
    ]
    path = write_jsonl(tmp_path / "echo.jsonl", rows)
    report = evaluate(
        str(path), lm_dir, tmp_path / "ev", pretrained_dir=lm_dir, max_examples=10, precision="fp32"
    )
    assert report["n_scored"] == 10 and report["n_test"] >= 10
    assert set(report["baselines"]) == {"nearest_train", "pretrained"}
    assert report["baselines"]["pretrained"] == report["metrics"]  # the same model twice: the same scores
    # The nearest train prompt shares the keyword, and its completion is the keyword.
    assert report["baselines"]["nearest_train"]["chrf"] == pytest.approx(100.0)
    assert report["pretrained_lm"]["bpb"] > 0
    probe = report["copy_probe"]
    assert probe["pretrained"] == probe["finetuned"]  # again one model: one probe (fixed seed)
    assert probe["finetuned"]["first"] > 0
    assert (tmp_path / "ev" / "samples.csv").is_file()
