"""Token shards on disk, read back for training and evaluation (``gpt.sharding`` writes them).

A shard directory holds ``{split}_{NNNNNN}.bin`` files of raw little-endian token ids (uint16 when the
vocabulary fits, else uint32), a copy of ``tokenizer.model``, and ``manifest.json`` written last with
the dtype, the tokenizer hash, every shard's token count and sha256, per-split sizes and the corpus
partitions the shards came from. Documents are separated by EOS. The test split is held out: counted
in the manifest, never tokenized into shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpt.io import MANIFEST, read_manifest, sha256_file

# The writing side, re-exported: callers import the shard config and entry point from here.
from gpt.sharding import FORMAT, SPLITS, ShardConfig, shard_corpus, token_dtype

if TYPE_CHECKING:
    import torch

__all__ = ["FORMAT", "SPLITS", "ShardConfig", "ShardDataset", "TrainLoader", "shard_corpus", "token_dtype"]

IGNORE_INDEX = -100  # label value the loss ignores (padding in the last val window)


# --------------------------------------------------------------------------------------------------
# Reading shards


class ShardDataset:
    """One split of a shard directory as a single memory-mapped token sequence."""

    def __init__(
        self,
        shard_dir: str | Path,
        split: str = "train",
        tokenizer_hash: str | None = None,
        verify: bool = True,
    ):
        self.shard_dir = Path(shard_dir)
        if not (self.shard_dir / MANIFEST).is_file():
            raise FileNotFoundError(
                f"no {MANIFEST} in {self.shard_dir}: not a shard directory, or the shard stage did not "
                "finish; run `gptflow shard --corpus ... --tokenizer ... --out DIR`"
            )
        self.manifest = read_manifest(self.shard_dir)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(
                f"{self.shard_dir / MANIFEST} has format {self.manifest.get('format')!r}, expected {FORMAT!r}; "
                "re-run `gptflow shard`"
            )
        splits = self.manifest["splits"]
        if split not in splits or split not in ("train", "val"):
            raise ValueError(
                f"split {split!r} has no shards; choose train or val (the test split is held out "
                "and read from the corpus by evaluation)"
            )
        manifest_hash = self.manifest["tokenizer"]["sha256"]
        if tokenizer_hash is not None and tokenizer_hash != manifest_hash:
            raise ValueError(
                f"tokenizer mismatch: shards in {self.shard_dir} were made with tokenizer {manifest_hash}, "
                f"but the given tokenizer is {tokenizer_hash}; re-shard with this tokenizer or use the "
                f"tokenizer.model stored in {self.shard_dir}"
            )
        self.split = split
        self.tokenizer_hash = manifest_hash
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.shards = splits[split]["shards"]
        self._maps: list[np.memmap] = []
        for shard in self.shards:
            path = self.shard_dir / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(
                    f"shard {path} listed in the manifest is missing; re-run `gptflow shard`"
                )
            expected = shard["n_tokens"] * self.dtype.itemsize
            actual = path.stat().st_size
            if actual != expected:
                raise ValueError(
                    f"shard {path} is truncated or corrupt: {actual} bytes, manifest says {expected} "
                    f"({shard['n_tokens']} tokens); re-run `gptflow shard`"
                )
            if verify and (digest := sha256_file(path)) != shard["sha256"]:
                raise ValueError(
                    f"shard {path} checksum mismatch: sha256 {digest}, manifest says {shard['sha256']}; "
                    "the file changed after sharding, re-run `gptflow shard`"
                )
            self._maps.append(np.memmap(path, dtype=self.dtype, mode="r"))
        self._offsets = np.cumsum([0] + [s["n_tokens"] for s in self.shards])
        self.num_tokens = int(self._offsets[-1])

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"ShardDataset({str(self.shard_dir)!r}, split={self.split!r}, tokens={self.num_tokens})"

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as a fresh array, read across shard boundaries."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(
                f"window [{start}, {start + length}) is outside the {self.split} split's {self.num_tokens} tokens"
            )
        out = np.empty(length, dtype=self.dtype)
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        pos, filled = start, 0
        while filled < length:
            local = pos - int(self._offsets[i])
            n = min(length - filled, self.shards[i]["n_tokens"] - local)
            out[filled : filled + n] = self._maps[i][local : local + n]
            filled += n
            pos += n
            i += 1
        return out


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # (torch is imported inside functions: the CLI imports this module for ShardConfig alone.)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


class TrainLoader:
    """Random ``block_size + 1`` windows, a pure function of (seed, step, rank).

    Each epoch the split is cut into non-overlapping windows at a random offset and visited in a random
    order; global sample ``step * batch_size * world_size + rank * batch_size + i`` is that order's
    entry, so ranks draw disjoint windows and resuming at a step reproduces the same batches.

    The saved cursor counts global samples, so it resumes at another world size: the ``k * G`` samples
    of ``k`` optimizer steps with a global batch of ``G = batch_size * grad_accum * world_size`` are
    always samples ``[0, k * G)``, whichever way ranks and micro-batches split them (2 ranks x 1
    micro-batch and 1 rank x 2 micro-batches draw the same windows in every optimizer step).
    """

    def __init__(
        self,
        dataset: ShardDataset,
        block_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ):
        if block_size <= 0 or batch_size <= 0:
            raise ValueError(f"block_size={block_size} and batch_size={batch_size} must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        n = dataset.num_tokens
        if n < block_size + 1:
            raise ValueError(
                f"the {dataset.split} split has {n} tokens, fewer than one window of block_size+1="
                f"{block_size + 1}; use a larger corpus or a smaller block_size"
            )
        self.dataset, self.block_size, self.batch_size = dataset, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        import torch

        self.device = torch.device(device)
        self.step = 0
        # Random offsets in [0, T) need room for one extra block; tiny splits use offset 0.
        self._random_offset = (n - block_size) // block_size >= 1
        self.n_windows = (n - block_size) // block_size if self._random_offset else (n - 1) // block_size
        self._epochs: dict[int, tuple[int, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        """(offset, window order) of an epoch; the two latest are cached (a batch may straddle epochs)."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self.block_size)) if self._random_offset else 0
            self._epochs = {e: v for e, v in self._epochs.items() if e == epoch - 1}
            self._epochs[epoch] = (offset, rng.permutation(self.n_windows))
        return self._epochs[epoch]

    def sample_starts(self, step: int) -> np.ndarray:
        """Token offsets of this rank's windows at ``step``."""
        first = (step * self.world_size + self.rank) * self.batch_size
        starts = np.empty(self.batch_size, dtype=np.int64)
        for i, g in enumerate(range(first, first + self.batch_size)):
            offset, order = self._epoch(g // self.n_windows)
            starts[i] = offset + int(order[g % self.n_windows]) * self.block_size
        return starts

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``x, y`` int64 of shape (batch_size, block_size); ``y`` is ``x`` shifted left by one."""
        import torch

        T = self.block_size
        buf = np.stack([self.dataset.window(int(s), T + 1) for s in self.sample_starts(self.step)])
        self.step += 1
        data = torch.from_numpy(buf.astype(np.int64))  # (B, T+1)
        return _to_device(data[:, :-1].contiguous(), self.device), _to_device(
            data[:, 1:].contiguous(), self.device
        )

    @property
    def epoch(self) -> float:
        return self.step * self.batch_size * self.world_size / self.n_windows

    def state_dict(self) -> dict[str, Any]:
        return {
            "samples": self.step * self.batch_size * self.world_size,  # global samples consumed
            "step": self.step,
            "seed": self.seed,
            "block_size": self.block_size,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_tokens": self.dataset.num_tokens,
            "tokenizer_hash": self.dataset.tokenizer_hash,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved global sample, at any world size that divides it into whole steps."""
        for key in ("block_size", "batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state[key]}, this loader has {getattr(self, key)}; "
                    "resume with the same block_size and batch_size"
                )
        if "num_tokens" in state and state["num_tokens"] != self.dataset.num_tokens:
            raise ValueError(
                f"loader state was saved on a split of {state['num_tokens']} tokens, this one has "
                f"{self.dataset.num_tokens}; resume on the same shards"
            )
        # Older checkpoints count loader steps of the world size they ran at.
        saved_world = state.get("world_size", self.world_size)
        samples = state.get("samples", state["step"] * self.batch_size * saved_world)
        per_step = self.batch_size * self.world_size
        if samples % per_step:
            raise ValueError(
                f"loader state is at global sample {samples}, which is not a whole number of batches of "
                f"batch_size x world_size = {self.batch_size} x {self.world_size}; resume on a world size "
                "that divides the global batch"
            )
        self.seed = int(state["seed"])
        self.step = samples // per_step
        self._epochs = {}


def val_batches(
    dataset: ShardDataset,
    block_size: int,
    batch_size: int,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential windows ``[i*T, i*T + T + 1)`` that predict every token of the split after the first once.

    The last window may be shorter: its ``x`` is padded with the pad id and its ``y`` with -100 so the
    loss ignores the padding. The final batch may have fewer rows.
    """
    import torch

    T, n = block_size, dataset.num_tokens
    if n < 2:
        raise ValueError(f"the {dataset.split} split has {n} tokens; evaluation needs at least 2")
    device = torch.device(device)
    n_windows = -(-(n - 1) // T)  # ceil: every target token 1..n-1 appears once
    for b, first in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        rows = range(first, min(first + batch_size, n_windows))
        x = np.zeros((len(rows), T), dtype=np.int64)
        y = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
        for r, w in enumerate(rows):
            tokens = dataset.window(w * T, min(T + 1, n - w * T)).astype(np.int64)
            x[r, : len(tokens) - 1] = tokens[:-1]
            y[r, : len(tokens) - 1] = tokens[1:]
        yield _to_device(torch.from_numpy(x), device), _to_device(torch.from_numpy(y), device)
