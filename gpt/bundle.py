"""The bundle format in one place: file names, special ids, ONNX I/O names, ``config.json``'s schema
(``BundleConfig``) and the rule that cuts a text into classifier windows.

Standard library only: the torch-free runtime (``deploy/``) imports it. A bundle directory holds
    model.onnx          the graph (decoder with KV cache, or classifier)
    tokenizer.model     the sentencepiece model
    config.json         BundleConfig: what a runtime needs to read the graph and the tokenizer
    genai_config.json   (LM only) onnxruntime-genai's description of the same graph
    manifest.json       written last by the export stage
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.io import atomic_write_json

FORMAT = "gptflow-onnx-bundle"
FORMAT_VERSION = 2
# Older layouts that still load (BundleConfig.from_dict upgrades them):
#   1  the first exporter's; it named the tokenizer hash "tokenizer_sha256"
#   0  no "format" key: bundles built by hand (the benchmarks did), also with "tokenizer_sha256"
_OLD_TOKENIZER_HASH = "tokenizer_sha256"

ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.model"  # the same name in a model directory and a shard directory
CONFIG_FILE = "config.json"
GENAI_CONFIG_FILE = "genai_config.json"
BUNDLE_DIR = "bundle"  # the folder an export stage writes its bundle into

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}

KINDS = ("lm", "classifier")
PRECISIONS = ("fp32", "int8", "int4")
# How the decoder graph returns its cache: "concat", present = past + new, a fresh tensor each step;
# "in_place", it may also be handed a past buffer longer than its tokens, bound as its own present,
# and then writes only the new columns (GroupQueryAttention, gpt/onnx_ops.py).
KV_CACHES = ("concat", "in_place")

# ONNX I/O (optimum's names, so other tools can run the decoder graph). The %d is the layer.
INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
# An optional decoder input (int64 [1], default 0 = every position): logits for the last N positions
# only. Bundles exported before it lack it and always return every position's logits.
LOGITS_TO_KEEP = "logits_to_keep"


def lm_io_names(n_layer: int) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of the decoder graph: ids, mask, positions and the past per layer (key,
    value) -> logits and the present per layer, in that order."""
    inputs, outputs = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS], [LOGITS]
    for i in range(n_layer):
        inputs += [PAST_KEY % i, PAST_VALUE % i]
        outputs += [PRESENT_KEY % i, PRESENT_VALUE % i]
    return inputs, outputs


def classifier_io_names() -> tuple[list[str], list[str]]:
    """(inputs, outputs) of the classifier graph: right-padded ids and their mask -> class logits."""
    return [INPUT_IDS, ATTENTION_MASK], [LOGITS]


# --------------------------------------------------------------------------------------------
# The classification window rule


def window_room(pre_ids: Sequence[int], post_ids: Sequence[int], max_len: int) -> int:
    """Input tokens per window: ``max_len`` less EOS, the template around the input and the final EOS."""
    room = max_len - 2 - len(pre_ids) - len(post_ids)
    if room < 1:
        raise ValueError(
            f"max_len={max_len} leaves no room for the input: 2 EOS + {len(pre_ids) + len(post_ids)} "
            "prompt-template tokens fill it; raise max_len or shorten the template"
        )
    return room


def classification_windows(
    ids: Sequence[int],
    pre_ids: Sequence[int],
    post_ids: Sequence[int],
    max_len: int,
    windows: int = 1,
    eos_id: int = EOS_ID,
) -> list[list[int]]:
    """A text's token ids cut into up to ``windows`` consecutive pieces, each encoded as
    EOS + template-before-input + piece + template-after-input + EOS (at most ``max_len`` ids).

    The classifier pools at the final EOS. A last piece shorter than a quarter window is dropped when
    there are others: a few words carry little evidence. An empty text gives one window.
    """
    room = window_room(pre_ids, post_ids, max_len)
    ids = list(ids)
    pieces = [ids[i : i + room] for i in range(0, min(len(ids), room * windows), room)] or [[]]
    if len(pieces) > 1 and len(pieces[-1]) < room / 4:
        pieces.pop()
    return [[eos_id, *pre_ids, *piece, *post_ids, eos_id] for piece in pieces]


def repeated_ngram_bans(output: Sequence[int], n: int) -> set[int]:
    """The tokens that would make the last ``n`` tokens of ``output`` an n-gram it already holds.

    The no-repeat-n-gram guard of fairseq and HF ``generate``, over the generated tokens only (a
    headline may copy phrases from its article; it must not loop on its own). Torch generation
    (``gpt.generate``, hence evaluation) and the onnxruntime runtime and server all call this one
    function, so a bundle decodes as its task was scored. ``n`` 0 is off.
    """
    if n <= 0 or len(output) < n:
        return set()
    tail = tuple(output[len(output) - n + 1 :])
    return {output[i + n - 1] for i in range(len(output) - n + 1) if tuple(output[i : i + n - 1]) == tail}


# Decoding defaults a bundle may carry (``BundleConfig.generation``): what its task was scored with.
GENERATION_KEYS = {"no_repeat_ngram_size": int, "max_new_tokens": int, "stop": list}


# --------------------------------------------------------------------------------------------
# config.json

_MODEL_INTS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _type_error(name: str, value: Any, want: str) -> ValueError:
    return ValueError(f"field {name!r} must be {want}, got {value!r}")


@dataclass
class ClassifierInput:
    """How finetuning encoded a text (``classification_windows``); the runtime repeats it."""

    max_len: int  # ids per window, both EOS included (<= the context length)
    windows: int = 1  # pieces of a long text read, each a window; their log-probs are averaged
    prompt_template: str = "{input}"  # text around the input; "{input}" marks where it goes

    def __post_init__(self) -> None:
        for name in ("max_len", "windows"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise _type_error(f"classifier_input.{name}", value, "an integer >= 1")
        if not isinstance(self.prompt_template, str) or "{input}" not in self.prompt_template:
            raise _type_error(
                "classifier_input.prompt_template", self.prompt_template, "a string with '{input}'"
            )

    def template_parts(self) -> tuple[str, str]:
        """(text before the input, text after it)."""
        pre, post = self.prompt_template.split("{input}", 1)
        return pre, post


@dataclass
class BundleConfig:
    """``config.json``: what the graph is, how to read its tokenizer, and what the export measured.

    ``model`` is the ``gpt.config.ModelConfig`` dict the graph was exported from; the shape the
    runtime needs (``vocab_size``, ``context_length``, ``n_layer``, ``n_head``, ``head_dim``,
    ``n_classes``) is read from it. The report fields are written by the export and never required.
    """

    kind: str  # lm | classifier
    model: dict[str, Any]
    tokenizer_hash: str  # sha256 of tokenizer.model (the name model.json uses too)
    special_ids: dict[str, int] = field(default_factory=lambda: dict(SPECIAL_IDS))
    add_bos: bool = False  # the runtime prepends BOS to prompts (an empty prompt always starts from BOS)
    labels: list[str] | None = None  # classifier: one name per class, in logit order
    classifier_input: ClassifierInput | None = None  # classifier: how a text becomes windows
    precision: str = "fp32"  # fp32 | int8 | int4
    kv_cache: str = "concat"  # LM: concat | in_place (KV_CACHES); bundles before it are concat
    quantization: dict[str, Any] | None = None  # int8/int4: how (method, bits, block size, accuracy level)
    name: str | None = None  # the served model name (default: the bundle directory's name)
    generation: dict[str, Any] | None = None  # LM: decoding defaults (GENERATION_KEYS) of its task
    # Reports from the export
    opset: int | None = None
    io: dict[str, Any] | None = None
    source_checkpoint: dict[str, Any] | None = None
    export_config: dict[str, Any] | None = None
    versions: dict[str, str] | None = None
    parity: dict[str, Any] | None = None
    quality_cost: dict[str, Any] | None = None
    size_bytes: int | None = None
    param_bytes: int | None = None
    fp32_bundle: str | None = None  # int8/int4: the fp32 bundle it was quantized from
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as read
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.validate()

    # The shape, from the model config ---------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.model["vocab_size"]

    @property
    def context_length(self) -> int:
        return self.model["block_size"]

    @property
    def n_layer(self) -> int:
        return self.model["n_layer"]

    @property
    def n_head(self) -> int:
        return self.model["n_head"]

    @property
    def head_dim(self) -> int:
        return self.model["n_embd"] // self.model["n_head"]

    @property
    def n_classes(self) -> int:
        return self.model.get("n_classes", 0)

    # Validation -------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ValueError naming the first field that is missing, ill-typed or inconsistent."""
        if self.format != FORMAT:
            raise ValueError(f"unknown bundle format {self.format!r}; expected {FORMAT!r}")
        if self.format_version != FORMAT_VERSION:
            raise _type_error("format_version", self.format_version, str(FORMAT_VERSION))
        if self.kind not in KINDS:
            raise _type_error("kind", self.kind, " or ".join(map(repr, KINDS)))
        if not isinstance(self.model, dict):
            raise _type_error("model", self.model, "a mapping (the ModelConfig dict)")
        for key in _MODEL_INTS:
            if key not in self.model:
                raise ValueError(f"field 'model.{key}' is missing")
            if not _is_int(self.model[key]) or self.model[key] < 1:
                raise _type_error(f"model.{key}", self.model[key], "an integer >= 1")
        if self.model["n_embd"] % self.model["n_head"]:
            raise ValueError(
                f"field 'model.n_embd'={self.model['n_embd']} is not divisible by n_head={self.model['n_head']}"
            )
        if not _is_int(self.n_classes) or self.n_classes < 0:
            raise _type_error("model.n_classes", self.n_classes, "an integer >= 0")
        if (self.kind == "classifier") != (self.n_classes > 0):
            raise ValueError(
                f"field 'kind'={self.kind!r} disagrees with model.n_classes={self.n_classes} "
                "(a classifier has n_classes > 0, an LM 0)"
            )
        if not isinstance(self.tokenizer_hash, str) or not _SHA256.fullmatch(self.tokenizer_hash):
            raise _type_error("tokenizer_hash", self.tokenizer_hash, "a sha256 hex digest (64 characters)")
        if not isinstance(self.special_ids, dict) or set(self.special_ids) != set(SPECIAL_IDS):
            raise _type_error("special_ids", self.special_ids, f"a mapping with keys {sorted(SPECIAL_IDS)}")
        for key, value in self.special_ids.items():
            if not _is_int(value) or not 0 <= value < self.vocab_size:
                raise _type_error(f"special_ids.{key}", value, f"an id in [0, {self.vocab_size})")
        if not isinstance(self.add_bos, bool):
            raise _type_error("add_bos", self.add_bos, "true or false")
        if self.precision not in PRECISIONS:
            raise _type_error("precision", self.precision, " or ".join(map(repr, PRECISIONS)))
        if self.kv_cache not in KV_CACHES:
            raise _type_error("kv_cache", self.kv_cache, " or ".join(map(repr, KV_CACHES)))
        self._validate_generation()
        if self.kind == "classifier":
            self._validate_classifier()
        elif self.labels is not None or self.classifier_input is not None:
            raise ValueError(
                "fields 'labels' and 'classifier_input' are for classifiers; this bundle is an LM"
            )
        for name, want in (
            ("name", str),
            ("fp32_bundle", str),
            ("quantization", dict),
            ("io", dict),
            ("source_checkpoint", dict),
            ("export_config", dict),
            ("versions", dict),
            ("parity", dict),
            ("quality_cost", dict),
            ("extra", dict),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, want):
                raise _type_error(name, value, "a string" if want is str else "a mapping")
        for name in ("opset", "size_bytes", "param_bytes"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise _type_error(name, value, "an integer >= 0")

    def _validate_generation(self) -> None:
        if self.generation is None:
            return
        if not isinstance(self.generation, dict):
            raise _type_error("generation", self.generation, "a mapping")
        for key, value in self.generation.items():
            want = GENERATION_KEYS.get(key)
            if want is None:
                raise ValueError(
                    f"field 'generation' has unknown key {key!r}; known: {sorted(GENERATION_KEYS)}"
                )
            ok = _is_int(value) and value >= 0 if want is int else isinstance(value, want)
            if key == "stop":
                ok = ok and all(isinstance(x, str) and x for x in value)
            if not ok:
                raise _type_error(f"generation.{key}", value, f"a valid {want.__name__}")

    def _validate_classifier(self) -> None:
        labels = self.labels
        if labels is None:
            raise ValueError("field 'labels' is missing (a classifier names its classes)")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise _type_error("labels", labels, "a list of strings")
        if len(labels) != self.n_classes:
            raise ValueError(
                f"field 'labels' has {len(labels)} names for model.n_classes={self.n_classes} classes"
            )
        if not isinstance(self.classifier_input, ClassifierInput):
            raise ValueError("field 'classifier_input' is missing (max_len, windows, prompt_template)")
        if self.classifier_input.max_len > self.context_length:
            raise ValueError(
                f"field 'classifier_input.max_len'={self.classifier_input.max_len} exceeds the context "
                f"length {self.context_length}"
            )

    # dict / JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: known fields (None ones left out), the shape for other readers, then ``extra``."""
        self.validate()
        out: dict[str, Any] = {"format": self.format, "format_version": self.format_version}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("format", "format_version", "extra") or value is None:
                continue
            out[f.name] = dataclasses.asdict(value) if isinstance(value, ClassifierInput) else value
            if f.name == "model":  # derived, for readers that do not know ModelConfig's names
                out.update(context_length=self.context_length, vocab_size=self.vocab_size)
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Any) -> BundleConfig:
        """Validate a parsed config.json, upgrading the older layouts; ValueError names the problem."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        fmt = data.get("format")
        if fmt is None and "format_version" not in data:
            version = 0
        else:
            if fmt != FORMAT:
                raise ValueError(f"unknown bundle format {fmt!r}; expected {FORMAT!r}")
            version = data.get("format_version")
            if not _is_int(version) or version < 1:
                raise _type_error("format_version", version, "an integer >= 1")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"format_version {version} is newer than this code reads (up to {FORMAT_VERSION}); "
                "upgrade gptflow, or export the checkpoint again with this version"
            )
        if version < 2 and "tokenizer_hash" not in data and _OLD_TOKENIZER_HASH in data:
            data["tokenizer_hash"] = data.pop(_OLD_TOKENIZER_HASH)
        data["format"], data["format_version"] = FORMAT, FORMAT_VERSION
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        for required in ("kind", "model", "tokenizer_hash"):
            if required not in data:
                raise ValueError(f"field {required!r} is missing")
        model = data["model"]
        for key, value in (("context_length", "block_size"), ("vocab_size", "vocab_size")):
            # Written for other readers; they must agree with the model config they are derived from.
            if key in data and isinstance(model, dict) and data[key] != model.get(value):
                raise ValueError(
                    f"field {key!r}={data[key]!r} disagrees with model.{value}={model.get(value)!r}"
                )
            data.pop(key, None)
        spec = data.get("classifier_input")
        if isinstance(spec, dict):
            unknown = set(spec) - {f.name for f in dataclasses.fields(ClassifierInput)}
            if unknown:
                raise ValueError(f"field 'classifier_input' has unknown keys {sorted(unknown)}")
            if "max_len" not in spec:
                raise ValueError("field 'classifier_input.max_len' is missing")
            data["classifier_input"] = ClassifierInput(**spec)
        elif spec is not None:
            raise _type_error("classifier_input", spec, "a mapping")
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def read(cls, bundle_dir: str | Path) -> BundleConfig:
        """``bundle_dir/config.json``, validated; errors name the file and the problem."""
        bundle = Path(bundle_dir)
        path = bundle / CONFIG_FILE
        if not bundle.is_dir():
            raise FileNotFoundError(f"bundle directory not found: {bundle}; create one with `gptflow export`")
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: {bundle} is not a complete bundle; re-run `gptflow export`"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is corrupt ({e}); re-run `gptflow export`") from e
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e

    def write(self, bundle_dir: str | Path) -> Path:
        """Write ``bundle_dir/config.json`` atomically (temp file + rename); returns its path."""
        path = Path(bundle_dir) / CONFIG_FILE
        try:
            data = self.to_dict()
        except ValueError as e:
            raise ValueError(f"{path}: not written: {e}") from e
        atomic_write_json(path, data)
        return path


def genai_config(config: BundleConfig) -> dict[str, Any]:
    """onnxruntime-genai's description of the decoder graph: model ``type: "decoder"`` with our I/O
    names (its ``gpt2`` type expects other input names). An ``in_place`` graph can share one buffer
    between past and present (``past_present_share_buffer``); a ``concat`` one returns a fresh one."""
    n_embd, n_head, ids = config.model["n_embd"], config.n_head, config.special_ids
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": ids["bos"],
            "eos_token_id": ids["eos"],
            "pad_token_id": ids["pad"],
            "context_length": config.context_length,
            "vocab_size": config.vocab_size,
            "decoder": {
                "filename": ONNX_FILE,
                "head_size": config.head_dim,
                "hidden_size": n_embd,
                "num_attention_heads": n_head,
                "num_key_value_heads": n_head,
                "num_hidden_layers": config.n_layer,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "inputs": {
                    "input_ids": INPUT_IDS,
                    "attention_mask": ATTENTION_MASK,
                    "position_ids": POSITION_IDS,
                    "past_key_names": PAST_KEY,
                    "past_value_names": PAST_VALUE,
                },
                "outputs": {
                    "logits": LOGITS,
                    "present_key_names": PRESENT_KEY,
                    "present_value_names": PRESENT_VALUE,
                },
            },
        },
        "search": {
            "do_sample": False,
            "max_length": config.context_length,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": config.kv_cache == "in_place",
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
        },
    }
