"""Fair comparisons: one evaluation set, scored the same way for the candidate and the champion.

The LM is scored by bits per byte on held-out documents (val and test splits of the candidate's
corpus), which does not depend on the tokenizer, so a champion trained with another tokenizer, on
another corpus or in another language is compared on the very same bytes. A classifier is scored by
its task metric on the candidate's test split. Both sides run through the torch-free ONNX runtime
that serves them, so the numbers are what users get. No MLflow here: see flows.registry.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MIN_IMPROVEMENT = 1e-3  # in the metric's own units (bits per byte, accuracy)
LM_EVAL_MAX_BYTES = 200_000  # per split; documents in content-hash order, so new ones take part too


@dataclass
class EvalSet:
    """What a candidate and a champion are both scored on, and how."""

    name: str  # what the items are: "lm:val+test documents" or "task:bbc-topic:test"
    metric: str
    lower_is_better: bool
    items: list[Any] = field(repr=False)
    score: Callable[[Any, list[Any]], float] = field(repr=False)  # (loaded bundle, items) -> value

    @property
    def sha256(self) -> str:
        blob = json.dumps([self.name, self.metric, self.items], ensure_ascii=False, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def score_bundle(self, bundle_dir: str | Path) -> float:
        from deploy.runtime import load_bundle

        return float(self.score(load_bundle(bundle_dir), self.items))


def _hash_order(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def lm_eval_set(corpus: str, max_bytes: int = LM_EVAL_MAX_BYTES) -> EvalSet:
    """The corpus's val and test documents (never trained on), capped per split by bytes."""
    from gpt.corpora import load_corpus, split_of

    by_split: dict[str, list[str]] = {"val": [], "test": []}
    c = load_corpus(corpus)
    for doc in c:
        split = split_of(doc.text, c.val_fraction, c.test_fraction, c.salt)
        if split in by_split:
            by_split[split].append(doc.text)
    texts: list[str] = []
    for docs in by_split.values():
        used = 0
        for text in sorted(docs, key=_hash_order):
            n = len(text.encode("utf-8"))
            if used and used + n > max_bytes:
                break
            texts.append(text)
            used += n
    if not texts:
        raise ValueError(
            f"corpus {corpus!r} has no val or test documents to compare models on; add documents "
            "(about 10 % of them fall in val/test)"
        )
    # The name says what the items are, not where they came from: the hash is of content only.
    return EvalSet("lm:val+test documents", "bits_per_byte", True, texts, _bits_per_byte)


def _bits_per_byte(model: Any, texts: list[str]) -> float:
    """The runtime's OnnxLM.bits_per_byte (gpt.scoring defines the measure)."""
    return float(model.bits_per_byte(texts))


def task_eval_set(task_spec: str) -> EvalSet:
    """A classification task's test split, scored by the task's primary metric."""
    from gpt.tasks import get_task, load_task_splits

    task = get_task(task_spec)
    if task.kind != "classification":
        raise ValueError(f"task {task.name!r} is a {task.kind} task; only classifiers are registered")
    items = [[ex.input, ex.target] for ex in load_task_splits(task)["test"]]
    metric = task.primary_metric

    def score(model: Any, rows: list[list[str]]) -> float:
        from gpt import metrics

        predicted = [p["label"] for p in model.classify([r[0] for r in rows])]
        truth = [r[1] for r in rows]
        return float(getattr(metrics, metric)(truth, predicted))

    return EvalSet(f"task:{task.name}:test", metric, False, items, score)


def decide(
    candidate: float, champion: float | None, lower_is_better: bool, min_improvement: float
) -> tuple[bool, float | None]:
    """(promote?, margin): the margin is how much better the candidate is, in the metric's units."""
    if champion is None or not math.isfinite(champion):
        return True, None
    margin = champion - candidate if lower_is_better else candidate - champion
    return margin >= min_improvement, margin
