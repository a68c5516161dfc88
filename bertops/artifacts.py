"""The export-folder format (what ``bertops export onnx --out DIR`` writes): writer and reader side by side.

An export folder holds::

    model.onnx            the graph: input_ids, attention_mask, token_type_ids -> Task.outputs
    config.json           the checkpoint's HF config (max_position_embeddings, labels, ...)
    tokenizer.json, vocab.txt, ...   the checkpoint's tokenizer files
    labels.json           label names in index order (tasks with needs_labels)
    task_plugin.py        the source file that registered the task (tasks defined outside bertops)
    export_report.json    task, parity figures, fused-node counts, latency, versions, file list

:func:`write_export` is called by ``bertops.export``; :func:`read_export` by ``bertops.infer`` and
the Triton builder. A folder is complete exactly when it has ``model.onnx``: the writer puts every
other file first and moves the graph in last.

``task_plugin.py`` is executed by :func:`load_task` when the export's task is not registered in the
running process (e.g. Triton's python backend) -- like ``trust_remote_code``: only load exports you trust.

Torch-free: the Triton python backend imports this module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertops.config import ModelConfig
from bertops.errors import BertopsError
from bertops.tasks import Task, TaskInfo, get_task, task_names
from bertops.tokenizer import TOKENIZER_FILES, load_tokenizer

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
LABELS_FILE = "labels.json"
REPORT_FILE = "export_report.json"
PLUGIN_FILE = "task_plugin.py"
DEFAULT_MAX_POSITIONS = ModelConfig.max_position_embeddings  # when config.json does not say
TRAINED_LENGTH_KEY = "bertops_max_length"  # config.json: tokens per text a fine-tuned model was trained on


def trained_length(folder: str | Path) -> int | None:
    """The tokens per text a folder's model was fine-tuned on (config.json), or None when it does not say.

    Predict and Triton read texts at this length by default, so a model answers as it was trained.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(TRAINED_LENGTH_KEY)
    except (json.JSONDecodeError, AttributeError):
        return None
    return int(value) if value else None


@dataclass(frozen=True)
class Export:
    """A checked export folder, as :func:`read_export` returns it."""

    folder: Path
    task: Task
    info: TaskInfo  # labels, vocab, [MASK] id for post-processing
    report: dict[str, Any]
    max_positions: int  # max_position_embeddings of the exported model
    trained_length: int | None = None  # tokens per text it was fine-tuned on (config.json), if recorded

    @property
    def labels(self) -> tuple[str, ...]:
        return self.info.labels


# --- writing --------------------------------------------------------------------------------------


def writable_out_dir(out_dir: str | Path) -> Path:
    """Refuse, before any work, an output folder that is a file or cannot be created or written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BertopsError(f"{out_dir} is a file, not a folder; pass a new or existing folder for the export")
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir():
        raise BertopsError(f"{existing} is a file, so {out_dir} cannot be created; pass a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BertopsError(f"cannot write to {existing} (read-only or no permission); pass a folder you can write to")
    return out_dir


def path_under(filename, folder: Path) -> bool:
    """Whether an OSError's ``filename`` lies inside ``folder``."""
    if not filename:
        return False
    try:
        return Path(os.fsdecode(filename)).resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError):
        return False


def check_exportable(task: Task) -> None:
    """A task defined outside bertops must come from a source file, so its exports can carry it."""
    if not task.builtin and not (task.source and Path(task.source).is_file()):
        raise BertopsError(
            f"task {task.name!r} was registered from {task.module or 'code'} without a source file; register it "
            f"from a .py module so the export can carry it as {PLUGIN_FILE}"
        )


def write_export(
    out_dir: str | Path,
    onnx_file: str | Path,
    *,
    task: Task,
    model_dir: str | Path,
    labels: Sequence[str],
    report: dict[str, Any],
) -> dict[str, Any]:
    """Fill ``out_dir`` from a checked graph ``onnx_file`` (moved in last) and the checkpoint ``model_dir``.

    Adds ``files`` (and ``task_plugin`` for tasks defined outside bertops) to ``report`` and returns it.
    """
    from bertops.checkpoint import copy_tokenizer_files  # torch; the writer runs only where torch is

    out, model_dir = Path(out_dir), Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_exportable(task)
    copy_tokenizer_files(model_dir, out)
    shutil.copyfile(model_dir / CONFIG_FILE, out / CONFIG_FILE)
    files = [MODEL_FILE, CONFIG_FILE, REPORT_FILE]
    for stale in (LABELS_FILE, PLUGIN_FILE):
        (out / stale).unlink(missing_ok=True)
    if task.needs_labels:
        (out / LABELS_FILE).write_text(json.dumps(list(labels), indent=2) + "\n", encoding="utf-8")
        files.append(LABELS_FILE)
    if not task.builtin:
        shutil.copyfile(task.source, out / PLUGIN_FILE)  # type: ignore[arg-type]
        files.append(PLUGIN_FILE)
        report["task_plugin"] = {"file": PLUGIN_FILE, "module": task.module}
    report["files"] = sorted(files + [n for n in TOKENIZER_FILES if (out / n).is_file()])
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(onnx_file, out / MODEL_FILE)  # last: model.onnx exists only once everything else does
    return report


def copy_support(export_dir: str | Path, dest: str | Path, labels: bool) -> None:
    """Copy what a served model folder needs from an export: tokenizer files, the task plugin and
    (``labels=True``) labels.json."""
    src, dst = Path(export_dir), Path(dest)
    names = list(TOKENIZER_FILES) + [PLUGIN_FILE] + ([LABELS_FILE] if labels else [])
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


# --- reading --------------------------------------------------------------------------------------


def load_task(name: str, folder: str | Path) -> Task:
    """The task ``name``: from the registry, or else by running ``folder/task_plugin.py`` which registers it."""
    try:
        return get_task(name)
    except BertopsError:
        pass
    plugin = Path(folder) / PLUGIN_FILE
    if not plugin.is_file():
        raise BertopsError(
            f"{folder} was made for task {name!r}, which is not registered here (known: {', '.join(task_names())}) "
            f"and the folder has no {PLUGIN_FILE}; import the module that registers it first"
        )
    module_name = "bertops_task_plugin_" + hashlib.sha1(str(plugin.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, plugin)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except BertopsError:
        raise
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise BertopsError(f"{plugin} failed to load ({type(exc).__name__}: {exc}); re-export the model") from None
    try:
        return get_task(name)
    except BertopsError:
        raise BertopsError(f"{plugin} does not register task {name!r}; re-export the model") from None


def task_info(folder: str | Path, labels: Sequence[str] = ()) -> TaskInfo:
    """Post-processing info from a folder's tokenizer files: id -> token table and the [MASK] id."""
    tok = load_tokenizer(folder)
    vocab = tok.get_vocab()
    id_to_token = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        id_to_token[i] = token
    mask_id = tok.token_to_id("[MASK]")
    return TaskInfo(labels=tuple(labels), vocab=tuple(id_to_token), mask_token_id=-1 if mask_id is None else mask_id)


def read_labels(folder: str | Path) -> tuple[str, ...]:
    """labels.json of a folder, or () when it has none."""
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return ()
    try:
        return tuple(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise BertopsError(f"{path} is not valid JSON ({exc.msg}); re-export the model") from None


def read_export(export_dir: str | Path) -> Export:
    """An export folder's task, post-processing info (labels, vocab), report and limits, checked."""
    folder = Path(export_dir)
    if not (folder / MODEL_FILE).is_file():
        raise BertopsError(f"{folder} has no {MODEL_FILE}; create it with `bertops export onnx --out {folder}`")
    report_file = folder / REPORT_FILE
    if not report_file.is_file():
        raise BertopsError(f"{folder} has no {REPORT_FILE}; re-run `bertops export onnx`")
    try:
        report = json.loads(report_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BertopsError(f"{report_file} is not valid JSON ({exc.msg}); re-run `bertops export onnx`") from None
    task = load_task(report.get("task", ""), folder)
    labels = read_labels(folder)
    if task.needs_labels and not labels:
        raise BertopsError(f"{folder} has no {LABELS_FILE}, which a {task.name} model needs; re-export it")
    max_positions = DEFAULT_MAX_POSITIONS
    if (folder / CONFIG_FILE).is_file():
        raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        max_positions = int(raw.get("max_position_embeddings", DEFAULT_MAX_POSITIONS))
    return Export(folder, task, task_info(folder, labels), report, max_positions, trained_length(folder))
