"""Finetuning: masked completion labels, classification that learns, LoRA merge parity, freezing, resume."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_fixtures import sigkill_after
from safetensors.torch import load_file

from gpt.checkpoint import load_model, save_model
from gpt.config import ModelConfig
from gpt.finetune import FinetuneConfig, finetune
from gpt.lora import LoRALinear, apply_lora, merge_lora
from gpt.model import GPT
from gpt.task_data import IGNORE_INDEX, classification_windows, encode_completion
from gpt.task_model import class_log_probs, completion_loss, set_trainable
from gpt.tasks import Example, Task
from gpt.tokenizer import Tokenizer, TokenizerConfig

REPO = Path(__file__).resolve().parents[1]
# One thread per process: the runs compared bit for bit must do their sums in the same order.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

FILLER = [
    "the",
    "a",
    "of",
    "to",
    "in",
    "and",
    "is",
    "was",
    "for",
    "on",
    "with",
    "at",
    "by",
    "from",
    "it",
    "that",
    "this",
    "be",
    "are",
    "as",
]
KEYWORDS = {
    "fruit": ["apple", "banana", "cherry"],
    "vehicle": ["car", "truck", "bus"],
    "animal": ["dog", "cat"],
}


def keyword_rows(n: int = 480, seed: int = 0) -> list[dict[str, str]]:
    """Label = the class of the one keyword hidden among filler words, at a random position."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(sorted(KEYWORDS))
        words = [rng.choice(FILLER) for _ in range(6)] + [f"n{i}"]
        words.insert(rng.randrange(len(words) + 1), rng.choice(KEYWORDS[label]))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_checkpoint(root: Path, texts: list[str], seed: int = 0, **model_overrides) -> Path:
    """A randomly initialised tiny GPT + a tokenizer trained on ``texts``: a stand-in pretrained run's best/."""
    tok = Tokenizer.train(texts, root / "tok", TokenizerConfig(vocab_size=320))
    torch.manual_seed(seed)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, **model_overrides))
    ckpt = root / "pretrained"
    save_model(ckpt, model, tokenizer_hash=tok.hash)
    shutil.copyfile(tok.path, ckpt / "tokenizer.model")
    return ckpt


@pytest.fixture(scope="module")
def keyword_task(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("kw")
    rows = keyword_rows()
    return write_csv(root / "keywords.csv", rows), make_checkpoint(root, [r["text"] for r in rows])


# ------------------------------------------------------------------------------------------------


def test_completion_labels_ignore_prompt_tokens(keyword_task):
    tok = Tokenizer(keyword_task[1])
    task = Task(
        "t", "completion", "x.jsonl", ("exact_match",), prompt_template="Q: {input}\nA:", max_target_tokens=16
    )
    ex = Example("the car is red", "apple banana")
    x, y = encode_completion(tok, task, ex, max_len=64)
    target = tok.encode(" apple banana") + [tok.eos_id]
    n_prompt = len(x) + 1 - len(target)
    assert len(x) == len(y)
    assert y[: n_prompt - 1] == [IGNORE_INDEX] * (n_prompt - 1)  # every prompt-token target is ignored
    assert y[n_prompt - 1 :] == target  # the completion and EOS are learned
    assert x[n_prompt:] == target[:-1]  # teacher forcing: the input is the target shifted by one

    # The loss equals cross-entropy over the completion positions only.
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size)).eval()
    idx, labels = torch.tensor([x]), torch.tensor([y])
    logits = model(idx)
    keep = labels[0] != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[0, keep], labels[0, keep])
    torch.testing.assert_close(completion_loss(model, idx, labels), expected)


def test_completion_input_is_cut_to_fit_max_len(keyword_task):
    tok = Tokenizer(keyword_task[1])
    task = Task(
        "t", "completion", "x.jsonl", ("exact_match",), prompt_template="{input} =>", max_target_tokens=8
    )
    x, y = encode_completion(tok, task, Example("car " * 200, "dog"), max_len=40)
    assert len(x) == 40
    assert y[-len(tok.encode(" dog")) - 1 :] == [*tok.encode(" dog"), tok.eos_id]
    assert tok.decode(x).endswith(" => dog")  # the template tail survives the cut; the input shrinks


@pytest.mark.slow
def test_classification_finetune_beats_chance(keyword_task, tmp_path):
    task_file, ckpt = keyword_task
    cfg = FinetuneConfig(epochs=6, lr=2e-3, batch_size=16, dropout=0.0, precision="fp32", patience=0, seed=0)
    result = finetune(str(task_file), ckpt, tmp_path / "ft", cfg)
    assert result["labels"] == sorted(KEYWORDS)
    assert result["best_val"]["val_accuracy"] >= 0.7  # chance is 1/3
    model, meta = load_model(tmp_path / "ft" / "best")
    assert meta["labels"] == sorted(KEYWORDS) and meta["task"] == "keywords"
    assert model.score is not None and (tmp_path / "ft" / "best" / "tokenizer.model").is_file()
    manifest = json.loads((tmp_path / "ft" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == result["steps"]
    assert not (tmp_path / "ft" / "checkpoints").exists()  # resumable state is removed once the run completes


def test_classification_windows_read_a_long_input_in_order(keyword_task):
    tok = Tokenizer(keyword_task[1])
    task = Task("t", "classification", "x.csv", ("accuracy",), prompt_template="Topic: {input}\n")
    text = " ".join(f"n{i}" for i in range(60))
    ids, pre, post = tok.encode(text), tok.encode("Topic: "), tok.encode("\n")
    room = 24 - 2 - len(pre) - len(post)
    assert classification_windows(tok, task, text, 24) == [[tok.eos_id, *pre, *ids[:room], *post, tok.eos_id]]
    windows = classification_windows(tok, task, text, 24, windows=3)
    assert len(windows) == 3 and len(ids) > 3 * room
    for w in windows:
        assert len(w) == 24 and w[0] == w[-1] == tok.eos_id
        assert w[1 : 1 + len(pre)] == pre and w[-1 - len(post) : -1] == post
    assert sum((w[1 + len(pre) : -1 - len(post)] for w in windows), []) == ids[: 3 * room]
    # A tail shorter than a quarter window is dropped; an input shorter than a window keeps one.
    assert len(classification_windows(tok, task, tok.decode(ids[: room + 1]), 24, windows=3)) == 1
    assert len(classification_windows(tok, task, tok.decode(ids[: room + room // 2]), 24, windows=3)) == 2
    assert len(classification_windows(tok, task, "", 24, windows=3)) == 1


def test_class_log_probs_average_each_inputs_windows():
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=64, n_classes=3)).eval()
    g = torch.Generator().manual_seed(0)
    groups = [
        [torch.randint(4, 64, (n,), generator=g).tolist() for n in lengths]
        for lengths in ([5], [9, 9, 3], [7, 2], [12])
    ]
    with torch.no_grad():
        want = torch.stack(
            [
                torch.stack([model.classify(torch.tensor([w]))[0].log_softmax(-1) for w in windows])
                .mean(0)
                .log_softmax(-1)
                for windows in groups
            ]
        )
    for batch_size in (1, 3, 16):  # padding and batching must not change the result
        got = class_log_probs(model, groups, batch_size, torch.device("cpu"))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_windows_let_the_classifier_see_past_the_first_window(tmp_path):
    """The keyword sits after 20 filler words: outside the first 16-token window, inside the later ones."""
    rows = keyword_rows(seed=1)
    rng = random.Random(1)
    for r in rows:
        r["text"] = " ".join(rng.choice(FILLER) for _ in range(20)) + " " + r["text"]
    task_file = write_csv(tmp_path / "late.csv", rows)
    ckpt = make_checkpoint(tmp_path, [r["text"] for r in rows])
    tok = Tokenizer(ckpt / "tokenizer.model")
    task = Task("late", "classification", str(task_file), ("accuracy",))
    keywords = {k for ks in KEYWORDS.values() for k in ks}
    first = [tok.decode(classification_windows(tok, task, r["text"], 16)[0]) for r in rows]
    assert not any(k in text.split() for text in first for k in keywords)
    cfg = FinetuneConfig(
        epochs=8, lr=2e-3, dropout=0.0, precision="fp32", patience=0, seed=0, max_len=16, windows=4
    )
    result = finetune(str(task_file), ckpt, tmp_path / "ft", cfg)
    assert result["n_train_sequences"] > 2 * result["n_train"]
    assert result["best_val"]["val_accuracy"] >= 0.7  # chance is 1/3; the first window alone cannot beat it
    assert load_model(tmp_path / "ft" / "best")[1]["windows"] == 4


def test_lora_merged_weights_give_same_logits():
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", n_classes=3)).eval()
    names = apply_lora(model, rank=4, alpha=8.0)
    assert len(names) == 4 * model.config.n_layer
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)  # B starts at 0: give the update something to merge
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        lm_before, cls_before = model(idx), model.classify(idx)
        merge_lora(model)
        lm_after, cls_after = model(idx), model.classify(idx)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(GPT(ModelConfig.preset("tiny", n_classes=3)).state_dict())
    torch.testing.assert_close(lm_after, lm_before, atol=1e-5, rtol=0)
    torch.testing.assert_close(cls_after, cls_before, atol=1e-5, rtol=0)


def test_lora_and_freeze_train_only_what_they_should():
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", n_classes=2))
    set_trainable(model, FinetuneConfig(method="lora", lora_targets=("attn.c_attn",)), "classification")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.c_attn.lora_{ab}" for i in range(2) for ab in "AB"} | {
        "score.weight"
    }

    model = GPT(ModelConfig.preset("tiny", n_classes=2))
    set_trainable(model, FinetuneConfig(method="freeze", trainable_blocks=1), "classification")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("transformer.h.1.", "transformer.ln_f.", "score.")) for n in trainable)
    assert "transformer.h.1.mlp.c_fc.weight" in trainable and "score.weight" in trainable


def test_lora_rejects_unknown_target():
    with pytest.raises(ValueError, match="matches no Linear"):
        apply_lora(GPT(ModelConfig.preset("tiny")), rank=2, alpha=4, targets=("attn.q_proj",))


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="method"):
        FinetuneConfig(method="adapter")
    with pytest.raises(ValueError, match="batch_size"):
        FinetuneConfig(batch_size=0)
    cfg = FinetuneConfig.for_task("bbc-topic", lr=1e-4)
    assert cfg.lr == 1e-4 and cfg.epochs == FinetuneConfig.for_task("bbc-topic").epochs
    assert FinetuneConfig.from_yaml(cfg.to_yaml()) == cfg


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(keyword_task, tmp_path):
    """Like pretraining's: one run killed at a random moment after a checkpoint, then resumed,
    against one uninterrupted run; every step's loss, the history and the best weights agree exactly."""
    task_file, ckpt = keyword_task
    args = [
        sys.executable,
        "-m",
        "gptflow.cli",
        "finetune",
        "--task",
        str(task_file),
        "--checkpoint",
        str(ckpt),
    ]
    args += [
        "--method",
        "lora",
        "--max-steps",
        "60",
        "--eval-every",
        "4",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
    ]
    args += ["--dropout", "0.1", "--precision", "fp32", "--patience", "0"]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    a = subprocess.Popen([*args, "--out", str(run_a)], env=ENV, cwd=REPO, stderr=subprocess.DEVNULL)
    b = subprocess.Popen([*args, "--out", str(run_b)], env=ENV, cwd=REPO, stderr=subprocess.DEVNULL)
    sigkill_after(b, run_b / "checkpoints" / "step-000008" / "trainer_state.json", "step-8 checkpoint")
    assert not (run_b / "manifest.json").exists()  # a killed run never looks complete
    subprocess.run([*args, "--out", str(run_b)], env=ENV, cwd=REPO, check=True, capture_output=True)
    assert a.wait(timeout=120) == 0

    def losses(run: Path) -> dict[int, float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    assert losses(run_a) == losses(run_b) and sorted(losses(run_b)) == list(range(1, 61))
    hist_a, hist_b = (json.loads((r / "manifest.json").read_text())["history"] for r in (run_a, run_b))
    assert hist_a == hist_b and len(hist_a) == 15
    for run in (run_a, run_b):
        assert not (run / "checkpoints").exists()  # a finished run keeps only best/
    wa, wb = (load_file(str(r / "best" / "model.safetensors")) for r in (run_a, run_b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
