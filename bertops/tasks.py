"""Tasks as small records of plain functions, looked up by name.

A task names its model head (``bertops.model.MODEL_CLASSES[name]``), the named outputs its
exported graph exposes, and how those outputs become answers (``postprocess``). Adding a task means calling :func:`register_task`
with a new :class:`Task` built from functions; nothing is subclassed.

This module stays free of torch so the Triton python backend can import it cheaply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bertops import postprocess as pp
from bertops.errors import BertopsError


@dataclass(frozen=True)
class TaskInfo:
    """What post-processing needs to know about a model beyond its outputs."""

    labels: tuple[str, ...] = ()  # class / tag names, index order
    vocab: tuple[str, ...] = ()  # id -> token, for fill-mask
    mask_token_id: int = -1  # id of [MASK], for fill-mask
    top_k: int = 5  # fill-mask candidates per [MASK]


# postprocess(outputs, input_ids, offsets, word_ids, texts, info) -> one JSON-able dict per row
Postprocess = Callable[[dict[str, np.ndarray], np.ndarray, Sequence, Sequence, Sequence[str], TaskInfo], list]


@dataclass(frozen=True)
class Task:
    name: str
    outputs: tuple[str, ...]  # ONNX / Triton output tensor names, in graph order
    postprocess: Postprocess
    reads: tuple[str, ...] = ("logits",)  # the outputs postprocess uses: the only ones inference fetches
    needs_labels: bool = False  # classification heads carry label names (labels.json)
    pairs: bool = False  # accepts a second text per example
    token_level: bool = False  # answers refer to tokens / character spans
    description: str = ""


LABELS_FILE = "labels.json"  # label names in index order, next to an export's model.onnx

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise BertopsError(f"unknown task {name!r}; use one of {', '.join(TASKS)}")
    return TASKS[name]


register_task(
    Task(
        name="embeddings",
        outputs=("last_hidden_state", "sentence_embedding"),
        postprocess=lambda out, ids, offs, wids, texts, info: pp.embeddings(out["sentence_embedding"]),
        reads=("sentence_embedding",),  # skip copying the (B, T, H) hidden states out of the graph
        pairs=False,
        description="mean-pooled, L2-normalised sentence vectors",
    )
)
register_task(
    Task(
        name="sequence-classification",
        outputs=("logits",),
        postprocess=lambda out, ids, offs, wids, texts, info: pp.classify(out["logits"], info.labels),
        needs_labels=True,
        pairs=True,
        description="one label per text or text pair",
    )
)
register_task(
    Task(
        name="token-classification",
        outputs=("logits",),
        postprocess=lambda out, ids, offs, wids, texts, info: [
            {"entities": spans} for spans in pp.entity_spans(out["logits"], offs, wids, texts, info.labels)
        ],
        needs_labels=True,
        token_level=True,
        description="entity spans (BIO/IOB2 merged) with character offsets",
    )
)
register_task(
    Task(
        name="fill-mask",
        outputs=("logits",),
        postprocess=lambda out, ids, offs, wids, texts, info: [
            {"masks": masks} for masks in pp.fill_mask(out["logits"], ids, info.mask_token_id, info.vocab, info.top_k)
        ],
        token_level=True,
        description="top-k tokens for every [MASK]",
    )
)
register_task(
    Task(
        name="pretraining",
        outputs=("logits", "nsp_logits"),
        postprocess=lambda out, ids, offs, wids, texts, info: pp.classify(out["nsp_logits"], ("is_next", "not_next")),
        reads=("nsp_logits",),
        pairs=True,
        description="masked-LM + next-sentence heads (NSP answer post-processed)",
    )
)
