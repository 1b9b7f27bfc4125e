"""Torch-free inference over an exported gptflow bundle (``gptflow export``): onnxruntime, numpy and
sentencepiece only, so this file, ``gpt/bundle.py`` + ``gpt/io.py`` (the bundle format, standard library
only) and a bundle directory are all a machine without torch needs.

    lm = load_bundle("artifacts/bundle")
    lm.generate("The market", max_new_tokens=40)[0].text
    for piece in lm.stream("The market", temperature=0.8, seed=0): print(piece, end="")

Context policy (``GenerationConfig.context_policy``), with ``max_context`` = the model's block size:
  "error"    prompt tokens + max_new_tokens must fit in max_context, else ValueError before any work.
  "sliding"  the prompt keeps its last max_context tokens; when the cache fills, the last
             max_context - 1 tokens are re-read from scratch (positions restart), exactly as
             ``gpt/generate.py`` does, so the two give the same greedy tokens.
Prompts start with EOS, the token before every document in the pretraining shards (a bundle whose
config sets ``add_bos`` starts them with BOS instead). EOS (and any ``stop_token_ids``) ends a
sequence and is not part of its output, unless ``ignore_eos``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import sentencepiece as spm

from gpt.bundle import (
    CONFIG_FILE,
    LOGITS_TO_KEEP,
    ONNX_FILE,
    TOKENIZER_FILE,
    BundleConfig,
    classification_windows,
    lm_io_names,
    repeated_ngram_bans,
    window_room,
)

CONTEXT_POLICIES = ("error", "sliding")
_REPLACEMENT = "\ufffd"  # what sentencepiece decodes an incomplete UTF-8 byte sequence to


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64  # tokens to generate at most
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    top_p: float = 1.0  # keep the smallest set of tokens with this much probability (1 = off)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (CTRL)
    no_repeat_ngram_size: int = 0  # never repeat an n-gram of the output (0 = off; see repeated_ngram_bans)
    stop: list[str] = field(default_factory=list)  # strings that end generation (not included in text)
    stop_token_ids: list[int] = field(default_factory=list)  # ids that end generation (EOS always does)
    seed: int | None = None  # sampling seed (None = fresh randomness)
    context_policy: str = "error"  # error | sliding: what to do when prompt + output exceed the context
    ignore_eos: bool = False  # keep going past EOS

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = [int(i) for i in self.stop_token_ids]
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 0")
        if (
            not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature))
            or self.temperature < 0
        ):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = off)")
        if not (isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1] (1 = off)")
        if not (isinstance(self.repetition_penalty, int | float) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must be > 0 (1 = off)")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            raise ValueError(
                f"no_repeat_ngram_size={self.no_repeat_ngram_size!r} must be an integer >= 0 (0 = off)"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} must be a list of non-empty strings")
        if self.context_policy not in CONTEXT_POLICIES:
            raise ValueError(
                f"context_policy={self.context_policy!r} is not allowed; choose one of {', '.join(CONTEXT_POLICIES)}"
            )


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS, a stop id or a stop string) | "length" (max_new_tokens)


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, else CPU."""
    available = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + [
        "CPUExecutionProvider"
    ]


def load_bundle(
    bundle_dir: str | Path, providers: Sequence[str] | None = None, threads: int = 0
) -> OnnxLM | OnnxClassifier:
    """Open a bundle directory: an ``OnnxLM`` or an ``OnnxClassifier`` according to its config.

    ``threads``: ONNX Runtime intra-op threads (0 = its default, one per core). A server whose event
    loop shares the cores with the model does better with one core fewer: ORT's threads wait for
    the slowest of them at every operator.
    """
    bundle = Path(bundle_dir)
    config = BundleConfig.read(bundle)
    if config.kind == "lm":
        return OnnxLM(bundle, config, providers, threads)
    return OnnxClassifier(bundle, config, providers, threads)


class _Bundle:
    """What both kinds share: the session, the tokenizer, special ids and the context length."""

    def __init__(self, bundle: Path, config: BundleConfig, providers: Sequence[str] | None, threads: int = 0):
        self.bundle = bundle
        self.config = config
        for name in (ONNX_FILE, TOKENIZER_FILE):
            if not (bundle / name).is_file():
                raise FileNotFoundError(
                    f"{bundle / name} is missing: the bundle is incomplete; re-run `gptflow export`"
                )
        data = (bundle / TOKENIZER_FILE).read_bytes()
        expected = config.tokenizer_hash
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            raise ValueError(
                f"{bundle / TOKENIZER_FILE} (sha256 {digest[:12]}) is not the tokenizer this model was exported "
                f"with (sha256 {expected[:12]}); restore the bundle's own {TOKENIZER_FILE} or re-export"
            )
        self.tokenizer = spm.SentencePieceProcessor()
        self.tokenizer.LoadFromSerializedProto(data)
        if self.tokenizer.get_piece_size() > config.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.get_piece_size()} pieces but the model only "
                f"{config.vocab_size} ids; the bundle mixes a model and a tokenizer that do not belong together"
            )
        special = config.special_ids
        self.pad_id, self.bos_id, self.eos_id = special["pad"], special["bos"], special["eos"]
        self.max_context = config.context_length
        self.add_bos = config.add_bos
        self.start_id = self.bos_id if self.add_bos else self.eos_id  # what every prompt starts with
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(bundle / ONNX_FILE), opts, providers=list(providers or default_providers())
        )
        self.providers = self.session.get_providers()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def _prompt_ids(self, text: str) -> list[int]:
        return [self.start_id, *self.encode(text)]


# --------------------------------------------------------------------------------------------
# Text assembly: token ids in, text pieces out, never splitting a UTF-8 character or leaking a stop.


class _TextTracker:
    """Turn one sequence's new token ids into text pieces.

    Decodes a short window (a few prompt tokens for context, then the completion) and releases the
    text only once it does not end in an incomplete UTF-8 sequence; text that could be the start of
    a stop string is held back until it is known not to be one.
    """

    def __init__(self, tokenizer: spm.SentencePieceProcessor, prompt_ids: Sequence[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.ids = [int(i) for i in prompt_ids[-4:]]
        self.prefix, self.read = 0, len(self.ids)  # ids[prefix:read] is decoded context already accounted for
        self.text = ""  # completion text decoded so far (complete characters only)
        self.released = 0  # characters of self.text handed out
        self.stop = stop
        self.stopped = False
        # Filled in when the run ends.
        self.token_ids: list[int] = []
        self.prompt_tokens = len(prompt_ids)
        self.finish_reason = "length"

    def _decode_new(self, final: bool) -> None:
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        full = self.tokenizer.decode(self.ids[self.prefix :])
        if len(full) > len(done) and (final or not full.endswith(_REPLACEMENT)):
            self.text += full[len(done) :]
            self.prefix, self.read = self.read, len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        self._decode_new(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self._decode_new(final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        safe = len(self.text)
        if self.stop and not self.stopped:
            hits = [i for i in (self.text.find(s, self.released) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                safe = len(self.text)
            elif not final:
                hold = 0
                for s in self.stop:
                    for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                        if self.text.endswith(s[:k]):
                            hold = k
                            break
                safe = max(self.released, len(self.text) - hold)
        piece = self.text[self.released : safe]
        self.released = safe
        return piece

    @property
    def final_text(self) -> str:
        return self.text[: self.released]


# --------------------------------------------------------------------------------------------
# Sampling (numpy)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _pick(
    logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator, seen: np.ndarray | None
) -> np.ndarray:
    """Next token ids (B,) from last-position logits (B, V)."""
    if seen is not None:  # repetition penalty: shrink the logits of tokens already present
        p = cfg.repetition_penalty
        logits = np.where(seen, np.where(logits > 0, logits / p, logits * p), logits)
    if cfg.temperature == 0.0:
        return logits.argmax(axis=-1)
    x = logits.astype(np.float64) / cfg.temperature
    V = x.shape[-1]
    if 0 < cfg.top_k < V:
        kth = np.partition(x, V - cfg.top_k, axis=-1)[:, V - cfg.top_k : V - cfg.top_k + 1]
        x = np.where(x < kth, -np.inf, x)
    if cfg.top_p < 1.0:
        order = np.argsort(-x, axis=-1)
        probs = _softmax(np.take_along_axis(x, order, axis=-1))
        drop_sorted = (np.cumsum(probs, axis=-1) - probs) >= cfg.top_p  # the top token always stays
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        x = np.where(drop, -np.inf, x)
    cdf = np.cumsum(_softmax(x), axis=-1)
    u = rng.random((x.shape[0], 1)) * cdf[:, -1:]
    return np.minimum((cdf < u).sum(axis=-1), V - 1)


# --------------------------------------------------------------------------------------------
# The language model


class OnnxLM(_Bundle):
    """Generation with the KV cache over the exported decoder graph."""

    def __init__(
        self, bundle: Path, config: BundleConfig, providers: Sequence[str] | None = None, threads: int = 0
    ):
        super().__init__(bundle, config, providers, threads)
        self.n_layer, self.n_head, self.head_dim = config.n_layer, config.n_head, config.head_dim
        self.vocab_size = config.vocab_size
        self.n_pieces = self.tokenizer.get_piece_size()
        inputs, self.output_names = lm_io_names(self.n_layer)
        self.past_names = inputs[3:]
        # The lean step (IOBinding, on CPU as on CUDA): the cache stays in onnxruntime's own buffers
        # between steps (on the GPU there), never copied into fresh numpy arrays, and the logits are
        # written straight into a numpy array. False: plain session.run, for comparison.
        self.device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        self.use_io_binding = True
        # In-place cache (CPU, graphs that support it): decode steps hand the graph a numpy buffer per
        # past tensor, longer than its tokens and bound as its own present, so a step writes one new
        # column instead of copying the whole cache. On the GPU the cache stays in OrtValues.
        self.kv_in_place = config.kv_cache == "in_place" and self.device == "cpu"
        # Prefills that sample only from the last position ask for its logits alone (graphs that
        # take logits_to_keep): the vocabulary projection of the other positions is skipped.
        # (onnxruntime lists an input with a default among the overridable initializers.)
        self.keeps_last = LOGITS_TO_KEEP in {x.name for x in self.session.get_overridable_initializers()}

    @property
    def in_place_cache(self) -> bool:
        """Whether decode steps write into the cache buffers (the lean step on an in-place graph)."""
        return self.kv_in_place and self.use_io_binding

    # One forward pass -----------------------------------------------------------------------

    def _empty_past(self, B: int) -> list:
        empty = np.zeros((B, self.n_head, 0, self.head_dim), dtype=np.float32)
        return [empty] * (2 * self.n_layer)

    def _forward(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        pos: np.ndarray,
        past: list,
        in_place: CacheBinding | None = None,
        last_only: bool = False,
    ) -> tuple[np.ndarray, list]:
        """Logits (B, T, V) and the new cache (OrtValues; numpy arrays with plain run).

        ``in_place``: ``past`` are C-contiguous buffers (B, nh, capacity, hs) with capacity >= the
        mask's columns; the graph writes the new keys and values into them, and they are returned.
        The binding of those buffers is kept in ``in_place`` for the next step over the same ones.
        ``last_only``: the caller reads only the last position's logits; graphs that can skip the
        others (``keeps_last``) then return (B, 1, V)."""
        if in_place is not None:
            return self._forward_in_place(ids, mask, pos, past, in_place), past
        keep_last = last_only and self.keeps_last
        one = np.ones(1, dtype=np.int64)
        if not self.use_io_binding:
            feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
            feed.update(zip(self.past_names, past, strict=True))
            if keep_last:
                feed[LOGITS_TO_KEEP] = one
            out = self.session.run(self.output_names, feed)
            return out[0], out[1:]
        binding = self.session.io_binding()
        if keep_last:  # (bind_cpu_input cannot name an input that has a default)
            binding.bind_ortvalue_input(LOGITS_TO_KEEP, ort.OrtValue.ortvalue_from_numpy(one))
        logits = self._bind_step(binding, ids, mask, pos, positions=1 if keep_last else 0)
        for name, value in zip(self.past_names, past, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.output_names[1:]:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return logits, list(binding.get_outputs()[1:])

    def _forward_in_place(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray], kept: CacheBinding
    ) -> np.ndarray:
        """One step that writes into the ``past`` buffers. Their binding is made once and kept, so a
        step binds only its own inputs and logits (binding the 2 * n_layer buffers anew every step
        cost ~0.5 ms of a 4 ms batch-1 int4 step on the 124M shape)."""
        if past[0].shape[2] < mask.shape[1]:
            raise ValueError(
                f"cache buffers hold {past[0].shape[2]} columns; this step needs {mask.shape[1]}"
            )
        if kept.past is not past:
            binding = self.session.io_binding()
            for name, present, buf in zip(self.past_names, self.output_names[1:], past, strict=True):
                binding.bind_input(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
                binding.bind_output(present, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            kept.past, kept.binding = past, binding
        logits = self._bind_step(kept.binding, ids, mask, pos)
        self.session.run_with_iobinding(kept.binding)
        return logits

    def _bind_step(
        self, binding: ort.IOBinding, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, positions: int = 0
    ) -> np.ndarray:
        """Bind the step's ids, mask and positions, and a numpy array for onnxruntime to write the
        logits of the last ``positions`` (0: all) into."""
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(pos))
        logits = np.empty((ids.shape[0], positions or ids.shape[1], self.vocab_size), dtype=np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        return logits

    def logits(self, prompt_ids: list[list[int]]) -> np.ndarray:
        """Logits (B, T, V) of a prefill of equal-length prompts (no cache): for checks and scoring."""
        ids = np.asarray(prompt_ids, dtype=np.int64)
        batch, n = ids.shape
        if n > self.max_context:
            raise ValueError(f"{n} tokens exceed the context of {self.max_context}")
        pos = np.broadcast_to(np.arange(n, dtype=np.int64), (batch, n))
        return self._forward(ids, np.ones((batch, n), np.int64), pos, self._empty_past(batch))[0]

    # The decode loop -------------------------------------------------------------------------

    def _check_context(self, prompts: list[list[int]], cfg: GenerationConfig) -> list[list[int]]:
        longest = max(len(p) for p in prompts)
        if cfg.context_policy == "sliding":
            return [p[-self.max_context :] for p in prompts]
        if longest + cfg.max_new_tokens > self.max_context:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens={cfg.max_new_tokens} exceeds the model's context "
                f"of {self.max_context} tokens; shorten the prompt, lower max_new_tokens, or use "
                "context_policy='sliding'"
            )
        return prompts

    def new_row(self, prompt_ids: Sequence[int], cfg: GenerationConfig, choice: int = 0) -> Row:
        """One sequence to generate; ``choice`` picks its sampling stream: (cfg.seed, choice)."""
        prompt = [int(i) for i in prompt_ids] or [self.start_id]
        return Row(self, self._check_context([prompt], cfg)[0], cfg, choice)

    def _rows(self, prompt_ids: list[list[int]], cfg: GenerationConfig) -> list[Row]:
        return [self.new_row(p, cfg, choice=r) for r, p in enumerate(prompt_ids)]

    @staticmethod
    def _drive(batch: DecodeBatch, rows: list[Row]) -> Iterator[list[tuple[Row, str]]]:
        """Run ``rows`` in ``batch`` to the end: yields each step's (row, released text) pairs."""
        yield batch.join(rows)
        while batch.rows:
            yield batch.step()

    def _config(self, cfg: GenerationConfig | None, overrides: dict[str, Any]) -> GenerationConfig:
        if cfg is None:  # the bundle's own defaults (its task's decoding), then the caller's
            return GenerationConfig(**{**(self.config.generation or {}), **overrides})
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    def generate_ids(
        self, prompt_ids: list[list[int]], cfg: GenerationConfig | None = None, **kw
    ) -> list[list[int]]:
        """New token ids per prompt (stop ids dropped)."""
        cfg = self._config(cfg, kw)
        rows = self._rows(prompts_of(prompt_ids), cfg)
        for _ in self._drive(DecodeBatch(self), rows):
            pass
        return [row.token_ids for row in rows]

    def generate(
        self, prompts: str | list[str], cfg: GenerationConfig | None = None, **kw
    ) -> list[Generation]:
        """Complete each prompt; the prompts decode as one batch, each row exactly as it would alone
        (row r of a seeded batch samples from the stream (seed, r))."""
        cfg = self._config(cfg, kw)
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            return []
        rows = self._rows([self._prompt_ids(t) for t in texts], cfg)
        for _ in self._drive(DecodeBatch(self), rows):
            pass
        return [row.result() for row in rows]

    def stream(self, prompt: str, cfg: GenerationConfig | None = None, **kw) -> Iterator[str]:
        """Text pieces as they are generated; ''.join(pieces) == generate(prompt)[0].text.

        Pieces never split a UTF-8 character; stopping the iteration stops the generation.
        """
        cfg = self._config(cfg, kw)
        row = self.new_row(self._prompt_ids(prompt), cfg)
        for step in self._drive(DecodeBatch(self), [row]):
            for _, piece in step:
                if piece:
                    yield piece

    # Scoring ---------------------------------------------------------------------------------

    def logprobs(self, text: str) -> np.ndarray:
        """Natural-log probability of each token of ``text``, the first one given the start token (EOS).

        Texts longer than the context are scored in consecutive windows, every token predicted once.
        """
        ids = self.encode(text)
        if not ids:
            raise ValueError("cannot score an empty text")
        return self._logprobs(ids)

    def _logprobs(self, ids: list[int]) -> np.ndarray:
        ids = [self.start_id, *ids]
        out = []
        for s in range(0, len(ids) - 1, self.max_context):
            targets = np.asarray(ids[s + 1 : s + self.max_context + 1])
            logp = _log_softmax(self.logits([ids[s : s + len(targets)]])[0])  # (T, V)
            out.append(logp[np.arange(len(targets)), targets])
        return np.concatenate(out)

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes per id: byte pieces 1, '▁' one space byte, special and unknown ids 0.
        torch/numpy mirror of gpt.tokenizer.Tokenizer.token_byte_lengths."""
        sp = self.tokenizer
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.n_pieces):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            out[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out

    def bits_per_byte(self, texts: str | Sequence[str]) -> float:
        """Bits per byte of ``texts``, each scored on its own after the start token; targets whose
        token has no byte (special ids) count in neither sum. torch/numpy mirror of
        gpt.scoring.score_texts, whose docstring defines the measure."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        nats, n_bytes = 0.0, 0
        for text in texts:
            ids = self.encode(text)
            if ids:
                nbytes = self.token_bytes[ids]
                nats -= float(self._logprobs(ids)[nbytes > 0].sum())
                n_bytes += int(nbytes.sum())
        if n_bytes == 0:
            raise ValueError(f"no text to score among {len(texts)} texts (all empty?)")
        return nats / math.log(2) / n_bytes


def prompts_of(prompt_ids: Any) -> list[list[int]]:
    """Accept one id list or a list of id lists."""
    prompt_ids = list(prompt_ids)
    if prompt_ids and not isinstance(prompt_ids[0], list | tuple | np.ndarray):
        return [[int(i) for i in prompt_ids]]
    return [[int(i) for i in p] for p in prompt_ids]


# --------------------------------------------------------------------------------------------
# Rows and the decode batch: OnnxLM.generate runs on them, and so does the server's scheduler


class Row:
    """One sequence being generated: its tokens, sampler, stops and text; the batch holds its cache.

    What it reports comes from the tokens it sampled, never from re-reading its text: ``token_ids``
    (stop ids dropped), ``finish_reason`` ("stop": EOS, a stop id or a stop string; "length":
    max_new_tokens; or what ``end`` was given), ``prompt_tokens`` and ``completion_tokens``.
    """

    def __init__(self, lm: OnnxLM, prompt: list[int], cfg: GenerationConfig, choice: int = 0):
        self.cfg = cfg
        self.prompt_tokens = len(prompt)
        self.context = list(prompt)  # every real token: what the window re-reads when it slides
        self.pending = list(prompt)  # tokens not yet in the cache: the prompt, then the last sampled one
        self.cached = 0  # this row's real tokens in the batch cache
        # A seeded row samples from the stream (seed, choice): choice i of a request is the same
        # sequence whether it runs alone, in a batch, streamed or not.
        self.rng = np.random.default_rng(None if cfg.seed is None else [cfg.seed, choice])
        self.seen = None
        if cfg.repetition_penalty != 1.0:
            self.seen = np.zeros((1, lm.vocab_size), dtype=bool)
            self.seen[0, prompt] = True
        self.stop_ids = set(cfg.stop_token_ids) | (set() if cfg.ignore_eos else {lm.eos_id})
        self.tracker = _TextTracker(lm.tokenizer, prompt, cfg.stop)
        self.token_ids: list[int] = []
        self.sampled = 0
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def text(self) -> str:
        return self.tracker.final_text

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits: the batch's argmax is this row's token."""
        return self.cfg.temperature == 0.0 and self.seen is None and not self.cfg.no_repeat_ngram_size

    def sample(self, logits: np.ndarray) -> int:
        """The next token from this row's last-position logits (1, V)."""
        if bans := repeated_ngram_bans(self.token_ids, self.cfg.no_repeat_ngram_size):
            logits = logits.copy()
            logits[0, sorted(bans)] = -np.inf
        token = int(_pick(logits, self.cfg, self.rng, self.seen)[0])
        if self.seen is not None:
            self.seen[0, token] = True
        return token

    def accept(self, token: int) -> str:
        """Take the next sampled token; returns the text it releases (with the rest when it ends the row)."""
        self.sampled += 1
        piece = ""
        if token in self.stop_ids:
            self.finish_reason = "stop"
        else:
            self.token_ids.append(token)
            self.context.append(token)
            self.pending = [token]
            piece = self.tracker.push(token)
            if self.tracker.stopped:
                self.finish_reason = "stop"
        if self.finish_reason is None and self.sampled >= self.cfg.max_new_tokens:
            self.finish_reason = "length"
        return piece + self.tracker.finish() if self.done else piece

    def end(self, reason: str) -> None:
        """Stop the row from outside (a cancelled or timed-out request): no more text."""
        if self.finish_reason is None:
            self.finish_reason = reason

    def result(self) -> Generation:
        return Generation(
            text=self.text,
            token_ids=self.token_ids,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            finish_reason=self.finish_reason or "length",
        )


def _host(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


@dataclass
class CacheBinding:
    """The IOBinding of a batch's in-place cache buffers (``past``, a list replaced whenever the
    buffers change), kept across decode steps."""

    past: list | None = None
    binding: Any = None


KV_ROOM = 64  # columns an in-place cache buffer grows by: one reallocation every 64 steps


def _with_room(cache: np.ndarray) -> np.ndarray:
    """(B, nh, P, hs) -> a zeroed C-contiguous buffer (B, nh, P + KV_ROOM, hs) holding it in front."""
    B, nh, P, hs = cache.shape
    buf = np.zeros((B, nh, P + KV_ROOM, hs), dtype=cache.dtype)
    buf[:, :, :P] = cache
    return buf


class DecodeBatch:
    """Rows that decode together: one session call advances all of them by a token.

    The cache is one left-padded batch: row r's real tokens are the last ``rows[r].cached`` columns
    (``mask[r]`` is 1 there); positions count a row's own tokens, so a row gives the same tokens here
    as alone. Rows join between steps (their prompts are prefilled in a call of their own, then
    merged into the cache) and leave between steps (their cache rows are dropped at once, and the
    leading columns no remaining row uses with them). torch/numpy mirror of gpt.generate.KVBatch.
    """

    def __init__(self, lm: OnnxLM):
        self.lm = lm
        self.rows: list[Row] = []
        # 2 * n_layer arrays (B, heads, P, head_dim), or OrtValues; with an in-place cache numpy
        # buffers with room for more columns (the first P, the mask's width, hold the cache)
        self.past: list | None = None
        self.mask = np.zeros((0, 0), dtype=np.int64)  # (B, P)
        self.kept = CacheBinding()  # in-place steps: the binding of the current buffers
        self.calls = 0  # session calls made: prefills and decode steps

    def join(self, rows: list[Row]) -> list[tuple[Row, str]]:
        """Prefill ``rows`` (one call), sample each one's first token, keep the unfinished ones.

        Returns (row, released text) for every row given; a row that is done already left.
        """
        out: list[tuple[Row, str]] = []
        fresh = []
        for row in rows:
            if row.cfg.max_new_tokens == 0:
                row.finish_reason = "length"
                out.append((row, ""))
            else:
                fresh.append(row)
        if not fresh:
            return out
        lm, n = self.lm, len(fresh)
        T = max(len(r.pending) for r in fresh)
        ids = np.full((n, T), lm.pad_id, dtype=np.int64)
        mask = np.zeros((n, T), dtype=np.int64)
        for i, r in enumerate(fresh):
            ids[i, T - len(r.pending) :] = r.pending
            mask[i, T - len(r.pending) :] = 1
            r.cached = len(r.pending)
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        logits, present = lm._forward(ids, mask, pos, lm._empty_past(n), last_only=True)
        self.calls += 1
        out += self._sample(fresh, logits[:, -1, :])
        keep = [i for i, r in enumerate(fresh) if not r.done]
        if keep:
            present = [_host(p) for p in present]
            if len(keep) < n:
                present, mask = [p[keep] for p in present], mask[keep]
            self._merge([fresh[i] for i in keep], present, mask)
        return out

    def step(self) -> list[tuple[Row, str]]:
        """One token for every row; rows whose window is full (sliding policy) re-read their recent tokens."""
        block = self.lm.max_context
        full = [r for r in self.rows if r.cached + 1 > block]
        self.drop(full)
        out: list[tuple[Row, str]] = []
        if self.rows:
            B = len(self.rows)
            ids = np.array([r.pending for r in self.rows], dtype=np.int64)  # (B, 1)
            mask = np.concatenate([self.mask, np.ones((B, 1), dtype=np.int64)], axis=1)
            pos = np.array([[r.cached] for r in self.rows], dtype=np.int64)
            in_place = self.kept if self.lm.in_place_cache else None
            if in_place is not None and self.past[0].shape[2] < mask.shape[1]:
                self.past = [_with_room(p[:, :, : mask.shape[1] - 1]) for p in self.past]
            logits, self.past = self.lm._forward(ids, mask, pos, self.past, in_place)
            self.calls += 1
            self.mask = mask
            for r in self.rows:
                r.cached += 1
            out = self._sample(self.rows, logits[:, -1, :])
            self.drop([r for r in self.rows if r.done])
        for r in full:
            r.pending = r.context[-(block - 1) :]
        return out + (self.join(full) if full else [])

    def drop(self, rows: list[Row]) -> None:
        """Remove ``rows`` from the batch now (finished, cancelled or timed out)."""
        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.past, self.mask, self.kept = None, np.zeros((0, 0), dtype=np.int64), CacheBinding()
            return
        mask = self.mask[keep]
        lead = int(np.argmax(mask.any(axis=0)))  # columns before this one only departed rows used
        P = mask.shape[1]
        self.mask = mask[:, lead:]
        self.past = self._cache([_host(p)[keep, :, lead:P] for p in self.past])  # one copy, C-contiguous

    def _merge(self, rows: list[Row], past: list[np.ndarray], mask: np.ndarray) -> None:
        if not self.rows:
            self.rows, self.past, self.mask = list(rows), self._cache(past), mask
            return
        B0, P = self.mask.shape
        B1, T = mask.shape
        S = max(P, T)
        merged = np.zeros((B0 + B1, S), dtype=np.int64)
        merged[:B0, S - P :], merged[B0:, S - T :] = self.mask, mask
        tensors = []
        for a, b in zip(self.past, past, strict=True):
            a = _host(a)[:, :, :P]
            t = np.zeros((B0 + B1, a.shape[1], S, a.shape[3]), dtype=a.dtype)
            t[:B0, :, S - P :], t[B0:, :, S - T :] = a, b
            tensors.append(t)
        self.rows, self.past, self.mask = self.rows + list(rows), self._cache(tensors), merged

    def _cache(self, tensors: list[np.ndarray]) -> list:
        """What ``past`` holds: the tensors, or (in-place cache) buffers with room to grow."""
        return [_with_room(t) for t in tensors] if self.lm.in_place_cache else tensors

    def _sample(self, rows: list[Row], last: np.ndarray) -> list[tuple[Row, str]]:
        last = last[:, : self.lm.n_pieces]  # ids past the tokenizer's pieces cannot be decoded
        greedy = None
        out = []
        for i, r in enumerate(rows):
            if r.plain_greedy:
                if greedy is None:
                    greedy = last.argmax(axis=-1)
                token = int(greedy[i])
            else:
                token = r.sample(last[i : i + 1])
            out.append((r, r.accept(token)))
        return out


# --------------------------------------------------------------------------------------------
# The classifier


class OnnxClassifier(_Bundle):
    """Sequence classification: label and class probabilities per text."""

    def __init__(
        self, bundle: Path, config: BundleConfig, providers: Sequence[str] | None = None, threads: int = 0
    ):
        super().__init__(bundle, config, providers, threads)
        self.labels = list(config.labels or [])
        spec = config.classifier_input
        pre, post = spec.template_parts()
        self._pre, self._post = self.encode(pre) if pre else [], self.encode(post) if post else []
        self.max_len, self.windows = spec.max_len, spec.windows
        try:
            window_room(self._pre, self._post, self.max_len)
        except ValueError as e:
            raise ValueError(f"{bundle / CONFIG_FILE}: classifier_input: {e}") from e

    def input_windows(self, text: str) -> list[list[int]]:
        """The token windows finetuning trained on (gpt.bundle.classification_windows)."""
        return classification_windows(
            self.encode(text), self._pre, self._post, self.max_len, self.windows, self.eos_id
        )

    def logits(self, ids: list[list[int]]) -> np.ndarray:
        """Class logits (B, n_classes) for token id lists (right-padded here; truncated to the context)."""
        ids = [list(x[: self.max_context]) or [self.eos_id] for x in ids]
        T = max(len(x) for x in ids)
        batch = np.full((len(ids), T), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), T), dtype=np.int64)
        for r, x in enumerate(ids):
            batch[r, : len(x)] = x
            mask[r, : len(x)] = 1
        return self.session.run(["logits"], {"input_ids": batch, "attention_mask": mask})[0]

    def log_probs(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """(N, n_classes): per text, the mean of its windows' log-softmax, renormalised (as gptflow evaluate scores it)."""
        flat = [(t, w) for t, text in enumerate(texts) for w in self.input_windows(text)]
        flat.sort(key=lambda item: len(item[1]))  # similar lengths per batch: little padding
        total = np.zeros((len(texts), len(self.labels)), dtype=np.float64)
        count = np.zeros((len(texts), 1), dtype=np.float64)
        for i in range(0, len(flat), batch_size):
            rows = flat[i : i + batch_size]
            for (t, _), row in zip(rows, _log_softmax(self.logits([w for _, w in rows])), strict=True):
                total[t] += row
                count[t] += 1
        return _log_softmax(total / count)

    def classify(self, texts: str | list[str], batch_size: int = 32) -> list[dict[str, Any]]:
        """``[{"label": str, "probs": {label: p}}]``, one per text, read as finetuning read it."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out: list[dict[str, Any]] = []
        for row in np.exp(self.log_probs(texts, batch_size)) if texts else []:
            out.append(
                {
                    "label": self.labels[int(row.argmax())],
                    "probs": {label: float(p) for label, p in zip(self.labels, row, strict=True)},
                }
            )
        return out
