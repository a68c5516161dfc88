"""The fine-tuning slots of the built-in tasks: collate (examples -> tensors), loss, and metrics.

Signatures (the contract :mod:`bertops.finetune` calls, and a user's own task fills the same way):

* ``collate(examples, ctx: Collation) -> dict`` of torch tensors: the model inputs ``input_ids``,
  ``attention_mask``, ``token_type_ids`` plus whatever the loss and metrics read (``labels`` ...);
* ``loss(outputs, batch) -> scalar tensor``, where ``outputs`` is the model's forward dict;
* ``metrics(outputs, batches, info: TaskInfo) -> {name: float}`` over a whole evaluation:
  ``outputs`` and ``batches`` are lists (one entry per evaluated batch) of dicts of numpy arrays
  (the task's ``reads`` outputs, and the collated batch).

Sequence classification: cross-entropy; accuracy and macro-F1 (scikit-learn). Token classification:
the label sits on the first sub-word of each word, the other sub-words are -100 (ignored); token
accuracy (words cut off by truncation count as wrong), macro-F1 over tags, and for IOB tag sets
entity precision / recall / F1 from ``seqeval`` in strict IOB2 mode (an ``I-X`` without ``B-X``
opens no entity). ``f1`` is entity F1 for IOB tag sets and micro-F1 over words (= accuracy) for
plain tag sets such as POS. Embeddings: in-batch-negatives contrastive loss over text pairs
(anchor i must score its own positive above the batch's other positives; cosine x 20, as
sentence-transformers' MultipleNegativesRankingLoss); retrieval recall@1/@5 and MRR of each text's
pair among all evaluated pairs, and Spearman (scipy) of cosine vs a score when examples carry one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bertops.data.labeled import OUTSIDE, is_iob
from bertops.tasks import TaskInfo

IGNORE = -100
CONTRASTIVE_SCALE = 20.0
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Collation:
    """What collation needs besides the examples."""

    tokenizer: object  # tokenizers.Tokenizer
    labels: tuple[str, ...]  # index order
    max_length: int
    pad_to_multiple_of: int = 8

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}


def _pad(encodings: Sequence, ctx: Collation, width: int | None = None) -> dict[str, torch.Tensor]:
    longest = max([len(e.ids) for e in encodings] + [1])
    m = ctx.pad_to_multiple_of
    width = max(width or 0, min(-(-longest // m) * m, max(ctx.max_length, longest)))
    ids = np.zeros((len(encodings), width), dtype=np.int64)
    mask, types = np.zeros_like(ids), np.zeros_like(ids)
    for i, e in enumerate(encodings):
        n = len(e.ids)
        ids[i, :n], mask[i, :n], types[i, :n] = e.ids, e.attention_mask, e.type_ids
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "token_type_ids": torch.from_numpy(types)}


def _encode(tok, inputs, max_length: int, pretokenized: bool = False):
    tok.enable_truncation(max_length=max_length, strategy="longest_first")
    return tok.encode_batch(inputs, is_pretokenized=pretokenized)


# --- sequence classification (single texts and pairs) -----------------------------------------------


def collate_sequences(examples: Sequence[dict], ctx: Collation) -> dict[str, torch.Tensor]:
    pairs = any(ex.get("text_pair") is not None for ex in examples)
    inputs = [(ex["text"], ex.get("text_pair") or "") if pairs else ex["text"] for ex in examples]
    batch = _pad(_encode(ctx.tokenizer, inputs, ctx.max_length), ctx)
    if all(ex.get("label") is not None for ex in examples):
        ids = ctx.label2id
        batch["labels"] = torch.tensor([ids[ex["label"]] for ex in examples], dtype=torch.int64)
    return batch


def classification_loss(outputs: dict, batch: dict) -> torch.Tensor:
    return F.cross_entropy(outputs["logits"].float(), batch["labels"].view(-1))


def classification_metrics(outputs: list[dict], batches: list[dict], info: TaskInfo) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    pred = np.concatenate([o["logits"].argmax(-1) for o in outputs]) if outputs else np.zeros(0, np.int64)
    gold = np.concatenate([b["labels"].reshape(-1) for b in batches]) if batches else np.zeros(0, np.int64)
    if not len(gold):
        return {"accuracy": 0.0, "macro_f1": 0.0, "examples": 0.0}
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
        "examples": float(len(gold)),
    }


# --- token classification ---------------------------------------------------------------------------


def collate_tokens(examples: Sequence[dict], ctx: Collation) -> dict[str, torch.Tensor]:
    """Words in, the label on each word's first sub-word, -100 on the rest and on special tokens."""
    encodings = _encode(ctx.tokenizer, [ex["tokens"] for ex in examples], ctx.max_length, pretokenized=True)
    batch = _pad(encodings, ctx)
    labels = torch.full_like(batch["input_ids"], IGNORE)
    ids = ctx.label2id
    has_tags = all(ex.get("tags") is not None for ex in examples)
    for i, (ex, enc) in enumerate(zip(examples, encodings)):
        previous = None
        for t, word in enumerate(enc.word_ids):
            if word is not None and word != previous and has_tags:
                labels[i, t] = ids[ex["tags"][word]]
            previous = word
    if has_tags:
        batch["labels"] = labels
        # every word's gold tag, truncated ones included, so metrics count what truncation lost
        word_labels = torch.full((len(examples), max(len(ex["tokens"]) for ex in examples)), IGNORE, dtype=torch.int64)
        for i, ex in enumerate(examples):
            word_labels[i, : len(ex["tags"])] = torch.tensor([ids[t] for t in ex["tags"]], dtype=torch.int64)
        batch["word_labels"] = word_labels
    return batch


def token_loss(outputs: dict, batch: dict) -> torch.Tensor:
    logits = outputs["logits"]
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].view(-1), ignore_index=IGNORE)


def word_tags(outputs: list[dict], batches: list[dict], labels: Sequence[str]) -> tuple[list[list[str]], list[list]]:
    """(gold, predicted) tag sequences per sentence, one tag per word.

    A word's prediction is its first sub-word's; words truncated away have none (``None``).
    """
    gold_all, pred_all = [], []
    for out, batch in zip(outputs, batches):
        pred_ids = out["logits"].argmax(-1)
        for row in range(batch["labels"].shape[0]):
            first = batch["labels"][row] != IGNORE
            pred = [labels[i] for i in pred_ids[row][first[: pred_ids.shape[1]]]]
            if "word_labels" in batch:
                gold_ids = batch["word_labels"][row]
                gold = [labels[i] for i in gold_ids[gold_ids != IGNORE]]
            else:
                gold = [labels[i] for i in batch["labels"][row][first]]
            gold_all.append(gold)
            pred_all.append(pred + [None] * (len(gold) - len(pred)))
    return gold_all, pred_all


def token_metrics(outputs: list[dict], batches: list[dict], info: TaskInfo) -> dict[str, float]:
    from sklearn.metrics import f1_score

    labels = list(info.labels)
    gold, pred = word_tags(outputs, batches, labels)
    flat_gold = [g for s in gold for g in s]
    flat_pred = [p for s in pred for p in s]
    words = len(flat_gold)
    out = {
        "accuracy": sum(g == p for g, p in zip(flat_gold, flat_pred)) / words if words else 0.0,
        "macro_f1": float(f1_score(flat_gold, [p or "" for p in flat_pred], labels=sorted(set(flat_gold)),
                                   average="macro", zero_division=0)) if words else 0.0,
        "words": float(words),
        "truncated_words": float(sum(p is None for p in flat_pred)),
    }
    if is_iob(labels):
        out.update(entity_scores(gold, [[t or OUTSIDE for t in s] for s in pred]))
    else:  # plain tags: every word is one unit, micro precision = recall = F1 = accuracy
        out.update(precision=out["accuracy"], recall=out["accuracy"], f1=out["accuracy"])
    return out


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity precision / recall / F1 of tag sequences (seqeval, strict IOB2): the metric token_metrics reports."""
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    kw = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    g, p = [list(s) for s in gold], [list(s) for s in pred]
    return {"precision": float(precision_score(g, p, **kw)), "recall": float(recall_score(g, p, **kw)),
            "f1": float(f1_score(g, p, **kw))}


# --- sentence embeddings ----------------------------------------------------------------------------


def collate_pairs(examples: Sequence[dict], ctx: Collation) -> dict[str, torch.Tensor]:
    """Anchors then their positives, stacked into one (2B, T) batch (one forward pass for both)."""
    tok = ctx.tokenizer
    a = _encode(tok, [ex["text"] for ex in examples], ctx.max_length)
    b = _encode(tok, [ex["text_pair"] for ex in examples], ctx.max_length)
    batch = _pad(list(a) + list(b), ctx)
    if all(isinstance(ex.get("label"), (int, float)) for ex in examples):
        batch["scores"] = torch.tensor([float(ex["label"]) for ex in examples], dtype=torch.float32)
    return batch


def contrastive_loss(outputs: dict, batch: dict) -> torch.Tensor:
    emb = outputs["sentence_embedding"].float()
    anchors, positives = emb.chunk(2)
    scores = anchors @ positives.T * CONTRASTIVE_SCALE
    return F.cross_entropy(scores, torch.arange(len(anchors), device=scores.device))


def retrieval_metrics(outputs: list[dict], batches: list[dict], info: TaskInfo) -> dict[str, float]:
    halves = [np.split(o["sentence_embedding"].astype(np.float32), 2) for o in outputs]
    if not halves:
        return {"recall_at_1": 0.0, "recall_at_5": 0.0, "mrr": 0.0, "pairs": 0.0}
    anchors = np.concatenate([h[0] for h in halves])
    positives = np.concatenate([h[1] for h in halves])
    sims = anchors @ positives.T
    own = np.diag(sims)
    rank = (sims > own[:, None]).sum(1)  # 0 = its own pair scored highest
    out = {
        "recall_at_1": float((rank < 1).mean()),
        "recall_at_5": float((rank < 5).mean()),
        "mrr": float((1.0 / (rank + 1)).mean()),
        "pairs": float(len(own)),
    }
    if all("scores" in b for b in batches):
        from scipy.stats import spearmanr

        scores = np.concatenate([b["scores"] for b in batches])
        out["spearman"] = float(spearmanr(own, scores).statistic)
    return out
