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


def test_graph_top_k_answers_equal_fill_mask(tmp_path):
    """An encoder graph with softmax + top-k appended (bertops.triton.graph_top_k, the gpu flavor's) gives
    fill_mask_top_k the answers fill_mask gives from the full logits, fp32 and fp16 logits alike."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from bertops.triton.graph_top_k import add_top_k

    rng = np.random.default_rng(0)
    vocab = [f"t{i}" for i in range(50)]
    ids = np.array([[101, 103, 7, 103, 102], [101, 9, 103, 102, 0]])
    for dtype, elem in ((np.float32, TensorProto.FLOAT), (np.float16, TensorProto.FLOAT16)):
        logits = (rng.standard_normal((2, 5, 50)) * 4).astype(dtype)
        graph = helper.make_graph(  # a stand-in encoder: its "logits" output is an identity of an input
            [helper.make_node("Identity", ["x"], ["logits"])], "enc",
            [helper.make_tensor_value_info("x", elem, ["batch", "sequence", 50])],
            [helper.make_tensor_value_info("logits", elem, ["batch", "sequence", 50])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "enc.onnx"))
        add_top_k(tmp_path / "enc.onnx", tmp_path / "topk.onnx", "logits", 5)
        session = ort.InferenceSession(str(tmp_path / "topk.onnx"), providers=["CPUExecutionProvider"])
        scores, top = session.run(list(pp.TOP_K_OUTPUTS), {"x": logits})
        assert scores.shape == top.shape == (2, 5, 5) and scores.dtype == np.float32
        want = pp.fill_mask(logits.astype(np.float32), ids, 103, vocab, top_k=3)
        got = pp.fill_mask_top_k(scores, top, ids, 103, vocab, top_k=3)
        assert [[[c["token_id"] for c in m] for m in row] for row in got] == \
            [[[c["token_id"] for c in m] for m in row] for row in want]
        assert [len(row) for row in got] == [2, 1]
        for g, w in zip(sum(sum(got, []), []), sum(sum(want, []), [])):
            assert g["position"] == w["position"] and abs(g["score"] - w["score"]) < 1e-5


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
