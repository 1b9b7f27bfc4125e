"""A task's examples as token ids: prompts, completion labels, classification windows, padded
batches and length-bucketed epochs. Finetuning trains on exactly what evaluation and the exported
runtime later see.

Every sequence starts with EOS, the document boundary the model saw in pretraining.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from gpt import bundle
from gpt.bundle import EOS_ID, PAD_ID
from gpt.tasks import Example, Task, check_labels, label_set

IGNORE_INDEX = -100


def _template_ids(tokenizer, task: Task, budget: int) -> tuple[list[int], list[int], int]:
    """(ids before {input}, ids after it, tokens of input that fit) for a sequence of ``budget`` tokens
    that starts with EOS."""
    pre, post = task.prompt_template.split("{input}", 1)
    pre_ids = tokenizer.encode(pre) if pre else []
    post_ids = tokenizer.encode(post) if post else []
    room = budget - 1 - len(pre_ids) - len(post_ids)
    if room < 1:
        raise ValueError(
            f"task {task.name!r}: max length {budget} leaves no room for the input after the prompt template; "
            "raise --max-len"
        )
    return pre_ids, post_ids, room


def encode_prompt(tokenizer, task: Task, text: str, budget: int) -> list[int]:
    """EOS (the document boundary the model saw in pretraining), then the template with the input cut to fit."""
    pre_ids, post_ids, room = _template_ids(tokenizer, task, budget)
    return [EOS_ID, *pre_ids, *tokenizer.encode(text)[:room], *post_ids]


def classification_windows(
    tokenizer, task: Task, text: str, max_len: int, windows: int = 1
) -> list[list[int]]:
    """The input cut into up to ``windows`` windows by the bundle's rule (``gpt.bundle.classification_windows``,
    which the exported runtime applies too): EOS + template + piece + EOS each.

    The classifier pools at the final EOS, the same token for every example. One window is the
    input's start; more let a model with a short context read a long article whole (a TF-IDF baseline
    sees every word).
    """
    pre, post = task.prompt_template.split("{input}", 1)
    pre_ids = tokenizer.encode(pre) if pre else []
    post_ids = tokenizer.encode(post) if post else []
    _template_ids(tokenizer, task, max_len - 1)  # the task-named error when the template leaves no room
    return bundle.classification_windows(tokenizer.encode(text), pre_ids, post_ids, max_len, windows)


def encode_completion(tokenizer, task: Task, example: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) for next-token training; labels are -100 wherever the target is a prompt token.

    The sequence is prompt + completion_prefix + target + EOS; input = sequence[:-1] (at most
    ``max_len`` tokens), labels = sequence[1:] with the prompt part ignored.
    """
    target = tokenizer.encode(task.completion_prefix + example.target)
    cap = min(task.max_target_tokens, max_len // 2)  # a short context keeps at least half for the prompt
    target = target[:cap] if len(target) >= cap else [*target, EOS_ID]
    prompt = encode_prompt(tokenizer, task, example.input, max_len + 1 - len(target))
    seq = prompt + target
    labels = [IGNORE_INDEX] * len(prompt) + target
    return seq[:-1], labels[1:]


def resolve_max_len(task: Task, max_len: int, block_size: int) -> int:
    """Tokens per example: ``max_len``, or (0) the task's input + target budget; at most ``block_size``."""
    want = max_len or (task.max_input_tokens + (task.max_target_tokens if task.kind == "completion" else 0))
    return min(want, block_size)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def collate(batch: list[tuple[list[int], Any]], kind: str):
    """Right-padded (idx, attention_mask, labels); completion labels are padded with -100."""
    idx = _pad([ids for ids, _ in batch], PAD_ID)
    mask = (_pad([[1] * len(ids) for ids, _ in batch], 0)).long()
    if kind == "classification":
        labels = torch.tensor([y for _, y in batch], dtype=torch.long)
    else:
        labels = _pad([y for _, y in batch], IGNORE_INDEX)
    return idx, mask, labels


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of similar lengths (less padding): shuffle, sort within pools of 32 batches, shuffle batches."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * 32
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class TaskLoader:
    """Batches of encoded examples on ``device``, epoch after epoch; each rank takes its share of
    every batch. Its state is one cursor, so a resumed run sees the same batches."""

    def __init__(
        self, data, kind: str, batch_size: int, seed: int, device, rank: int = 0, world_size: int = 1
    ):
        self.data, self.kind, self.batch_size, self.seed, self.device = data, kind, batch_size, seed, device
        self.rank, self.world_size = rank, world_size
        self.lengths = [len(ids) for ids, _ in data]
        self.n_batches = -(-len(data) // batch_size)
        self.position, self._epoch, self._batches = 0, -1, []

    def next_batch(self):
        epoch, i = divmod(self.position, self.n_batches)
        if epoch != self._epoch:
            self._batches, self._epoch = epoch_batches(self.lengths, self.batch_size, self.seed, epoch), epoch
        rows = self._batches[i][self.rank :: self.world_size] or self._batches[i][:1]
        self.position += 1
        return tuple(t.to(self.device) for t in collate([self.data[j] for j in rows], self.kind))

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


def sample_examples(examples: list[Example], n: int, seed: int) -> list[Example]:
    if not n or n >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


@dataclass
class TaskData:
    """A task's examples, encoded for this model."""

    labels: list[str] | None
    max_len: int
    n_train: int  # examples (a classification example may give several training windows)
    train: list[tuple[Any, Any]]  # (ids, label id) or (ids, labels)
    val: list[tuple[Any, Any]]  # (windows, label id) or (ids, labels)


def task_labels(task: Task, train_ex: list[Example], val_ex: list[Example]) -> list[str] | None:
    """A classification task's labels: the train split's (two or more; the val split brings no new one)."""
    if task.kind != "classification":
        return None
    labels = label_set(train_ex)
    if len(labels) < 2:
        raise ValueError(f"task {task.name!r}: the train split has one label ({labels}); need two or more")
    check_labels(val_ex, labels, f"task {task.name!r} val split")
    return labels


def encode_task(task: Task, tokenizer, train_ex, val_ex, labels, max_len: int, windows: int = 1) -> TaskData:
    """Both splits encoded as finetuning trains and validates on them."""
    if task.kind == "completion":
        train = [encode_completion(tokenizer, task, e, max_len) for e in train_ex]
        val = [encode_completion(tokenizer, task, e, max_len) for e in val_ex]
        return TaskData(None, max_len, len(train_ex), train, val)
    lab = {name: i for i, name in enumerate(labels)}
    cut = partial(classification_windows, tokenizer, task, max_len=max_len, windows=windows)
    val = [(cut(e.input), lab[e.target]) for e in val_ex]
    # Every window is a training example with its article's label.
    train = [(ids, lab[e.target]) for e in train_ex for ids in cut(e.input)]
    return TaskData(labels, max_len, len(train_ex), train, val)
