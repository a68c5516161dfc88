"""Post-processing (shared by bertops.infer and the Triton python backend) and length grouping."""

from __future__ import annotations

import numpy as np
import pytest

from bertops import postprocess as pp
from bertops.infer import length_buckets
from bertops.tokenizer import encode, load_tokenizer

LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


def _logits_for(word_labels, batch, row=0):
    """Logits that put the given label on every token of each word (by word id)."""
    logits = np.full((1, batch.input_ids.shape[1], len(LABELS)), -5.0, dtype=np.float32)
    for t, wid in enumerate(batch.word_ids[row]):
        lab = 0 if wid is None else LABELS.index(word_labels.get(wid, "O"))
        logits[0, t, lab] = 5.0
    return logits


@pytest.mark.parametrize(
    "text, tagged, expected",
    [
        ("Angela  Merkel visited   Zürich today.", {0: "B-PER", 1: "I-PER", 3: "B-LOC"}, [("PER", "Angela  Merkel"), ("LOC", "Zürich")]),
        ("Crème Brûlée met José in 東京.", {3: "B-PER", 5: "B-LOC", 6: "I-LOC"}, [("PER", "José"), ("LOC", "東京")]),
        ("Ada Lovelace", {0: "I-PER", 1: "B-PER"}, [("PER", "Ada"), ("PER", "Lovelace")]),
    ],
)
def test_entity_spans_slice_the_original_text(minilm_dir, text, tagged, expected):
    tok = load_tokenizer(minilm_dir)
    batch = encode(tok, [text])
    spans = pp.entity_spans(_logits_for(tagged, batch), batch.offsets, batch.word_ids, [text], LABELS)[0]
    assert [(s["entity"], s["word"]) for s in spans] == expected
    for s in spans:
        assert text[s["start"] : s["end"]] == s["word"] and 0.9 < s["score"] <= 1.0


def test_subword_label_follows_first_piece(minilm_dir):
    tok = load_tokenizer(minilm_dir)
    text = "Rheinhessen"
    batch = encode(tok, [text])
    assert sum(w == 0 for w in batch.word_ids[0]) > 1  # really split into pieces
    logits = _logits_for({0: "B-LOC"}, batch)
    last = max(t for t, w in enumerate(batch.word_ids[0]) if w == 0)
    logits[0, last] = [5.0, -5, -5, -5, -5]  # a later piece says O: the word still is one entity
    spans = pp.entity_spans(logits, batch.offsets, batch.word_ids, [text], LABELS)[0]
    assert [(s["entity"], s["word"]) for s in spans] == [("LOC", "Rheinhessen")]


def test_classify_and_fill_mask():
    out = pp.classify(np.array([[0.0, 2.0], [3.0, -1.0]]), ["neg", "pos"])
    assert [o["label"] for o in out] == ["pos", "neg"]
    assert abs(sum(out[0]["probabilities"].values()) - 1) < 1e-6
    logits = np.zeros((1, 4, 6), dtype=np.float32)
    logits[0, 2, [3, 5, 1]] = [9.0, 8.0, 7.0]
    ids = np.array([[101, 7, 103, 102]])
    masks = pp.fill_mask(logits, ids, 103, list("abcdef"), top_k=2)[0]
    assert len(masks) == 1 and [c["token"] for c in masks[0]] == ["d", "f"]
    assert pp.fill_mask(logits, np.array([[101, 7, 8, 102]]), 103, list("abcdef"))[0] == []


def test_length_buckets_cover_rows_once_and_cut_padding(sentences, minilm_dir):
    lengths = encode(load_tokenizer(minilm_dir), sentences[:32]).lengths.tolist()
    groups = length_buckets(lengths, max_batch=32)
    assert sorted(i for g in groups for i in g) == list(range(32))
    padded = 32 * max(lengths)
    grouped = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert grouped < 0.65 * padded  # the bundled sentences waste most of a padded batch
    assert all(len(g) <= 8 for g in length_buckets(lengths, max_batch=8))
    assert length_buckets([5, 5, 5, 5], max_batch=64) == [[0, 1, 2, 3]]  # equal lengths: one run
    assert length_buckets([], max_batch=4) == []
