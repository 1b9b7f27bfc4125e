"""Stage keys follow content, code and tracking store, never a path's spelling."""

from __future__ import annotations

import os
from types import SimpleNamespace

import mlflow
import pytest

from flows import caching
from flows.caching import (
    data_fingerprint,
    fingerprint,
    fingerprint_value,
    pin_corpus,
    source_hash,
    stage_cache_key,
    stage_dir,
    tree_sha256,
)


@pytest.fixture(autouse=True)
def _own_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFLOW_CACHE_DIR", str(tmp_path / "hash-cache"))
    monkeypatch.setattr(caching, "_hashes", caching._HashCache())


def _age(path, seconds=3600):
    """Make a file look old, so the sidecar cache may keep its hash (fresh files are re-hashed)."""
    t = os.stat(path).st_mtime - seconds
    os.utime(path, (t, t))


def test_directory_key_is_its_content_in_every_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs" / "a").mkdir(parents=True)
    (tmp_path / "docs" / "a" / "one.txt").write_text("first document")
    (tmp_path / "docs" / "two.txt").write_text("second document")
    spellings = ["docs", "docs/", "./docs", str(tmp_path / "docs"), str(tmp_path / "docs") + "/"]
    keys = {fingerprint("shard", corpus=s) for s in spellings}
    assert len(keys) == 1  # a bare directory name is no longer fingerprinted by its name

    (tmp_path / "docs" / "three.txt").write_text("new document arrived")
    assert {fingerprint("shard", corpus=s) for s in spellings}.isdisjoint(keys)


def test_file_key_is_its_content_in_every_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    news = tmp_path / "news.jsonl"
    news.write_text('{"text": "one"}\n')
    spellings = ["news.jsonl", "./news.jsonl", str(news)]
    keys = {fingerprint("shard", corpus=s) for s in spellings}
    assert len(keys) == 1
    with open(news, "a") as f:
        f.write('{"text": "two"}\n')  # appended to, as a growing JSONL file is
    assert {fingerprint("shard", corpus=s) for s in spellings}.isdisjoint(keys)


def test_same_size_rewrite_and_rename_change_the_tree_hash(tmp_path):
    (tmp_path / "a.txt").write_text("aaaa")
    base = tree_sha256(tmp_path)
    (tmp_path / "a.txt").write_text("bbbb")  # same size, new content
    changed = tree_sha256(tmp_path)
    assert changed != base
    (tmp_path / "a.txt").rename(tmp_path / "b.txt")
    assert tree_sha256(tmp_path) not in (base, changed)


def test_unchanged_files_are_not_read_again(tmp_path, monkeypatch):
    f = tmp_path / "big.txt"
    f.write_text("x" * 10_000)
    _age(f)
    first = caching.file_sha256(f)
    reads = []
    real_open = open
    monkeypatch.setattr(
        "builtins.open", lambda p, *a, **k: reads.append(p) or real_open(p, *a, **k), raising=True
    )
    assert caching.file_sha256(f) == first and reads == []  # answered from the sidecar: no read


def test_builtin_names_are_not_paths_even_if_a_folder_has_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bbc").mkdir()
    (tmp_path / "bbc" / "x.txt").write_text("shadow")
    assert fingerprint_value("bbc") == "bbc"
    assert fingerprint_value("models:/gptflow-lm@champion") == "models:/gptflow-lm@champion"


def test_data_fingerprint_ignores_spelling_but_not_suffix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text("a,b\n")
    (tmp_path / "c.csv").write_text("a,b\n")  # same bytes, read differently
    assert data_fingerprint("c.txt") == data_fingerprint(str(tmp_path / "c.txt"))
    assert data_fingerprint("c.txt") != data_fingerprint("c.csv")


def test_code_change_changes_the_stage_key_and_directory(tmp_path, monkeypatch):
    lib = tmp_path / "repo" / "gpt"
    lib.mkdir(parents=True)
    (lib / "model.py").write_text("X = 1\n")
    monkeypatch.setattr(caching, "ROOT", tmp_path / "repo")
    source_hash.cache_clear()
    before = stage_dir("pretrain", tmp_path, "flows.pretrain", data="d")
    (lib / "model.py").write_text("X = 2  # a bug fix\n")
    source_hash.cache_clear()
    after = stage_dir("pretrain", tmp_path, "flows.pretrain", data="d")
    source_hash.cache_clear()
    assert before != after

    monkeypatch.setattr(caching, "package_version", lambda: "9.9.9")
    assert stage_dir("pretrain", tmp_path, "flows.pretrain", data="d") != after
    source_hash.cache_clear()


def test_tracking_store_is_part_of_the_cache_key_but_not_of_the_output_dir(tmp_path, monkeypatch):
    def fn():  # stands in for a stage task's function
        pass

    context = SimpleNamespace(task=SimpleNamespace(name="shard", fn=fn))
    params = {"corpus": "bbc", "out_dir": str(tmp_path / "out"), "parent_run_id": "r1"}
    old = mlflow.get_tracking_uri()
    # set_tracking_uri exports MLFLOW_TRACKING_URI; monkeypatch puts the variable back afterwards.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", old)
    try:
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'a.db'}")
        a = stage_cache_key(context, params)
        assert stage_cache_key(context, {**params, "parent_run_id": "r2"}) == a  # where, not what
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'b.db'}")
        b = stage_cache_key(context, params)
    finally:
        mlflow.set_tracking_uri(old)
    assert a != b  # another store: the task runs again (finds its output, logs it there)
    assert stage_dir("shard", tmp_path, corpus="bbc") == stage_dir("shard", tmp_path, corpus="bbc")


def test_hub_corpus_pins_and_says_so_when_it_cannot(monkeypatch, caplog):
    assert pin_corpus("hf:user/news@abc123") == "hf:user/news@abc123"
    assert pin_corpus("bbc") == "bbc"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level("WARNING"):
        assert pin_corpus("hf:user/news") == "hf:user/news"
    assert "not pinned" in caplog.text


def test_each_configure_in_one_process_uses_its_own_store(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: a second pipeline in the same process must
    not mistake the first one's store for the user's choice."""
    from flows import tracking

    old = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", old)
    monkeypatch.setattr(tracking, "_USER_TRACKING_URI", None)
    try:
        tracking.configure(tmp_path / "a")
        first = mlflow.get_tracking_uri()
        tracking.configure(tmp_path / "b")
        second = mlflow.get_tracking_uri()
    finally:
        mlflow.set_tracking_uri(old)
    assert first == f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    assert second == f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
