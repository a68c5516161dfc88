"""Tokenizer training on real English text, and BERT's normalisation rules."""

from __future__ import annotations

import re
import unicodedata

import pytest

from bertops.errors import BertopsError
from bertops.tokenizer import encode, load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Python's own documentation (real English prose, shipped with CPython): 4/5 train, 1/5 held out."""
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    train = "\n".join(topics.topics[k] for i, k in enumerate(keys) if i % 5)
    held = "\n".join(topics.topics[k] for i, k in enumerate(keys) if not i % 5)
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "train.txt").write_text(train, encoding="utf-8")
    # a second file, so CJK characters and accented words occur at all
    (folder / "extra.txt").write_text("東京と京都は日本の都市です。\nCafé déjà vu in Zürich.\n" * 3, encoding="utf-8")
    return [folder / "train.txt", folder / "extra.txt"], held


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    return train_tokenizer(corpus[0], tmp_path_factory.mktemp("tok"), vocab_size=3000, show_progress=False)


def test_trained_vocab_is_usable_on_held_out_text(trained, corpus):
    _, held = corpus
    tok = load_tokenizer(trained)
    assert tok.get_vocab_size() == 3000
    lines = [line for line in held.splitlines() if line.strip()]
    unk = tok.token_to_id("[UNK]")
    total = unknown = 0
    for enc in tok.encode_batch(lines):
        total += len(enc.ids) - 2
        unknown += enc.ids.count(unk)
    assert total > 15000  # a real amount of held-out text
    assert unknown / total < 0.01, f"unknown-token rate {unknown / total:.2%}"
    # Round trip: decoding gives back the (lowercased) text, whitespace aside.
    checked = 0
    for line, enc in zip(lines, tok.encode_batch(lines)):
        if unk in enc.ids or len(line) > 400:
            continue
        want = re.sub(r"\s+", "", _strip_accents(line.lower()))
        assert re.sub(r"\s+", "", tok.decode(enc.ids)) == want
        checked += 1
    assert checked > 500


def _strip_accents(text):
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


def test_trained_tokenizer_bert_rules(trained):
    tok = load_tokenizer(trained)
    enc = tok.encode("Café 東京 Déjà")
    # lowercased, accents stripped, every CJK character its own token
    assert "東" in enc.tokens and "京" in enc.tokens
    assert all(t == t.lower() for t in enc.tokens[1:-1])
    assert "é" not in "".join(enc.tokens)
    pair = encode(tok, ["first text"], pairs=["second text"])
    toks = [tok.id_to_token(i) for i in pair.input_ids[0]]
    assert toks[0] == "[CLS]" and toks.count("[SEP]") == 2 and toks[-1] == "[SEP]"
    sep = toks.index("[SEP]")
    assert set(pair.token_type_ids[0, : sep + 1]) == {0} and set(pair.token_type_ids[0, sep + 1 :]) == {1}
    # the same folder loads through vocab.txt + tokenizer_config.json, with the same ids
    assert load_tokenizer(trained / "vocab.txt").encode("Café 東京 Déjà").ids == enc.ids


def test_cased_tokenizer_keeps_case(corpus, tmp_path):
    out = train_tokenizer(corpus[0], tmp_path, vocab_size=3000, lowercase=False, show_progress=False)
    tokens = load_tokenizer(out).encode("Python Lists").tokens
    assert any(t[0].isupper() for t in tokens[1:-1])


def test_trained_tokenizer_loads_in_transformers(trained):
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizerFast.from_pretrained(str(trained))
    ours = load_tokenizer(trained)
    text = "The interpreter evaluates expressions from left to right."
    assert hf(text)["input_ids"] == ours.encode(text).ids


def test_truncation_is_reported(minilm_dir):
    batch = encode(load_tokenizer(minilm_dir), ["word " * 2000, "short"], max_length=32)
    assert batch.input_ids.shape == (2, 32)
    assert batch.truncated == [True, False]


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(BertopsError, match="no tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path)
    with pytest.raises(BertopsError, match="not found"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "out")
