"""Task post-processing on numpy arrays: model outputs -> answers a person reads.

numpy only (no torch, no onnxruntime), because the very same functions run in-process
(``bertops.infer``) and inside Triton's python backend (the generated ``*_postprocess`` model
imports this module), so served and local answers cannot drift.

Every function takes the outputs of one batch and returns one plain JSON-able value per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float32 (float64 accumulation is not needed at these sizes)."""
    x = x.astype(np.float32, copy=False)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def classify(logits: np.ndarray, labels: Sequence[str]) -> list[dict]:
    """(B, C) logits -> [{"label", "score", "probabilities": {label: p}}] per row."""
    probs = softmax(logits)
    out = []
    for row in probs:
        best = int(row.argmax())
        out.append(
            {
                "label": labels[best],
                "score": float(row[best]),
                "probabilities": {labels[i]: float(p) for i, p in enumerate(row)},
            }
        )
    return out


def embeddings(sentence_embedding: np.ndarray) -> list[dict]:
    """(B, H) unit vectors -> [{"embedding": [H floats]}] per row."""
    return [{"embedding": row.astype(np.float32).tolist()} for row in sentence_embedding]


def _split_label(label: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'I-LOC' -> ('I', 'LOC'); 'O' -> ('O', ''); 'PER' -> ('I', 'PER')."""
    if label == "O":
        return "O", ""
    if len(label) > 2 and label[1] == "-" and label[0] in "BIES":
        tag = {"S": "B", "E": "I"}.get(label[0], label[0])
        return tag, label[2:]
    return "I", label


def entity_spans(
    logits: np.ndarray,
    offsets: Sequence[Sequence[tuple[int, int]]],
    word_ids: Sequence[Sequence[int | None]],
    texts: Sequence[str],
    labels: Sequence[str],
) -> list[list[dict]]:
    """Token-classification logits -> entity spans with character offsets into the original text.

    logits: (B, T, C). ``offsets`` and ``word_ids`` come from the tokenizer (special tokens have
    word id None). A word takes the label of its first sub-token ("first" aggregation: a word is
    never split between entities); consecutive words merge under IOB2: ``B-X`` opens an entity,
    ``I-X`` continues an open ``X`` entity (or opens one, leniently, after ``O`` / another type).
    Each span is ``{"entity", "score", "start", "end", "word"}`` with ``text[start:end] == word``;
    the score is the mean over the entity's words of the first sub-token's probability.
    """
    probs = softmax(logits)
    results = []
    for b, text in enumerate(texts):
        words: list[tuple[int, int, int, float]] = []  # (start, end, label id, prob)
        last_word = None
        for t, wid in enumerate(word_ids[b]):
            if wid is None or t >= probs.shape[1]:
                continue
            start, end = offsets[b][t]
            if wid == last_word:  # later sub-token of the same word: widen it, keep its label
                s, _, lab, p = words[-1]
                words[-1] = (s, end, lab, p)
                continue
            lab = int(probs[b, t].argmax())
            words.append((start, end, lab, float(probs[b, t, lab])))
            last_word = wid
        spans: list[dict] = []
        current: dict | None = None
        for start, end, lab, p in words:
            tag, kind = _split_label(labels[lab])
            if tag == "O":
                current = None
                continue
            if tag == "I" and current is not None and current["entity"] == kind:
                current["end"] = end
                current["_scores"].append(p)
                continue
            current = {"entity": kind, "start": start, "end": end, "_scores": [p]}
            spans.append(current)
        for span in spans:
            span["score"] = float(np.mean(span.pop("_scores")))
            span["word"] = text[span["start"] : span["end"]]
        results.append(spans)
    return results


TOP_K_OUTPUTS = ("top_k_scores", "top_k_ids")  # a graph's own top-k (bertops.graph_top_k): (B, T, K) each


def fill_mask(
    logits: np.ndarray,
    input_ids: np.ndarray,
    mask_token_id: int,
    vocab: Sequence[str],
    top_k: int = 5,
) -> list[list[dict]]:
    """(B, T, V) logits -> per row, per [MASK] position: top-k ``{"token", "token_id", "score", "position"}``.

    Rows without a [MASK] give an empty list.
    """

    def candidates(b: int, pos: int) -> tuple[np.ndarray, np.ndarray]:
        probs = softmax(logits[b, pos])
        k = min(top_k, probs.shape[-1])
        top = np.argpartition(-probs, k - 1)[:k]
        top = top[np.argsort(-probs[top], kind="stable")]
        return top, probs[top]

    return _mask_answers(input_ids, mask_token_id, vocab, candidates)


def fill_mask_top_k(
    scores: np.ndarray,
    ids: np.ndarray,
    input_ids: np.ndarray,
    mask_token_id: int,
    vocab: Sequence[str],
    top_k: int = 5,
) -> list[list[dict]]:
    """The same answers as :func:`fill_mask` from a graph that took softmax + top-k itself: (B, T, K)
    ``scores`` (probabilities, best first) and token ``ids``; the first ``top_k`` (at most K) per [MASK]."""
    return _mask_answers(input_ids, mask_token_id, vocab, lambda b, pos: (ids[b, pos, :top_k], scores[b, pos, :top_k]))


def _mask_answers(input_ids: np.ndarray, mask_token_id: int, vocab: Sequence[str], candidates) -> list[list[dict]]:
    """``candidates(row, position) -> (token ids, probabilities)`` best first, for every [MASK] of every row."""
    out = []
    for b in range(input_ids.shape[0]):
        per_mask = []
        for pos in np.flatnonzero(input_ids[b] == mask_token_id):
            top, probs = candidates(b, int(pos))
            per_mask.append([{"token": vocab[int(i)], "token_id": int(i), "score": float(p), "position": int(pos)}
                             for i, p in zip(top, probs)])
        out.append(per_mask)
    return out
