"""The task registry: one :class:`Task` record per task, the single source of truth for every task fact.

A task is a record of plain values and functions (TensorFlow Estimator's design: pass functions,
subclass nothing). It says which head goes on the encoder (``build_model``), the ONNX / Triton
output names of its graph (and which have one row per token), which of them post-processing reads,
how those become answers (``postprocess``), whether it takes text pairs and label names, which
checkpoint keys prove the head is present, the extra tensors its Triton ensemble returns, and the
training slots (``loss``, ``metrics``, ``collate``, ``main_metric``). Every other module asks the
registry; none spells a task name.

A user adds a task from their own code with one call (see ``examples/quality_score_task.py``)::

    register_task(Task(name="quality-score", build_model=..., outputs=("score",), postprocess=...))

The module that calls :func:`register_task` is recorded (``Task.source``). ``bertops.export`` copies
that file into the export folder, and Triton repositories carry it too, so processes that never
imported it (``bertops.infer``, Triton's python backend) can load the task again. Loading it runs
that file's code, like ``trust_remote_code`` in transformers: serve only exports you trust.

This module stays free of torch (``build_model`` functions import it when called), because the
Triton python backend imports it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bertops import postprocess as pp
from bertops.errors import BertopsError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from bertops.config import ModelConfig


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
class ServeOutput:
    """One extra tensor of a task's Triton ensemble (beside RESULT, the JSON answer of every row).

    ``value(answer, labels)`` -> the row's values (a list of ``size`` numbers or strings);
    ``size`` is an int or ``size(labels, graph_outputs)`` where graph_outputs maps an ONNX output
    name to ``(TYPE_*, dims)``.
    """

    name: str
    dtype: str  # "TYPE_FP32" or "TYPE_STRING"
    size: int | Callable[[Sequence[str], dict], int]
    value: Callable[[dict, Sequence[str]], Sequence]

    def width(self, labels: Sequence[str], graph_outputs: dict) -> int:
        return int(self.size(labels, graph_outputs) if callable(self.size) else self.size)


@dataclass(frozen=True)
class Task:
    """Everything bertops knows about one task. Build it with functions; register it with :func:`register_task`."""

    name: str
    build_model: Callable[[ModelConfig], nn.Module]  # ModelConfig -> torch module; forward(input_ids,
    #   attention_mask, token_type_ids) -> dict holding at least `outputs`. Import torch inside it.
    outputs: tuple[str, ...]  # ONNX / Triton output tensor names, in graph order
    postprocess: Postprocess
    reads: tuple[str, ...] = ()  # the outputs postprocess uses (the only ones inference fetches); () = all
    per_token: tuple[str, ...] = ()  # outputs shaped (B, T, ...): dynamic in `sequence`, compared on real tokens
    head_keys: tuple[str, ...] = ()  # state-dict keys a checkpoint must hold to have this head
    needs_labels: bool = False  # classification heads carry label names (labels.json)
    pairs: bool = False  # accepts a second text per example
    token_level: bool = False  # answers refer to tokens / character spans (needs offsets, word ids)
    description: str = ""
    serve_outputs: tuple[ServeOutput, ...] = ()  # Triton ensemble outputs beside RESULT
    hf_architecture: str = ""  # the transformers class that loads this head (config.json "architectures")
    # The head reads one vector per text, pooled as model.classifier_pooling says: a fresh head pools
    # the way its encoder was trained to (bertops.finetune.heads.encoder_pooling). transformers'
    # class (hf_architecture) pools [CLS] only, so a mean-pooled head does not name it.
    pools: bool = False
    # A per-token output whose softmax top-k an encoder in another process (Triton's gpu flavor) computes in
    # its graph, so (B, T, K) postprocess.TOP_K_OUTPUTS cross the process boundary instead of (B, T, vocab).
    # postprocess must then accept those in place of it.
    graph_top_k: str = ""
    # Training slots (filled by the training code): loss(model outputs, batch) -> scalar tensor,
    # metrics(...) -> {name: float}, collate(examples, ...) -> batch dict, main_metric: the metrics key
    # that picks the best checkpoint. Fine-tuned tasks use the signatures in bertops.finetune.objectives.
    loss: Callable[..., Any] | None = None
    metrics: Callable[..., dict] | None = None
    collate: Callable[..., dict] | None = None
    main_metric: str | None = None
    # Accuracy gate of reduced-precision exports (int8, bf16): gate(fp32 run, candidate run, limits) ->
    # bertops.accuracy.GateResult, comparing answers on real text. None: the task exports in fp32/fp16 only.
    gate: Callable[..., Any] | None = None
    # Where the task was defined (set by register_task): module name and its source file.
    module: str = ""
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for key in ("outputs", "reads", "per_token", "head_keys", "serve_outputs"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        if not self.reads:
            object.__setattr__(self, "reads", self.outputs)

    @property
    def builtin(self) -> bool:
        """Defined inside the bertops package (no plugin file needs to travel with its exports)."""
        return self.module == "bertops" or self.module.startswith("bertops.")


_REGISTRY: dict[str, Task] = {}


def _check(task: Task) -> None:
    if not isinstance(task, Task):
        raise BertopsError(f"register_task takes a bertops.tasks.Task, got {type(task).__name__}")
    if not task.name or task.name != task.name.strip() or "/" in task.name:
        raise BertopsError(f"task name {task.name!r} is not usable; use a non-empty name without '/' or spaces around")
    if not task.outputs:
        raise BertopsError(f"task {task.name}: outputs is empty; name the tensors build_model's forward returns")
    for key in ("reads", "per_token"):
        stray = [o for o in getattr(task, key) if o not in task.outputs]
        if stray:
            raise BertopsError(
                f"task {task.name}: {key} names {stray[0]!r}, which is not one of outputs {task.outputs}"
            )
    if task.graph_top_k and task.graph_top_k not in task.per_token:
        raise BertopsError(
            f"task {task.name}: graph_top_k names {task.graph_top_k!r}, which is not one of per_token {task.per_token}"
        )
    if not callable(task.build_model) or not callable(task.postprocess):
        raise BertopsError(f"task {task.name}: build_model and postprocess must be functions")
    names = [o.name for o in task.serve_outputs]
    if "RESULT" in names or len(set(names)) != len(names):
        raise BertopsError(f"task {task.name}: serve_outputs names must be unique and not RESULT, got {names}")


def _caller_module(depth: int) -> tuple[str, str | None]:
    """Name and source file of the module ``depth`` frames above the caller (1: whoever called register_task)."""
    g = sys._getframe(depth + 1).f_globals
    source = g.get("__file__")
    return g.get("__name__", ""), (str(Path(source).resolve()) if source else None)


def register_task(task: Task) -> Task:
    """Add ``task`` to the registry and return it (with ``module`` / ``source`` recorded).

    Registering a name again is allowed from the same source file (a module imported twice);
    taking another module's task name (a built-in's, say) is an error.
    """
    _check(task)
    if not task.module:
        module, source = _caller_module(1)
        task = replace(task, module=module, source=task.source or source)
    old = _REGISTRY.get(task.name)
    if old is not None and old.source != task.source:
        where = old.source or old.module
        raise BertopsError(f"task {task.name!r} is already registered (by {where}); pick another name")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called ``name``; a one-line error listing the known ones otherwise."""
    if name not in _REGISTRY:
        raise BertopsError(f"unknown task {name!r}; use one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def task_names() -> list[str]:
    """Every registered task, in registration order."""
    return list(_REGISTRY)


def lazy(target: str) -> Callable[..., Any]:
    """``"package.module:attribute"`` -> a function that imports it on first call and calls it.

    Keeps this module torch-free while its records name torch classes and training functions.
    """
    module, _, attr = target.partition(":")
    resolved: list[Callable] = []

    def call(*args, **kwargs):
        if not resolved:
            resolved.append(getattr(importlib.import_module(module), attr))
        return resolved[0](*args, **kwargs)

    call.__name__ = call.__qualname__ = attr
    call.__doc__ = f"{target}, imported on first call."
    return call


# --- built-in tasks -------------------------------------------------------------------------------

_MLM_HEAD = "cls.predictions.transform.dense.weight"


def _probabilities(answer: dict, labels: Sequence[str]) -> list[float]:
    return [answer["probabilities"][name] for name in labels]


EMBEDDINGS = register_task(
    Task(
        name="embeddings",
        gate=lazy("bertops.accuracy:embedding_gate"),
        hf_architecture="BertModel",
        build_model=lazy("bertops.model:BertForEmbeddings"),
        outputs=("last_hidden_state", "sentence_embedding"),
        postprocess=lambda out, ids, offs, wids, texts, info: pp.embeddings(out["sentence_embedding"]),
        reads=("sentence_embedding",),  # skip copying the (B, T, H) hidden states out of the graph
        per_token=("last_hidden_state",),
        description="mean-pooled, L2-normalised sentence vectors",
        loss=lazy("bertops.finetune.objectives:contrastive_loss"),
        metrics=lazy("bertops.finetune.objectives:retrieval_metrics"),
        collate=lazy("bertops.finetune.objectives:collate_pairs"),
        main_metric="recall_at_1",
        serve_outputs=(
            ServeOutput("EMBEDDING", "TYPE_FP32", lambda labels, graph: graph["sentence_embedding"][1][-1],
                        lambda answer, labels: answer["embedding"]),
        ),
    )
)
SEQUENCE_CLASSIFICATION = register_task(
    Task(
        name="sequence-classification",
        gate=lazy("bertops.accuracy:label_gate"),
        hf_architecture="BertForSequenceClassification",
        build_model=lazy("bertops.model:BertForSequenceClassification"),
        outputs=("logits",),
        postprocess=lambda out, ids, offs, wids, texts, info: pp.classify(out["logits"], info.labels),
        head_keys=("classifier.weight",),
        needs_labels=True,
        pairs=True,
        pools=True,
        description="one label per text or text pair",
        loss=lazy("bertops.finetune.objectives:classification_loss"),
        metrics=lazy("bertops.finetune.objectives:classification_metrics"),
        collate=lazy("bertops.finetune.objectives:collate_sequences"),
        main_metric="accuracy",
        serve_outputs=(
            ServeOutput("LABEL", "TYPE_STRING", 1, lambda answer, labels: [answer["label"]]),
            ServeOutput("PROBABILITIES", "TYPE_FP32", lambda labels, graph: len(labels), _probabilities),
        ),
    )
)
TOKEN_CLASSIFICATION = register_task(
    Task(
        name="token-classification",
        gate=lazy("bertops.accuracy:span_gate"),
        hf_architecture="BertForTokenClassification",
        build_model=lazy("bertops.model:BertForTokenClassification"),
        outputs=("logits",),
        postprocess=lambda out, ids, offs, wids, texts, info: [
            {"entities": spans} for spans in pp.entity_spans(out["logits"], offs, wids, texts, info.labels)
        ],
        per_token=("logits",),
        head_keys=("classifier.weight",),
        needs_labels=True,
        token_level=True,
        description="entity spans (BIO/IOB2 merged) with character offsets",
        loss=lazy("bertops.finetune.objectives:token_loss"),
        metrics=lazy("bertops.finetune.objectives:token_metrics"),
        collate=lazy("bertops.finetune.objectives:collate_tokens"),
        main_metric="f1",
    )
)
FILL_MASK = register_task(
    Task(
        name="fill-mask",
        gate=lazy("bertops.accuracy:token_gate"),
        hf_architecture="BertForMaskedLM",
        build_model=lazy("bertops.model:BertForMaskedLM"),
        outputs=("logits",),
        postprocess=lambda out, ids, offs, wids, texts, info: [
            {"masks": masks} for masks in (
                pp.fill_mask(out["logits"], ids, info.mask_token_id, info.vocab, info.top_k) if "logits" in out
                else pp.fill_mask_top_k(*(out[n] for n in pp.TOP_K_OUTPUTS), ids, info.mask_token_id, info.vocab,
                                        info.top_k))
        ],
        per_token=("logits",),
        graph_top_k="logits",
        head_keys=(_MLM_HEAD,),
        token_level=True,
        description="top-k tokens for every [MASK]",
    )
)
PRETRAINING = register_task(
    Task(
        name="pretraining",
        gate=lazy("bertops.accuracy:label_gate"),
        hf_architecture="BertForPreTraining",
        build_model=lazy("bertops.model:BertForPreTraining"),
        outputs=("logits", "nsp_logits"),
        postprocess=lambda out, ids, offs, wids, texts, info: pp.classify(out["nsp_logits"], ("is_next", "not_next")),
        reads=("nsp_logits",),
        per_token=("logits",),
        head_keys=(_MLM_HEAD, "cls.seq_relationship.weight"),
        pairs=True,
        description="masked-LM + next-sentence heads (NSP answer post-processed)",
        loss=lazy("bertops.train.objectives:pretraining_loss"),
        metrics=lazy("bertops.train.objectives:pretraining_metrics"),
        collate=lazy("bertops.data.pipeline:collate"),
        main_metric="eval_mlm_loss",
    )
)
