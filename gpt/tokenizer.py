"""Sentencepiece tokenizer: training from a stream of texts, and a small wrapper that loads from the .model file.

Settings make every UTF-8 string round-trip exactly: byte fallback, full character coverage, identity
normalization, whitespace kept as is, and no dummy "▁" prefix (so a token stream's bytes are exactly
the text's bytes, which is what bits-per-byte needs). Special ids: pad=0, unk=1, bos=2, eos=3.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from gpt.bundle import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from gpt.bundle import TOKENIZER_FILE as MODEL_FILE  # the name this module has always exported
from gpt.config import ConfigBase, _one_of, _positive, _whole
from gpt.io import atomic_write_bytes, sha256_bytes, write_manifest

log = logging.getLogger(__name__)

MODEL_TYPES = ("bpe", "unigram")
# Smallest vocabulary that holds the 4 special ids and the 256 byte-fallback pieces, plus a few pieces.
MIN_VOCAB = 4 + 256 + 1


@dataclass
class TokenizerConfig(ConfigBase):
    """How to train the sentencepiece model."""

    vocab_size: int = 4096  # number of token ids, incl. 4 special ids and 256 byte-fallback pieces
    model_type: str = "bpe"  # bpe | unigram
    character_coverage: float = 1.0  # fraction of characters covered by pieces; the rest fall back to bytes
    max_sentence_length: int = 16384  # longest training line in bytes; longer lines are cut into pieces
    input_sentence_size: int = 2_000_000  # lines sampled for training (0 = all of them)
    sample_bytes: int = 100_000_000  # documents (seeded sample) read from a corpus to train on (0 = all)
    split_digits: bool = False  # split numbers into single digits
    seed: int = 0  # seed for sentencepiece's sampling of training lines
    num_threads: int = 0  # training threads (0 = all cores)

    def __post_init__(self) -> None:
        _one_of(self, "model_type", MODEL_TYPES)
        _positive(self, "vocab_size", "max_sentence_length")
        if not isinstance(self.vocab_size, int) or self.vocab_size < MIN_VOCAB:
            raise ValueError(
                f"TokenizerConfig.vocab_size={self.vocab_size!r} must be an integer >= {MIN_VOCAB} "
                "(4 special ids + 256 byte pieces + at least one learned piece)"
            )
        if not 0.0 < self.character_coverage <= 1.0:
            raise ValueError(
                f"TokenizerConfig.character_coverage={self.character_coverage} must be in (0, 1]"
            )
        _whole(self, "input_sentence_size", "sample_bytes", "num_threads", "seed")


class Tokenizer:
    """A trained sentencepiece model; everything it needs is in the one ``.model`` file."""

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model not found: {path}; train one with `gptflow tokenizer --corpus ... --out DIR`"
            )
        self._init_from_bytes(path.read_bytes(), path)

    def _init_from_bytes(self, data: bytes, path: Path) -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"{path} is not a valid sentencepiece model ({e}); re-train it with `gptflow tokenizer`"
            ) from e
        got = (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())
        if got != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(
                f"{path} has special ids pad/unk/bos/eos={got}, expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; "
                "train the tokenizer with `gptflow tokenizer` (or Tokenizer.train)"
            )
        self._sp = sp
        self._bytes = data
        self.path = path
        self.hash = sha256_bytes(data)
        self.vocab_size = sp.get_piece_size()

    # Pickling (to worker processes) ships the model bytes, not the C++ object.
    def __getstate__(self) -> dict:
        return {"bytes": self._bytes, "path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self._init_from_bytes(state["bytes"], Path(state["path"]))

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, hash={self.hash[:12]})"

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(self, texts: list[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        if not texts:
            return []
        return self._sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos)

    def encode_arrays(self, texts: list[str], add_eos: bool = False) -> list[np.ndarray]:
        """Ids of each text as an int32 array, on this thread only: sharding parallelises over
        processes, and sentencepiece's own threads would oversubscribe the cores they run on."""
        if not texts:
            return []
        try:
            return self._sp.encode(list(texts), add_eos=add_eos, num_threads=1, return_type="numpy")
        except (TypeError, ValueError):  # sentencepiece before return_type="numpy"
            return [
                np.asarray(ids, dtype=np.int32)
                for ids in self._sp.encode(list(texts), add_eos=add_eos, num_threads=1)
            ]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id adds to decoded text: byte pieces 1, '▁' one space byte, special ids 0.
        torch/numpy mirror: deploy/runtime.py's OnnxLM.token_bytes (no gpt import there)."""
        sp = self._sp
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            if sp.is_byte(i):
                out[i] = 1
            else:
                out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out

    @classmethod
    def train(
        cls, texts: Iterable[str], out_dir: str | Path, config: TokenizerConfig, source: str | None = None
    ) -> Tokenizer:
        """Train on ``texts`` (streamed, one document per item); write ``out_dir/tokenizer.model`` + manifest."""
        out_dir = Path(out_dir)
        counts = {"documents": 0, "lines": 0, "bytes": 0}
        max_chars = max(1, config.max_sentence_length // 4)  # a UTF-8 char is at most 4 bytes

        def lines() -> Iterator[str]:
            # Sentencepiece trains on lines; newlines themselves become <0x0A> byte pieces.
            for text in texts:
                counts["documents"] += 1
                for line in text.split("\n"):
                    if not line:
                        continue
                    counts["bytes"] += len(line.encode("utf-8"))
                    for i in range(0, len(line), max_chars):
                        counts["lines"] += 1
                        yield line[i : i + max_chars]

        writer = io.BytesIO()
        spm.set_random_generator_seed(config.seed)
        t0 = time.perf_counter()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines(),
                model_writer=writer,
                vocab_size=config.vocab_size,
                model_type=config.model_type,
                character_coverage=config.character_coverage,
                max_sentence_length=config.max_sentence_length,
                input_sentence_size=config.input_sentence_size,
                shuffle_input_sentence=True,
                split_digits=config.split_digits,
                num_threads=config.num_threads or os.cpu_count() or 1,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                # The whitespace symbol must be a piece even in a corpus without spaces (Chinese):
                # otherwise a space byte-falls-back to the bytes of "▁" and decodes as "▁", not " ".
                required_chars="\u2581",
                train_extremely_large_corpus=False,
                minloglevel=2,
            )
        except RuntimeError as e:
            msg = str(e)
            if counts["lines"] == 0:
                raise ValueError(
                    f"cannot train a tokenizer on an empty corpus ({counts['documents']} documents, no text); "
                    "check the --corpus name or path"
                ) from e
            if m := re.search(r"Vocabulary size too high \((\d+)\).*?<= (\d+)", msg):
                raise ValueError(
                    f"vocab_size={m.group(1)} is more than this corpus supports ({m.group(2)} pieces at most); "
                    f"use --vocab-size {m.group(2)} or less, or a larger corpus"
                ) from e
            if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
                need = int(m.group(2))
                raise ValueError(
                    f"vocab_size={m.group(1)} is too small: character_coverage={config.character_coverage} "
                    f"keeps {need} pieces (characters + special/byte ids) before any merge; use --vocab-size "
                    f"{need + 1000} or more, or --character-coverage 0.9995 (rare characters then fall back to bytes)"
                ) from e
            raise ValueError(f"sentencepiece training failed: {msg}") from e
        seconds = time.perf_counter() - t0
        data = writer.getvalue()
        atomic_write_bytes(out_dir / MODEL_FILE, data)
        tok = cls(out_dir / MODEL_FILE)
        log.info(
            "trained %s tokenizer, vocab %d, on %d documents (%.1f MB) in %.1fs",
            config.model_type,
            tok.vocab_size,
            counts["documents"],
            counts["bytes"] / 1e6,
            seconds,
        )
        write_manifest(
            out_dir,
            stage="tokenizer",
            source=source,
            config=config.to_dict(),
            files={MODEL_FILE: {"sha256": tok.hash, "bytes": len(data)}},
            tokenizer={"file": MODEL_FILE, "sha256": tok.hash, "vocab_size": tok.vocab_size},
            metrics={
                "n_documents": counts["documents"],
                "n_lines": counts["lines"],
                "n_bytes": counts["bytes"],
                "train_seconds": round(seconds, 3),
            },
        )
        return tok
