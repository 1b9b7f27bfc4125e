"""Task registry and loaders: user CSV/JSONL files, deterministic leak-free splits, clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from gpt.corpora import load_corpus, split_of
from gpt.tasks import TASKS, Task, check_labels, get_task, load_task_splits


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_builtin_tasks_cover_classification_and_completion():
    assert {"bbc-topic", "zh-sentiment", "bbc-headline", "qa"} <= set(TASKS)
    assert TASKS["bbc-topic"].kind == "classification" and TASKS["bbc-headline"].kind == "completion"
    assert TASKS["bbc-headline"].primary_metric.startswith("rouge")
    assert {"exact_match", "token_f1"} <= set(TASKS["qa"].metrics)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")


def test_csv_classification_file_loads_with_deterministic_disjoint_splits(tmp_path):
    rows = [[f"text number {i}", "odd" if i % 2 else "even"] for i in range(300)]
    rows += [["text number 7", "odd"], ["same text twice", "a"], ["same text twice", "b"]]
    path = write_csv(tmp_path / "mine.csv", ["text", "label"], rows)
    task = get_task(str(path))
    assert (task.kind, task.name, task.metrics[0]) == ("classification", "mine", "accuracy")
    splits = load_task_splits(task)
    assert splits == load_task_splits(str(path))  # deterministic
    inputs = [[e.input for e in splits[s]] for s in ("train", "val", "test")]
    assert sum(map(len, inputs)) == 300  # the exact duplicate is dropped once, the conflicting pair twice
    assert not (
        set(inputs[0]) & set(inputs[1]) or set(inputs[0]) & set(inputs[2]) or set(inputs[1]) & set(inputs[2])
    )
    for e in splits["test"]:  # splits follow the content hash, so they stay put as the file grows
        assert split_of(e.input, task.val_fraction, task.test_fraction) == "test"


def test_jsonl_completion_file_loads_and_honours_a_split_column(tmp_path):
    rows = [
        {"prompt": f"hello {i}", "completion": f"bonjour {i}", "split": ["train", "val", "test"][i % 3]}
        for i in range(30)
    ]
    path = write_jsonl(tmp_path / "fr.jsonl", rows)
    task = get_task(path)
    assert task.kind == "completion" and set(task.metrics) == {"bleu", "chrf"}
    splits = load_task_splits(task)
    assert [e.input for e in splits["val"]] == [f"hello {i}" for i in range(1, 30, 3)]
    assert splits["test"][0].target == "bonjour 2"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_file_missing_needed_columns_is_a_clear_error(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    if suffix == ".csv":
        write_csv(path, ["sentence", "label"], [["x", "y"]])
    else:
        write_jsonl(path, [{"sentence": "x", "label": "y"}])
    with pytest.raises(ValueError, match=r"bad\..*found columns \['label', 'sentence'\].*'text' and 'label'"):
        get_task(str(path))


def test_missing_task_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        get_task(str(tmp_path / "absent.csv"))


def test_empty_split_is_a_clear_error(tmp_path):
    rows = [
        {"text": f"t{i}", "label": "a" if i % 2 else "b", "split": "train" if i % 3 else "val"}
        for i in range(12)
    ]
    path = write_jsonl(tmp_path / "notest.jsonl", rows)
    with pytest.raises(ValueError, match="notest.*the test split is empty"):
        load_task_splits(str(path))


def test_unknown_labels_are_a_clear_error():
    from gpt.tasks import Example

    with pytest.raises(ValueError, match=r"label\(s\) 'neutral' \(2x\) not among the classifier's labels"):
        check_labels(
            [Example("x", "neutral"), Example("y", "neutral"), Example("z", "pos")], ["neg", "pos"], "test"
        )


def test_task_rejects_metrics_of_the_other_kind():
    with pytest.raises(ValueError, match="invalid for classification"):
        Task("t", "classification", "x.csv", ("rougeL",))


def test_bbc_tasks_test_articles_are_held_out_of_pretraining():
    # Pretraining shards hold out split_of(doc.text, 0.05, 0.05) == "test"; task test sets must be inside it.
    held_out = {d.text for d in load_corpus("bbc") if split_of(d.text, 0.05, 0.05) == "test"}
    topic = load_task_splits("bbc-topic")
    assert {e.input for e in topic["test"]} <= held_out
    assert not {e.input for e in topic["train"]} & held_out
    headline = load_task_splits("bbc-headline")
    bodies = {d.meta["body"] for d in load_corpus("bbc") if d.text in held_out}
    assert {e.input for e in headline["test"]} <= bodies
    assert all("\n" not in e.target for e in headline["test"])  # the headline, not the body
