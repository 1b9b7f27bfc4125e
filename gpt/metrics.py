"""Task metrics: accuracy/macro-F1/confusion (scikit-learn), ROUGE (rouge-score), SQuAD-style exact
match and token F1, BLEU and chrF (sacrebleu).

Scales: accuracy, F1, ROUGE, exact match and token F1 are in [0, 1]; BLEU and chrF keep sacrebleu's
usual 0-100 scale.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
COMPLETION_METRICS = ("rouge1", "rouge2", "rougeL", "exact_match", "token_f1", "bleu", "chrf")

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def _check_lengths(preds: Sequence, refs: Sequence) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references; they must pair up")
    if not refs:
        raise ValueError("no examples to score (empty split?)")


# ------------------------------------------------------------------------------------------------
# Classification


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    _check_lengths(y_pred, y_true)
    return sum(t == p for t, p in zip(y_true, y_pred, strict=True)) / len(y_true)


def macro_f1(y_true: Sequence, y_pred: Sequence, labels: Sequence | None = None) -> float:
    """Unweighted mean of per-class F1 over ``labels`` (default: classes seen in either list)."""
    from sklearn.metrics import f1_score

    _check_lengths(y_pred, y_true)
    return float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))


def confusion(y_true: Sequence, y_pred: Sequence, labels: Sequence) -> list[list[int]]:
    """Rows are the true label, columns the predicted one, both in ``labels`` order."""
    from sklearn.metrics import confusion_matrix

    _check_lengths(y_pred, y_true)
    return confusion_matrix(y_true, y_pred, labels=list(labels)).tolist()


def classification_metrics(y_true: Sequence, y_pred: Sequence, labels: Sequence) -> dict:
    return {
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred, labels=list(labels)),
        "confusion_matrix": confusion(y_true, y_pred, labels),
        "labels": list(labels),
    }


# ------------------------------------------------------------------------------------------------
# Extractive QA (SQuAD v1.1 evaluation script's normalisation)


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)  # both empty: 1; one empty: 0
    common = Counter(p) & Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------------------------------
# Generation


def rouge(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (Porter stemming, as in most summarization papers)."""
    from rouge_score import rouge_scorer

    _check_lengths(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(preds, refs, strict=True):
        for name, score in scorer.score(r, p).items():
            totals[name] += score.fmeasure
    return {k: v / len(refs) for k, v in totals.items()}


def _sacrebleu_tokenize(refs: Sequence[str]) -> str:
    # sacrebleu's default 13a tokenizer splits on spaces; Chinese/Japanese need character splitting.
    return "zh" if any(_CJK.search(r) for r in refs) else "13a"


def bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    import sacrebleu

    _check_lengths(preds, refs)
    return float(sacrebleu.corpus_bleu(list(preds), [list(refs)], tokenize=_sacrebleu_tokenize(refs)).score)


def chrf(preds: Sequence[str], refs: Sequence[str]) -> float:
    import sacrebleu

    _check_lengths(preds, refs)
    return float(sacrebleu.corpus_chrf(list(preds), [list(refs)]).score)


def completion_metrics(names: Sequence[str], preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """The requested subset of COMPLETION_METRICS, averaged over examples (BLEU/chrF at corpus level)."""
    unknown = [n for n in names if n not in COMPLETION_METRICS]
    if unknown:
        raise ValueError(
            f"unknown completion metric(s) {unknown}; choose from {', '.join(COMPLETION_METRICS)}"
        )
    _check_lengths(preds, refs)
    out: dict[str, float] = {}
    if any(n.startswith("rouge") for n in names):
        out.update({k: v for k, v in rouge(preds, refs).items() if k in names})
    pairs = list(zip(preds, refs, strict=True))
    if "exact_match" in names:
        out["exact_match"] = sum(exact_match(p, r) for p, r in pairs) / len(pairs)
    if "token_f1" in names:
        out["token_f1"] = sum(token_f1(p, r) for p, r in pairs) / len(pairs)
    if "bleu" in names:
        out["bleu"] = bleu(preds, refs)
    if "chrf" in names:
        out["chrf"] = chrf(preds, refs)
    return {n: out[n] for n in names}
