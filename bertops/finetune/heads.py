"""The model a fine-tuning run starts from: a checkpoint's encoder plus the task's head, checked against the labels.

A checkpoint without the task's head (a base encoder such as all-MiniLM-L6-v2, or ``RUN_DIR/final``
of a pretraining run) gets a fresh head sized for the training labels. A checkpoint *with* a head
keeps it when it fits (same task, and it already answers every training label: its label order is
kept); a head that does not fit is a one-line error offering ``--new-head``, which replaces it.

Fine-tuned folders record their task in config.json (``finetuning_task``, HF's key) and the HF
class that loads them (``architectures``), beside ``id2label`` / ``label2id``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from bertops.artifacts import TRAINED_LENGTH_KEY
from bertops.errors import BertopsError
from bertops.tasks import Task

TASK_KEY = "finetuning_task"


def raw_config(model_dir: str | Path) -> dict:
    from bertops.checkpoint import check_checkpoint_dir

    path = check_checkpoint_dir(model_dir) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BertopsError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def trained_task(model_dir: str | Path) -> str | None:
    """The task a folder was fine-tuned for (config.json ``finetuning_task``), if it says."""
    value = raw_config(model_dir).get(TASK_KEY)
    return value if isinstance(value, str) and value else None


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    from bertops.checkpoint import _damaged_weights, _normalise_keys

    with _damaged_weights(model_dir):
        return _normalise_keys(load_file(str(model_dir / "model.safetensors"), device="cpu"))


def _short(names: Sequence[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def head_labels(model_dir: str | Path, task: Task, labels: Sequence[str], new_head: bool) -> tuple[list[str], bool]:
    """(label order to train with, whether the head starts fresh) — or a one-line error when it does not fit."""
    from bertops.checkpoint import read_config

    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    with_head = bool(task.head_keys) and all(k in _weights_keys(model_dir) for k in task.head_keys)
    if new_head or not with_head:
        return list(labels), bool(task.head_keys)
    trained = trained_task(model_dir)
    if trained and trained != task.name:
        raise BertopsError(
            f"checkpoint {model_dir} has a {trained} head, which does not fit {task.name}; "
            "pass --new-head to train a fresh head on its encoder"
        )
    if not task.needs_labels:
        return list(labels), False
    have = cfg.labels()
    missing = [name for name in labels if name not in have]
    if missing:
        raise BertopsError(
            f"checkpoint {model_dir} has a {task.name} head for {len(have)} labels ({_short(have)}) without "
            f"{missing[0]!r}, which the training data uses; pass --new-head to train a fresh head for its "
            f"{len(labels)} labels"
        )
    return have, False


def _weights_keys(model_dir: Path) -> set[str]:
    from safetensors import safe_open

    from bertops.checkpoint import _damaged_weights, _normalise_keys

    with _damaged_weights(model_dir), safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return set(_normalise_keys(dict.fromkeys(f.keys(), 0)))


def build_model(model_dir: str | Path, task: Task, labels: Sequence[str], fresh_head: bool, pooling: str = "auto"):
    """The task's model with the checkpoint's weights (fresh head where ``fresh_head``); (model, ModelConfig).

    ``pooling`` ("auto", "cls" or "mean"): what a fresh head of a pooling task reads; auto = the encoder's own.

    Call with the same seed on every rank: the fresh head's random init must agree.
    """
    from bertops.checkpoint import load_weights, read_config

    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    if task.needs_labels:
        cfg = dataclasses.replace(cfg, num_labels=len(labels), id2label=dict(enumerate(labels)))
    if fresh_head:  # recorded for every head, so a later head on this encoder pools the same way
        chosen = pooling if task.pools and pooling != "auto" else encoder_pooling(model_dir)
        cfg = dataclasses.replace(cfg, classifier_pooling=chosen)
    model = task.build_model(cfg)
    state = _weights(model_dir)
    if fresh_head:
        state = {k: v for k, v in state.items() if k.startswith("bert.")}
    load_weights(model, state, model_dir, lambda shape: f"the {task.name} model needs {shape}; "
                 "pass --new-head if it is the head, else the config and weights differ")
    return model, cfg


def check_pooling(model_dir: str | Path, task: Task, fresh_head: bool, pooling: str) -> None:
    """A one-line error for an unknown ``pooling``, or one that an existing head was not trained with."""
    from bertops.checkpoint import read_config
    from bertops.config import POOLINGS

    if pooling != "auto" and pooling not in POOLINGS:
        raise BertopsError(f"--pooling {pooling!r} is unknown; use auto, {' or '.join(POOLINGS)}")
    if pooling == "auto" or not task.pools or fresh_head:
        return
    have = read_config(model_dir).classifier_pooling
    if have != pooling:
        raise BertopsError(f"checkpoint {model_dir} has a {task.name} head that reads {have} pooling, not {pooling}; "
                           "pass --new-head to train a fresh head")


def encoder_pooling(model_dir: str | Path) -> str:
    """How a checkpoint's encoder pools a text into one vector: what a new sequence-classification head reads.

    "mean" for a sentence-transformers folder whose pooling (``1_Pooling/config.json``) averages the
    tokens, such as all-MiniLM-L6-v2: its [CLS] vector was never trained to stand for the text and
    its pooler is the untouched one of the model it was distilled from. Else the folder's
    ``classifier_pooling``, else "cls" (BERT's pooler, which pretraining trains on NSP).
    """
    from bertops.config import POOLINGS

    raw = raw_config(model_dir)
    if raw.get("classifier_pooling") in POOLINGS:
        return raw["classifier_pooling"]
    st = Path(model_dir) / "1_Pooling" / "config.json"
    try:
        modes = json.loads(st.read_text(encoding="utf-8")) if st.is_file() else {}
    except (OSError, json.JSONDecodeError):
        modes = {}
    return "mean" if modes.get("pooling_mode_mean_tokens") and not modes.get("pooling_mode_cls_token") else "cls"


def mark_finetuned(folder: str | Path, task: Task, max_length: int | None = None) -> None:
    """Record the task (and the HF class that loads the folder) in its config.json.

    ``max_length`` (tokens per text it was trained on) travels as ``bertops_max_length``, through the
    export's copy of config.json, so predict and Triton read texts the way training did by default
    (a classifier trained on 256 tokens and read at 512 answers differently).
    """
    path = Path(folder) / "config.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw[TASK_KEY] = task.name
    if max_length:
        raw[TRAINED_LENGTH_KEY] = int(max_length)
    if task.hf_architecture:  # transformers' classes pool [CLS]: a mean-pooled head names only the encoder
        mean = task.pools and raw.get("classifier_pooling") == "mean"
        raw["architectures"] = ["BertModel" if mean else task.hf_architecture]
    path.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
