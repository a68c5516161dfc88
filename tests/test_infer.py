"""bertops.infer: length-grouped onnxruntime predictions equal PyTorch's, for every task.

Each test runs on an fp32 export and on an int8 one (default accuracy gate): fp32 answers equal
PyTorch's up to float noise, int8 answers stay within the gate (conftest: ATOL, near_top, the gate's
cosines and entity F1).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import (
    ATOL,
    NER_LABELS,
    PRECISIONS,
    assert_embeddings_within_gate,
    assert_int8_export,
    gate_limits,
    near_top,
    span_f1,
)

from bertops.checkpoint import load_model
from bertops.errors import BertopsError
from bertops.infer import load_predictor, predict_file
from bertops.tasks import TaskInfo, get_task
from bertops.tokenizer import encode, load_tokenizer

TRICKY = ["Crème brûlée in Zürich with José.", "東京 and 京都 are   cities.", "  leading and trailing  ", "x"]


def _torch_answers(model_dir, task, texts, info, pairs=None):
    """The same task post-processing applied to PyTorch outputs on one padded batch."""
    model, _ = load_model(model_dir, task)
    batch = encode(load_tokenizer(model_dir), texts, pairs)
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in batch.arrays().items()})
    outs = {k: v.numpy() for k, v in out.items()}
    return get_task(task).postprocess(outs, batch.input_ids, batch.offsets, batch.word_ids, texts, info)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_real_embeddings_grouped_equal_padded_and_torch(exported, minilm_dir, sentences, precision):
    folder = exported("embeddings", real=True, precision=precision)
    texts = sentences[:64] + TRICKY
    default = load_predictor(folder)
    assert default.group_by_length  # the CPU provider's default; CUDA's is one padded run (groups_by_length)
    grouped = default.predict(texts, batch_size=32)
    padded = load_predictor(folder, group_by_length=False).predict(texts, batch_size=32)
    ref = _torch_answers(minilm_dir, "embeddings", texts, TaskInfo())
    g = np.array([a["embedding"] for a in grouped])
    assert g.shape == (len(texts), 384)
    p = np.array([a["embedding"] for a in padded])
    r = np.array([a["embedding"] for a in ref])
    if precision == "fp32":
        assert np.abs(g - p).max() < 1e-5
        assert np.abs(g - r).max() < 1e-4
    else:  # another batching quantizes the activations with another range: both stay within the gate
        assert_int8_export(folder)
        assert_embeddings_within_gate(g, r, texts)
        assert_embeddings_within_gate(p, r, texts)
        assert_embeddings_within_gate(g, p, texts)
    assert not any(a["truncated"] for a in grouped)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_classification_ner_fill_mask_match_torch(exported, tiny_checkpoint, sentences, precision):
    texts = sentences[:20] + TRICKY
    cls_dir = exported("sequence-classification", precision=precision, num_labels=3)
    pred = load_predictor(cls_dir)
    ref = _torch_answers(tiny_checkpoint("sequence-classification", num_labels=3), "sequence-classification", texts, pred.info)
    got = pred.predict(texts)
    if precision == "fp32":
        assert [a["label"] for a in got] == [r["label"] for r in ref]
    else:  # int8: PyTorch's label, or one whose PyTorch probability ties it within the tolerance
        assert_int8_export(cls_dir)
        for a, r in zip(got, ref):
            labels = list(r["probabilities"])
            assert near_top(list(r["probabilities"].values()), [labels.index(a["label"])], 2 * ATOL[precision]), (a, r)
    assert max(abs(a["score"] - r["score"]) for a, r in zip(got, ref)) < ATOL[precision]
    pairs = pred.predict(texts[:5], pairs=texts[5:10])
    assert len(pairs) == 5 and all("label" in p for p in pairs)

    ner_dir = exported("token-classification", precision=precision, num_labels=5, id2label=NER_LABELS)
    pred = load_predictor(ner_dir)
    assert pred.info.labels == tuple(NER_LABELS.values())
    ref = _torch_answers(tiny_checkpoint("token-classification", num_labels=5, id2label=NER_LABELS),
                         "token-classification", texts, pred.info)
    got = pred.predict(texts)
    strip = lambda ents: [(e["entity"], e["start"], e["end"], e["word"]) for e in ents]  # noqa: E731
    if precision == "fp32":
        assert [strip(a["entities"]) for a in got] == [strip(r["entities"]) for r in ref]
    else:  # int8: entity F1 against PyTorch's spans within the gate's drop (measured: identical spans)
        assert_int8_export(ner_dir)
        assert 100 * (1 - span_f1(got, ref)) <= gate_limits().max_drop_points, span_f1(got, ref)
    assert sum(len(a["entities"]) for a in got) > 0  # a random head still tags something
    for text, answer in zip(texts, got):
        for ent in answer["entities"]:
            assert text[ent["start"] : ent["end"]] == ent["word"]

    fm_dir = exported("fill-mask", precision=precision)
    pred = load_predictor(fm_dir)
    masked = ["The capital of France is [MASK].", "No mask here.", "[MASK] and [MASK] again."]
    got = pred.predict(masked, top_k=3)
    ref = _torch_answers(tiny_checkpoint("fill-mask"), "fill-mask", masked, TaskInfo(vocab=pred.info.vocab, mask_token_id=pred.info.mask_token_id, top_k=3))
    assert [len(a["masks"]) for a in got] == [1, 0, 2]
    if precision == "fp32":
        assert [[[c["token_id"] for c in m] for m in a["masks"]] for a in got] == [
            [[c["token_id"] for c in m] for m in r["masks"]] for r in ref
        ]
    else:  # int8: a top-3 of PyTorch's logits up to ties within the tolerance (measured: int8 moves them <= 8e-5)
        assert_int8_export(fm_dir)
        model, _ = load_model(tiny_checkpoint("fill-mask"), "fill-mask")
        batch = encode(load_tokenizer(fm_dir), masked)
        with torch.no_grad():
            logits = model(**{k: torch.from_numpy(v) for k, v in batch.arrays().items()})["logits"].numpy()
        for row, answer in enumerate(got):
            for m in answer["masks"]:
                ids = [c["token_id"] for c in m]
                assert near_top(logits[row, m[0]["position"]], ids, ATOL[precision]), (masked[row], ids)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_long_text_is_truncated_and_reported(exported, precision):
    pred = load_predictor(exported("embeddings", real=True, precision=precision), max_length=128)
    answers = pred.predict(["word " * 5000, "short"])
    assert [a["truncated"] for a in answers] == [True, False]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_predict_file_jsonl(exported, tmp_path, precision):
    folder = exported("sequence-classification", precision=precision, num_labels=3)
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "first", "id": 7}\nplain line of text\n\n{"text": "a", "text_pair": "b"}\n')
    n = predict_file(load_predictor(folder), src, tmp_path / "out.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert n == 3 and len(lines) == 3
    assert lines[0]["id"] == 7 and lines[0]["label"] in ("LABEL_0", "LABEL_1", "LABEL_2")
    src.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(BertopsError, match=r"in.jsonl:2 has no string field \"text\""):
        predict_file(load_predictor(folder), src, tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()


def test_predict_errors(tmp_path, exported):
    with pytest.raises(BertopsError, match="has no model.onnx"):
        load_predictor(tmp_path)
    with pytest.raises(BertopsError, match="not pairs"):
        load_predictor(exported("embeddings", real=True)).predict(["a"], pairs=["b"])
