"""Evaluation of a finetuned model on its task's test split, with a baseline scored on the same split.

Baselines: TF-IDF + logistic regression for classification (character n-grams for Chinese);
for completion tasks the un-finetuned pretrained model, the nearest train prompt's completion, and
for headlines lead-1 (the article's first sentence cut to the median headline length). The
pretrained model's bits per byte and perplexity on the held-out text are reported too, and for
completion tasks how well each model copies from its context (``gpt.scoring.copy_probe``).

    out_dir/metrics.json   out_dir/samples.md + samples.csv   out_dir/confusion_matrix.png (classification)
    out_dir/manifest.json  written last
"""

from __future__ import annotations

import csv
import io
import logging
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt.metrics import classification_metrics, completion_metrics
from gpt.task_data import EOS_ID, classification_windows, encode_prompt
from gpt.tasks import Example, Task, check_labels, get_task, load_task_splits

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Model predictions


def predict_classes(
    model,
    tokenizer,
    task: Task,
    texts: Sequence[str],
    max_len: int,
    batch_size: int = 32,
    amp=None,
    windows: int = 1,
) -> list[int]:
    """Class ids; a text longer than one window is read in up to ``windows`` windows (mean log-probs)."""
    from gpt.task_model import class_log_probs

    device = next(model.parameters()).device
    groups = [classification_windows(tokenizer, task, t, max_len, windows) for t in texts]
    return class_log_probs(model, groups, batch_size, device, amp).argmax(-1).tolist()


def _newline_ids(tokenizer) -> set[int]:
    return {i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i])}


def greedy_complete(
    model,
    tokenizer,
    task: Task,
    inputs: Sequence[str],
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    amp=None,
) -> list[str]:
    """Greedy completions through ``gpt.generate.generate_batch`` (left-padded batches, KV cache).

    Each prompt is cut so that prompt + new tokens fit in the context. Generation stops at EOS
    (and, for single-line tasks, at the first newline); the prefix added in training is stripped.
    """
    from gpt.device import autocast
    from gpt.generate import SamplingConfig, generate_batch

    device = next(model.parameters()).device
    # Short contexts (tests, tiny models) split the window: at most half of it for new tokens.
    max_new = min(max_new_tokens or task.max_target_tokens, model.config.block_size // 2)
    budget = min(task.max_input_tokens, model.config.block_size - max_new)
    prompts = [encode_prompt(tokenizer, task, x, budget) for x in inputs]
    stops = _newline_ids(tokenizer) if task.single_line else set()
    cfg = SamplingConfig(
        max_new_tokens=max_new,
        stop_token_ids=tuple(sorted(stops | {EOS_ID})),
        no_repeat_ngram_size=task.no_repeat_ngram_size,
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: little padding
    outputs: list[list[int]] = [[] for _ in prompts]
    with autocast(device, amp):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            for i, ids in zip(rows, generate_batch(model, [prompts[i] for i in rows], cfg), strict=True):
                outputs[i] = ids
    return [_clean(tokenizer.decode(ids), task) for ids in outputs]


def _clean(text: str, task: Task) -> str:
    if task.single_line:
        text = text.split("\n", 1)[0]
    return text.strip()


# ------------------------------------------------------------------------------------------------
# Language-model quality of the pretrained model


def evaluate_pretrained(
    checkpoint_dir: str | Path,
    texts: Sequence[str] | str,
    batch_size: int = 16,
    device: str = "auto",
    max_tokens: int = 200_000,
) -> dict[str, float]:
    """Bits per byte and perplexity on held-out ``texts``: ``gpt.scoring.score_texts`` (each text
    after EOS, as in pretraining; bits per byte as gpt.scoring defines it), whole texts up to
    ``max_tokens`` tokens."""
    from gpt.checkpoint import load_model
    from gpt.device import resolve_device
    from gpt.scoring import score_texts
    from gpt.tokenizer import MODEL_FILE, Tokenizer

    if isinstance(texts, str):
        texts = [texts]
    checkpoint_dir = Path(checkpoint_dir)
    model, _ = load_model(checkpoint_dir, resolve_device(device))
    tokenizer = Tokenizer(checkpoint_dir / MODEL_FILE)
    return score_texts(model, tokenizer, texts, batch_size, max_tokens)


# ------------------------------------------------------------------------------------------------
# Baselines


def tfidf_logreg(task: Task, train: list[Example], test: list[Example]) -> list[str]:
    """TF-IDF + logistic regression: word 1-2 grams, or character 1-3 grams for Chinese."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    if task.language == "zh":
        vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2)
    else:
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    X = vec.fit_transform([e.input for e in train])
    clf = LogisticRegression(C=10.0, max_iter=2000)
    clf.fit(X, [e.target for e in train])
    return list(clf.predict(vec.transform([e.input for e in test])))


def nearest_train(train: list[Example], test: list[Example]) -> list[str]:
    """The completion of the most similar train prompt (TF-IDF cosine): a retrieval baseline."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    X = vec.fit_transform([e.input for e in train])
    sims = vec.transform([e.input for e in test]) @ X.T
    best = sims.argmax(axis=1).A.ravel()
    return [train[int(i)].target for i in best]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def lead1(train: list[Example], test: list[Example]) -> list[str]:
    """First sentence of the input, cut to the median train target length in words."""
    n_words = int(statistics.median(len(e.target.split()) for e in train))
    out = []
    for e in test:
        first = _SENTENCE_END.split(e.input.strip(), maxsplit=1)[0]
        out.append(" ".join(first.split()[:n_words]))
    return out


# ------------------------------------------------------------------------------------------------
# Reports


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gpt.io import atomic_write_bytes

    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.2 * n + 2))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = max(max(row) for row in matrix) or 1
    for i in range(n):
        for j in range(n):
            color = "white" if matrix[i][j] > peak / 2 else "black"
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center", color=color)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _short(text: str, n: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def write_samples(out_dir: Path, rows: list[dict[str, str]]) -> None:
    """samples.csv (full text) and samples.md (a readable table, inputs shortened)."""
    from gpt.io import atomic_write_text

    if not rows:
        return
    cols = list(rows[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, cols)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "samples.csv", buf.getvalue())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_short(r[c]).replace("|", "\\|") for c in cols) + " |")
    atomic_write_text(out_dir / "samples.md", "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------


def _load(checkpoint_dir: Path, device):
    from gpt.checkpoint import load_model
    from gpt.tokenizer import MODEL_FILE, Tokenizer

    model, meta = load_model(checkpoint_dir, device)
    return model, meta, Tokenizer(checkpoint_dir / MODEL_FILE)


def evaluate(
    task: Task | str,
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    pretrained_dir: str | Path | None = None,
    max_examples: int | None = None,
    batch_size: int = 32,
    n_samples: int = 20,
    device: str = "auto",
    precision: str = "auto",
) -> dict[str, Any]:
    """Score ``checkpoint_dir`` on the task's test split beside baselines; returns the metrics.json dict.

    ``pretrained_dir`` (default: the ``pretrained`` path recorded by finetuning, when it exists) gives
    the un-finetuned baseline and bits per byte. ``max_examples`` caps completion test examples
    (default: the task's ``max_eval_examples``); classification always scores the whole split.
    """
    from gpt.device import resolve_device, resolve_precision
    from gpt.io import atomic_write_json, write_manifest
    from gpt.scoring import copy_probe, copy_probe_fits

    t_start = time.perf_counter()
    task = get_task(task)
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    dev = resolve_device(device)
    amp = resolve_precision(precision, dev)
    model, meta, tokenizer = _load(checkpoint_dir, dev)
    if meta.get("task") not in (None, task.name):
        log.warning("%s was finetuned on %r, evaluating it on %r", checkpoint_dir, meta["task"], task.name)
    if pretrained_dir is None and meta.get("pretrained") and Path(meta["pretrained"]).is_dir():
        pretrained_dir = Path(meta["pretrained"])

    splits = load_task_splits(task)
    train, test = splits["train"], splits["test"]
    report: dict[str, Any] = {
        "task": task.name,
        "kind": task.kind,
        "checkpoint": str(checkpoint_dir),
        "pretrained": str(pretrained_dir) if pretrained_dir else None,
        "split": "test",
        "n_test": len(test),
        "primary_metric": task.primary_metric,
    }
    samples: list[dict[str, str]] = []
    t0 = time.perf_counter()
    if task.kind == "classification":
        labels = meta.get("labels")
        if not labels or model.score is None:
            raise ValueError(
                f"{checkpoint_dir} has no classifier labels; finetune it on {task.name!r} first "
                f"(gptflow finetune --task {task.name} --checkpoint ... --out ...)"
            )
        check_labels(test, labels, f"task {task.name!r} test split vs {checkpoint_dir}")
        max_len = meta.get("max_len") or min(task.max_input_tokens, model.config.block_size)
        windows = int(meta.get("windows") or 1)
        report["windows"] = windows
        pred_ids = predict_classes(
            model, tokenizer, task, [e.input for e in test], max_len, batch_size, amp, windows
        )
        preds = [labels[i] for i in pred_ids]
        truth = [e.target for e in test]
        report["n_scored"] = len(test)
        report["metrics"] = classification_metrics(truth, preds, labels)
        report["predict_seconds"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        base = tfidf_logreg(task, train, test)
        report["baselines"] = {
            "tfidf_logreg": {
                **classification_metrics(truth, base, labels),
                "features": "char 1-3 grams" if task.language == "zh" else "word 1-2 grams",
                "n_train": len(train),
                "seconds": round(time.perf_counter() - t0, 2),
            }
        }
        plot_confusion(
            report["metrics"]["confusion_matrix"],
            labels,
            out_dir / "confusion_matrix.png",
            f"{task.name}: accuracy {report['metrics']['accuracy']:.3f}",
        )
        samples = [
            {"input": e.input, "expected": e.target, "predicted": p, "tfidf_logreg": b}
            for e, p, b in list(zip(test, preds, base, strict=True))[:n_samples]
        ]
    else:
        limit = task.max_eval_examples if max_examples is None else max_examples
        scored = test[:limit] if limit else test
        inputs, refs = [e.input for e in scored], [e.target for e in scored]
        preds = greedy_complete(model, tokenizer, task, inputs, batch_size=batch_size, amp=amp)
        probe = copy_probe_fits(model)
        report["copy_probe"] = {"finetuned": copy_probe(model)} if probe else {}
        report["n_scored"] = len(scored)
        report["metrics"] = completion_metrics(task.metrics, preds, refs)
        report["predict_seconds"] = round(time.perf_counter() - t0, 2)
        baselines: dict[str, Any] = {}
        base_preds: dict[str, list[str]] = {"nearest_train": nearest_train(train, scored)}
        if task.name == "bbc-headline":
            base_preds["lead1"] = lead1(train, scored)
        if pretrained_dir is not None:
            t0 = time.perf_counter()
            pre_model, _, pre_tok = _load(Path(pretrained_dir), dev)
            base_preds["pretrained"] = greedy_complete(
                pre_model, pre_tok, task, inputs, batch_size=batch_size, amp=amp
            )
            log.info("un-finetuned model generated in %.1fs", time.perf_counter() - t0)
            if probe:
                report["copy_probe"]["pretrained"] = copy_probe(pre_model)
            del pre_model
        for name, bp in base_preds.items():
            baselines[name] = completion_metrics(task.metrics, bp, refs)
        report["baselines"] = baselines
        samples = [
            {
                "input": e.input,
                "expected": e.target,
                "predicted": p,
                **{k: v[i] for k, v in base_preds.items()},
            }
            for i, (e, p) in enumerate(list(zip(scored, preds, strict=True))[:n_samples])
        ]
    if pretrained_dir is not None:
        held_out = [e.input for e in test]
        report["pretrained_lm"] = {
            **evaluate_pretrained(pretrained_dir, held_out, device=device),
            "text": f"{task.name} test inputs",
        }
    write_samples(out_dir, samples)
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    atomic_write_json(out_dir / "metrics.json", report)
    primary = report["metrics"][task.primary_metric]
    log.info(
        "%s: %s %.4f; baselines %s",
        task.name,
        task.primary_metric,
        primary,
        ", ".join(f"{k} {v[task.primary_metric]:.4f}" for k, v in report["baselines"].items()),
    )
    outputs = [p.name for p in out_dir.iterdir() if p.is_file() and p.name != "manifest.json"]
    write_manifest(
        out_dir,
        stage="evaluate",
        task=task.name,
        inputs={"checkpoint": str(checkpoint_dir), "pretrained": report["pretrained"]},
        files=sorted(outputs),
        metrics={
            task.primary_metric: primary,
            **{f"baseline.{k}": v[task.primary_metric] for k, v in report["baselines"].items()},
        },
    )
    return report
