"""Triton model repositories for exported bertops models: build them, and check them before serving.

``build_repository(export_dir, NAME, repo)`` writes four models for one export folder
(``bertops export onnx --out DIR``)::

    repo/
      NAME/                 ensemble   TEXT -> RESULT (+ EMBEDDING | LABEL, PROBABILITIES)
        config.pbtxt, 1/
      NAME_tokenizer/       python     TEXT -> input_ids, attention_mask, token_type_ids,
        config.pbtxt                             TRUNCATED (+ OFFSETS, WORD_IDS for token-level tasks)
        1/model.py, bertops_model.json, tokenizer.json, vocab.txt, ...
        warmup/TEXT
      NAME_encoder/         cpu flavor: python running 1/model.onnx with onnxruntime (bertops.infer)
        config.pbtxt                     gpu flavor: Triton's onnxruntime backend, KIND_GPU
        1/model.onnx (+ model.py, bertops_model.json for the cpu flavor)
        warmup/input_ids, warmup/attention_mask, warmup/token_type_ids
      NAME_postprocess/     python     BLS calls to NAME_encoder, one per length bucket
        config.pbtxt                   (bertops.infer.length_buckets), then the task's postprocess
        1/model.py, bertops_model.json, labels.json, tokenizer files   (bertops.tasks) -> RESULT ...

The python models import ``bertops`` (numpy, tokenizers, onnxruntime; no torch), so bertops must be
installed in the Python environment of Triton's python backend: ``bertops serve`` runs the server with
this interpreter first on ``PATH``; in NVIDIA's container, pip install bertops there (docs/deploy.md).

``RESULT`` is, for every row, the JSON of exactly the dict ``bertops.infer.Predictor.predict`` returns
for that text (``"truncated"`` included): both call the same tokenizer encode, the same length buckets
and the same ``Task.postprocess``, so served and in-process answers cannot drift.

Text handling (documented behaviour, checked by tests/test_triton_e2e.py):

* ``TEXT`` is ``[batch, 1]`` (one text per row) or ``[batch, 2]`` (text pairs, sequence-classification);
* invalid UTF-8 fails *that request* with an INVALID_ARG error naming the row and byte offset; other
  requests of the same dynamic batch are answered normally (one response per request, always);
* an empty string is a valid text: it is encoded as ``[CLS] [SEP]`` and answered like any other
  (an embedding, a label, no entities, no masks) -- exactly what ``bertops.infer`` answers;
* text longer than ``max_length`` tokens is truncated and its RESULT carries ``"truncated": true``.

Every ``config.pbtxt`` is written from, and read back with, Triton's own ``ModelConfig`` protobuf;
:func:`validate_repository` checks the wiring of the whole repository (ensemble steps, tensor names,
dtypes, batch sizes, warmup files) and, through :func:`check_encoder_against_onnx`, the encoder's
tensors against the ONNX graph. The builder runs it after writing; ``bertops serve`` before starting.

This module is imported by the generated python models, so its top level needs numpy and bertops'
torch-free modules only; protobuf, tritonclient and onnx are imported where they are used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bertops import __version__
from bertops.errors import BertopsError
from bertops.infer import read_export, task_info
from bertops.tasks import LABELS_FILE, Task, TaskInfo, get_task
from bertops.tokenizer import TOKENIZER_FILES, Batch, encode, load_tokenizer

FLAVORS = ("cpu", "gpu")
META_FILE = "bertops_model.json"
TEMPLATES = Path(__file__).parent / "templates"
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TOKEN_LEVEL_INPUTS = ("OFFSETS", "WORD_IDS")
DEFAULT_MAX_LENGTH = 512  # bertops.infer.Predictor's default, so served answers match in-process ones
WARMUP_TEXT = "Triton warms this model up with a short sample sentence."
# Backends built into tritonserver itself (no backend directory needed).
BUILTIN_PLATFORMS = ("ensemble",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# ONNX TensorProto element types -> Triton data types (names of model_config.DataType).
ONNX_TO_TRITON = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
    13: "TYPE_UINT64", 16: "TYPE_BF16",
}


# ------------------------------------------------------------------------------------------------
# Runtime helpers shared by the generated python models (torch-free, Triton-free: unit-testable)
# ------------------------------------------------------------------------------------------------


def decode_text_rows(array: np.ndarray, allow_pairs: bool) -> tuple[list[str], list[str] | None]:
    """A ``TEXT`` request tensor ``[batch, 1 | 2]`` of UTF-8 bytes -> (texts, second texts or None).

    Raises :class:`BertopsError` naming the offending row for invalid UTF-8 or a bad shape.
    """
    if array.ndim != 2 or array.shape[1] not in (1, 2):
        raise BertopsError(
            f"TEXT has shape {list(array.shape)}; send [batch, 1] (one text per row)"
            + (" or [batch, 2] (text pairs)" if allow_pairs else "")
        )
    if array.shape[0] == 0:
        raise BertopsError("TEXT has no rows; send at least one text")
    if array.shape[1] == 2 and not allow_pairs:
        raise BertopsError("TEXT has 2 texts per row, but this model's task takes one text per row; send [batch, 1]")
    columns: list[list[str]] = [[], []]
    for row in range(array.shape[0]):
        for col in range(array.shape[1]):
            value = array[row, col]
            if isinstance(value, str):
                columns[col].append(value)
                continue
            try:
                columns[col].append(bytes(value).decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise BertopsError(
                    f"TEXT row {row}{'' if array.shape[1] == 1 else f' column {col}'} is not valid UTF-8 "
                    f"(byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); send UTF-8 encoded text"
                ) from None
    return columns[0], (columns[1] if array.shape[1] == 2 else None)


def tokenize_requests(
    tokenizer, requests: Sequence[tuple[list[str], list[str] | None]], max_length: int, token_level: bool
) -> list[dict[str, np.ndarray]]:
    """Tokenize the texts of many requests together (one fast-tokenizer call for single texts, one for
    pairs) and return, per request, its tensors padded only to that request's own longest row."""
    results: list[dict[str, np.ndarray] | None] = [None] * len(requests)
    for paired in (False, True):
        members = [i for i, (_, pairs) in enumerate(requests) if (pairs is not None) == paired]
        if not members:
            continue
        texts = [t for i in members for t in requests[i][0]]
        pairs = [t for i in members for t in requests[i][1]] if paired else None  # type: ignore[union-attr]
        batch = encode(tokenizer, texts, pairs, max_length=max_length)
        start = 0
        for i in members:
            n = len(requests[i][0])
            results[i] = batch_to_tensors(batch.select(range(start, start + n)), token_level) if n else {}
            start += n
    return results  # type: ignore[return-value]


def batch_to_tensors(batch: Batch, token_level: bool) -> dict[str, np.ndarray]:
    """A tokenized :class:`Batch` -> the tokenizer model's output tensors."""
    rows, width = batch.input_ids.shape
    out = {
        "input_ids": np.ascontiguousarray(batch.input_ids, dtype=np.int64),
        "attention_mask": np.ascontiguousarray(batch.attention_mask, dtype=np.int64),
        "token_type_ids": np.ascontiguousarray(batch.token_type_ids, dtype=np.int64),
        "TRUNCATED": np.asarray(batch.truncated, dtype=np.bool_).reshape(rows, 1),
    }
    if token_level:
        offsets = np.zeros((rows, width, 2), dtype=np.int64)
        word_ids = np.full((rows, width), -1, dtype=np.int64)
        for r in range(rows):
            n = min(len(batch.offsets[r]), width)
            if n:
                offsets[r, :n] = np.asarray(batch.offsets[r][:n], dtype=np.int64).reshape(n, 2)
                word_ids[r, :n] = [-1 if w is None else w for w in batch.word_ids[r][:n]]
        out["OFFSETS"], out["WORD_IDS"] = offsets, word_ids
    return out


def tensors_to_batch(parts: Sequence[dict[str, np.ndarray]]) -> Batch:
    """The tokenizer tensors of several requests -> one :class:`Batch` (rows in request order, padded
    to the widest). Offsets and word ids are cut back to each row's real tokens, as ``encode`` gives."""
    width = max([int(p["input_ids"].shape[1]) for p in parts] + [1])
    rows = sum(int(p["input_ids"].shape[0]) for p in parts)
    arrays = {name: np.zeros((rows, width), dtype=np.int64) for name in ENCODER_INPUTS}
    offsets: list[list[tuple[int, int]]] = []
    word_ids: list[list[int | None]] = []
    truncated: list[bool] = []
    r = 0
    for p in parts:
        n, w = p["input_ids"].shape
        for name in ENCODER_INPUTS:
            arrays[name][r : r + n, :w] = p[name]
        lengths = p["attention_mask"].sum(axis=1) if n else []
        for i in range(n):
            length = int(lengths[i])
            if "OFFSETS" in p:
                offsets.append([(int(a), int(b)) for a, b in p["OFFSETS"][i, :length]])
                word_ids.append([None if x < 0 else int(x) for x in p["WORD_IDS"][i, :length]])
            else:
                offsets.append([])
                word_ids.append([])
        truncated.extend(bool(x) for x in np.asarray(p["TRUNCATED"]).reshape(-1))
        r += n
    return Batch(
        input_ids=arrays["input_ids"],
        attention_mask=arrays["attention_mask"],
        token_type_ids=arrays["token_type_ids"],
        offsets=offsets,
        sequence_ids=[[None] * len(o) for o in offsets],
        word_ids=word_ids,
        truncated=truncated,
    )


def load_model_meta(folder: str | Path) -> dict[str, Any]:
    """A generated python model's ``bertops_model.json`` (task, limits, wiring)."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise BertopsError(f"{path} is missing; rebuild the repository with `bertops triton build`")
    return json.loads(path.read_text(encoding="utf-8"))


def load_postprocess(folder: str | Path) -> tuple[Task, TaskInfo, dict[str, Any]]:
    """Task, post-processing info and meta of a generated ``*_postprocess`` model folder."""
    meta = load_model_meta(folder)
    labels: tuple[str, ...] = ()
    if (Path(folder) / LABELS_FILE).is_file():
        labels = tuple(json.loads((Path(folder) / LABELS_FILE).read_text(encoding="utf-8")))
    return get_task(meta["task"]), task_info(folder, labels), meta


def result_tensors(task_name: str, answers: Sequence[dict], labels: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-row answers (``Predictor.predict`` dicts) -> the ensemble's output tensors."""
    rows = len(answers)
    out = {
        "RESULT": np.array(
            [[json.dumps(a, ensure_ascii=False, separators=(",", ":")).encode("utf-8")] for a in answers],
            dtype=np.object_,
        ).reshape(rows, 1)
    }
    if task_name == "embeddings":
        out["EMBEDDING"] = np.asarray([a["embedding"] for a in answers], dtype=np.float32)
    elif task_name == "sequence-classification":
        out["LABEL"] = np.array([[a["label"].encode("utf-8")] for a in answers], dtype=np.object_).reshape(rows, 1)
        out["PROBABILITIES"] = np.asarray(
            [[a["probabilities"][name] for name in labels] for a in answers], dtype=np.float32
        ).reshape(rows, len(labels))
    return out


def string_tensor_bytes(values: Iterable[str | bytes]) -> bytes:
    """Triton's serialized TYPE_STRING layout (4-byte little-endian length, then the bytes), as
    ``model_warmup`` input_data_file expects for string inputs."""
    chunks = []
    for v in values:
        b = v.encode("utf-8") if isinstance(v, str) else bytes(v)
        chunks.append(struct.pack("<I", len(b)) + b)
    return b"".join(chunks)


# ------------------------------------------------------------------------------------------------
# Building a repository
# ------------------------------------------------------------------------------------------------


def _pb():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise BertopsError("tritonclient is not installed; pip install 'tritonclient[all]'") from None
    return model_config_pb2


def _text_format():
    from google.protobuf import text_format

    return text_format


def onnx_signature(onnx_path: str | Path) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """``{"inputs": {name: (TYPE_*, dims)}, "outputs": {...}}`` of an ONNX graph; unknown dims are -1."""
    try:
        import onnx
    except ImportError:
        raise BertopsError("onnx is not installed; pip install onnx") from None
    path = Path(onnx_path)
    if not path.is_file():
        raise BertopsError(f"{path} does not exist; export the model first with `bertops export onnx`")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise BertopsError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); re-export it") from None
    graph = model.graph
    initializers = {i.name for i in graph.initializer}

    def describe(values) -> dict[str, tuple[str, list[int]]]:
        out = {}
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out[v.name] = (ONNX_TO_TRITON.get(t.elem_type, f"ONNX elem_type {t.elem_type}"), dims)
        return out

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def _tensor(pb, coll, name: str, dtype: str, dims: Sequence[int], ragged: bool = False):
    t = coll.add(name=name, data_type=pb.DataType.Value(dtype), dims=list(dims))
    if ragged:
        t.allow_ragged_batch = True
    return t


def _common(pb, cfg, max_batch: int, preferred: Sequence[int], delay_us: int, instances: int, kind: str, params: dict):
    cfg.max_batch_size = max_batch
    cfg.version_policy.latest.num_versions = 1
    cfg.dynamic_batching.preferred_batch_size.extend(preferred)
    cfg.dynamic_batching.max_queue_delay_microseconds = delay_us
    cfg.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value(kind), count=instances)
    for key, value in params.items():
        cfg.parameters[key].string_value = str(value)


def _warmup(pb, cfg, inputs: dict[str, tuple[str, list[int]]]) -> None:
    """One warmup request (batch 1) reading ``<model>/warmup/<input name>`` for every input."""
    w = cfg.model_warmup.add(name="sample_text", batch_size=1)
    for name, (dtype, dims) in inputs.items():
        spec = w.inputs[name]
        spec.data_type = pb.DataType.Value(dtype)
        spec.dims.extend(dims)
        spec.input_data_file = name


def _write_config(folder: Path, cfg, what: str) -> None:
    header = (
        f"# {what}\n# Generated by `bertops triton build` (bertops {__version__}); "
        f"check with `bertops triton validate`.\n"
    )
    (folder / "config.pbtxt").write_text(header + _text_format().MessageToString(cfg), encoding="utf-8")


def _copy_support(export_dir: Path, version_dir: Path, meta: dict, labels: bool) -> None:
    for name in TOKENIZER_FILES:
        if (export_dir / name).is_file():
            shutil.copyfile(export_dir / name, version_dir / name)
    if labels and (export_dir / LABELS_FILE).is_file():
        shutil.copyfile(export_dir / LABELS_FILE, version_dir / LABELS_FILE)
    (version_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _template(name: str, dest: Path) -> None:
    shutil.copyfile(TEMPLATES / f"{name}.py", dest / "model.py")


def _copy_onnx(export_dir: Path, version_dir: Path) -> None:
    shutil.copyfile(export_dir / "model.onnx", version_dir / "model.onnx")
    for extra in export_dir.glob("model.onnx.data*"):  # external weights of >2 GB graphs
        shutil.copyfile(extra, version_dir / extra.name)


def _read_export_meta(export_dir: Path) -> tuple[Task, dict, list[str], int]:
    task, info, report = read_export(export_dir)
    max_positions = DEFAULT_MAX_LENGTH
    if (export_dir / "config.json").is_file():
        raw = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))
        max_positions = int(raw.get("max_position_embeddings", DEFAULT_MAX_LENGTH))
    return task, report, list(info.labels), max_positions


def build_repository(
    export_dir: str | Path,
    name: str,
    repo: str | Path,
    flavor: str = "cpu",
    max_batch_size: int = 32,
    instances: int = 1,
    preferred_batch_sizes: Sequence[int] = (8, 16, 32),
    max_queue_delay_us: int = 200,
    max_length: int | None = None,
) -> Path:
    """Write the ensemble ``name`` and its three models for ``export_dir`` into ``repo``; return ``repo/name``.

    Existing models of the same names are replaced (other models in ``repo`` are left alone); the new
    ones are assembled in a hidden folder, validated, and only then moved into place.
    ``preferred_batch_sizes`` above ``max_batch_size`` are dropped. ``max_length`` (tokens, default
    ``min(512, max_position_embeddings)``) is where texts are truncated.
    """
    export_dir, repo = Path(export_dir), Path(repo)
    if flavor not in FLAVORS:
        raise BertopsError(f"flavor {flavor!r} is unknown; use cpu (python + onnxruntime) or gpu (onnxruntime backend)")
    if not _NAME.match(name):
        raise BertopsError(f"model name {name!r} is not usable by Triton; use letters, digits, '_', '-', '.'")
    if max_batch_size < 1 or instances < 1:
        raise BertopsError("max_batch_size and instances must be at least 1")
    if max_queue_delay_us < 0:
        raise BertopsError("max_queue_delay_us must not be negative")
    task, report, labels, max_positions = _read_export_meta(export_dir)
    limit = min(DEFAULT_MAX_LENGTH, max_positions)
    max_length = limit if max_length is None else int(max_length)
    if not 2 <= max_length <= max_positions:
        raise BertopsError(f"max_length={max_length} is out of range for this model; use 2..{max_positions}")
    preferred = sorted({int(b) for b in preferred_batch_sizes if 0 < int(b) <= max_batch_size})

    signature = onnx_signature(export_dir / "model.onnx")
    missing = [n for n in ENCODER_INPUTS if n not in signature["inputs"]]
    if missing:
        raise BertopsError(
            f"{export_dir / 'model.onnx'} has no input {missing[0]!r}; re-export it with `bertops export onnx`"
        )
    graph_outputs = signature["outputs"]
    bls_outputs = list(task.reads)  # what the postprocess step asks the encoder for over BLS
    absent = [o for o in bls_outputs if o not in graph_outputs]
    if absent:
        raise BertopsError(
            f"{export_dir / 'model.onnx'} has no output {absent[0]!r}, which task {task.name} needs; "
            f"it was exported for another task (outputs: {', '.join(graph_outputs)})"
        )
    if task.needs_labels:
        classes = graph_outputs[task.outputs[0]][1][-1]
        if classes > 0 and classes != len(labels):
            raise BertopsError(
                f"{export_dir}: {LABELS_FILE} names {len(labels)} labels but the graph has {classes} classes; re-export it"
            )

    names = {"ensemble": name, "tokenizer": f"{name}_tokenizer", "encoder": f"{name}_encoder",
             "postprocess": f"{name}_postprocess"}
    repo.mkdir(parents=True, exist_ok=True)
    staging = repo / f".{name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    pb = _pb()
    common_meta = {"bertops_version": __version__, "name": name, "task": task.name, "flavor": flavor,
                   "max_length": max_length, "max_batch_size": max_batch_size, "pairs": task.pairs,
                   "token_level": task.token_level}
    params = {"bertops_task": task.name, "bertops_max_length": max_length}
    try:
        tok = load_tokenizer(export_dir)
        sample = encode(tok, [WARMUP_TEXT], max_length=max_length)

        # -- tokenizer ---------------------------------------------------------------------------
        folder = staging / names["tokenizer"]
        (folder / "1").mkdir(parents=True)
        (folder / "warmup").mkdir()
        cfg = pb.ModelConfig(name=names["tokenizer"], backend="python")
        _tensor(pb, cfg.input, "TEXT", "TYPE_STRING", [-1], ragged=True)
        tok_outputs = {n: ("TYPE_INT64", [-1]) for n in ENCODER_INPUTS}
        if task.token_level:
            tok_outputs.update(OFFSETS=("TYPE_INT64", [-1, 2]), WORD_IDS=("TYPE_INT64", [-1]))
        tok_outputs["TRUNCATED"] = ("TYPE_BOOL", [1])
        for n, (dtype, dims) in tok_outputs.items():
            _tensor(pb, cfg.output, n, dtype, dims)
        _common(pb, cfg, max_batch_size, preferred, max_queue_delay_us, instances, "KIND_CPU", params)
        _warmup(pb, cfg, {"TEXT": ("TYPE_STRING", [1])})
        (folder / "warmup" / "TEXT").write_bytes(string_tensor_bytes([WARMUP_TEXT]))
        _template("tokenizer", folder / "1")
        _copy_support(export_dir, folder / "1", {**common_meta, "role": "tokenizer"}, labels=False)
        _write_config(
            folder, cfg, f"{names['tokenizer']}: UTF-8 text -> WordPiece ids ({task.name}); part of ensemble {name}"
        )

        # -- encoder -----------------------------------------------------------------------------
        folder = staging / names["encoder"]
        (folder / "1").mkdir(parents=True)
        (folder / "warmup").mkdir()
        if flavor == "gpu":
            cfg = pb.ModelConfig(name=names["encoder"], backend="onnxruntime", default_model_filename="model.onnx")
            kind = "KIND_GPU"
        else:
            cfg = pb.ModelConfig(name=names["encoder"], backend="python")
            kind = "KIND_CPU"
        for n in ENCODER_INPUTS:
            dtype, dims = signature["inputs"][n]
            _tensor(pb, cfg.input, n, dtype, dims[1:])
        for n, (dtype, dims) in graph_outputs.items():
            _tensor(pb, cfg.output, n, dtype, dims[1:])
        _common(pb, cfg, max_batch_size, preferred, max_queue_delay_us, instances, kind, params)
        width = int(sample.input_ids.shape[1])
        _warmup(pb, cfg, {n: (signature["inputs"][n][0], [width]) for n in ENCODER_INPUTS})
        for n, arr in sample.arrays().items():
            (folder / "warmup" / n).write_bytes(np.ascontiguousarray(arr[0], dtype="<i8").tobytes())
        _copy_onnx(export_dir, folder / "1")
        if flavor == "cpu":
            _template("encoder", folder / "1")
            (folder / "1" / META_FILE).write_text(
                json.dumps({**common_meta, "role": "encoder"}, indent=2) + "\n", encoding="utf-8"
            )
        backend = "Triton's onnxruntime backend (KIND_GPU)" if flavor == "gpu" else "onnxruntime in the python backend"
        _write_config(folder, cfg, f"{names['encoder']}: the exported ONNX graph ({task.name}), run by {backend}")

        # -- postprocess -------------------------------------------------------------------------
        folder = staging / names["postprocess"]
        (folder / "1").mkdir(parents=True)
        cfg = pb.ModelConfig(name=names["postprocess"], backend="python")
        _tensor(pb, cfg.input, "TEXT", "TYPE_STRING", [-1], ragged=True)
        for n, (dtype, dims) in tok_outputs.items():
            _tensor(pb, cfg.input, n, dtype, dims, ragged=True)
        result_outputs = _result_outputs(task, labels, graph_outputs)
        for n, (dtype, dims) in result_outputs.items():
            _tensor(pb, cfg.output, n, dtype, dims)
        _common(pb, cfg, max_batch_size, preferred, max_queue_delay_us, instances, "KIND_CPU",
                {**params, "bertops_encoder": names["encoder"]})
        _template("postprocess", folder / "1")
        _copy_support(export_dir, folder / "1",
                      {**common_meta, "role": "postprocess", "encoder": names["encoder"],
                       "encoder_outputs": bls_outputs, "labels": labels}, labels=True)
        _write_config(folder, cfg, f"{names['postprocess']}: BLS to {names['encoder']} per length bucket, then "
                                   f"bertops.tasks {task.name} postprocess -> JSON")

        # -- ensemble ----------------------------------------------------------------------------
        folder = staging / name
        (folder / "1").mkdir(parents=True)  # an ensemble still needs a version folder
        cfg = pb.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch_size)
        cfg.version_policy.latest.num_versions = 1
        _tensor(pb, cfg.input, "TEXT", "TYPE_STRING", [-1])
        for n, (dtype, dims) in result_outputs.items():
            _tensor(pb, cfg.output, n, dtype, dims)
        for key, value in params.items():
            cfg.parameters[key].string_value = str(value)
        step = cfg.ensemble_scheduling.step.add(model_name=names["tokenizer"], model_version=-1)
        step.input_map["TEXT"] = "TEXT"
        for n in tok_outputs:
            step.output_map[n] = n
        step = cfg.ensemble_scheduling.step.add(model_name=names["postprocess"], model_version=-1)
        step.input_map["TEXT"] = "TEXT"
        for n in tok_outputs:
            step.input_map[n] = n
        for n in result_outputs:
            step.output_map[n] = n
        _write_config(folder, cfg, f"{name}: {task.name} ({task.description}); TEXT [batch, 1 or 2] UTF-8 -> "
                                   f"RESULT JSON per row")

        problems = validate_repository(staging)
        if problems:
            raise BertopsError(f"the generated repository is invalid (a bug in bertops): {problems[0]}")
        for folder in names.values():
            target = repo / folder
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    problems = [p for p in validate_repository(repo) if any(p.startswith(f"{n}:") for n in names.values())]
    if problems:
        raise BertopsError(f"{repo} is invalid after the build: {problems[0]}")
    return repo / name


def _result_outputs(task: Task, labels: Sequence[str], graph_outputs: dict) -> dict[str, tuple[str, list[int]]]:
    out = {"RESULT": ("TYPE_STRING", [1])}
    if task.name == "embeddings":
        out["EMBEDDING"] = ("TYPE_FP32", [graph_outputs["sentence_embedding"][1][-1]])
    elif task.name == "sequence-classification":
        out["LABEL"] = ("TYPE_STRING", [1])
        out["PROBABILITIES"] = ("TYPE_FP32", [len(labels)])
    return out


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def parse_config(path: str | Path):
    """A ``config.pbtxt`` -> Triton's ``ModelConfig`` protobuf; :class:`BertopsError` if it does not parse."""
    pb, text_format = _pb(), _text_format()
    path = Path(path)
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), pb.ModelConfig())
    except text_format.ParseError as exc:
        raise BertopsError(f"{path.parent.name}: config.pbtxt does not parse as a Triton ModelConfig ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BertopsError(f"{path.parent.name}: cannot read config.pbtxt ({exc})") from None


def _dtype(pb, value: int) -> str:
    return pb.DataType.Name(value)


def _io(cfg) -> tuple[dict, dict]:
    pb = _pb()
    ins = {t.name: (_dtype(pb, t.data_type), list(t.dims)) for t in cfg.input}
    outs = {t.name: (_dtype(pb, t.data_type), list(t.dims)) for t in cfg.output}
    return ins, outs


def check_encoder_against_onnx(config, onnx_path: str | Path) -> list[str]:
    """Problems between a model config (``ModelConfig`` or config.pbtxt path) and its ONNX graph:
    every config tensor must exist in the graph with the same dtype, rank (plus the batch dimension when
    ``max_batch_size > 0``) and fixed sizes; every graph input must be fed by the config."""
    if isinstance(config, (str, Path)):
        config = parse_config(config)
    where = config.name or "encoder"
    try:
        sig = onnx_signature(onnx_path)
    except BertopsError as exc:
        return [f"{where}: {exc}"]
    batched = config.max_batch_size > 0
    problems = []
    cfg_in, cfg_out = _io(config)
    for kind, declared, graph in (("input", cfg_in, sig["inputs"]), ("output", cfg_out, sig["outputs"])):
        for name, (dtype, dims) in declared.items():
            if name not in graph:
                problems.append(
                    f"{where}: config {kind} {name!r} is not an ONNX graph {kind} (graph {kind}s: {', '.join(graph)})"
                )
                continue
            g_dtype, g_dims = graph[name]
            if dtype != g_dtype:
                problems.append(f"{where}: {kind} {name!r} is {dtype} in config.pbtxt but {g_dtype} in the ONNX graph")
            full = ([-1] if batched else []) + list(dims)
            if len(full) != len(g_dims):
                problems.append(
                    f"{where}: {kind} {name!r} has rank {len(full)} in config.pbtxt (dims {list(dims)}"
                    f"{' plus the batch dimension' if batched else ''}) but rank {len(g_dims)} in the ONNX graph"
                )
                continue
            if batched and g_dims and g_dims[0] not in (-1, 0) and config.max_batch_size > 1:
                problems.append(f"{where}: {kind} {name!r} has a fixed batch size {g_dims[0]} in the ONNX graph")
            for i, (c, g) in enumerate(zip(full, g_dims)):
                if i == 0 and batched:
                    continue
                if c != -1 and g > 0 and c != g:
                    problems.append(
                        f"{where}: {kind} {name!r} dimension {i} is {c} in config.pbtxt but {g} in the ONNX graph"
                    )
    for name in sig["inputs"]:
        if name not in cfg_in:
            problems.append(f"{where}: ONNX graph input {name!r} is not declared in config.pbtxt")
    return problems


def _versions(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _backend_of(cfg) -> str:
    if cfg.backend:
        return cfg.backend
    return {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt", "pytorch_libtorch": "pytorch",
            "tensorflow_savedmodel": "tensorflow", "tensorflow_graphdef": "tensorflow"}.get(cfg.platform, cfg.platform)


def _check_model(repo: Path, name: str, cfg, configs: dict, available_backends: Sequence[str] | None) -> list[str]:
    pb = _pb()
    folder = repo / name
    problems: list[str] = []
    p = problems.append
    if cfg.name and cfg.name != name:
        p(f"{name}: config.pbtxt names the model {cfg.name!r}, but its folder is {name!r}; they must match")
    versions = _versions(folder)
    if not versions:
        p(f"{name}: no version folder (e.g. {name}/1/)")
    backend = _backend_of(cfg)
    if not backend:
        p(f"{name}: config.pbtxt sets neither backend nor platform")
    if cfg.max_batch_size < 0:
        p(f"{name}: max_batch_size must not be negative")
    ins, outs = _io(cfg)
    for kind, tensors in (("input", cfg.input), ("output", cfg.output)):
        seen = set()
        for t in tensors:
            if t.name in seen:
                p(f"{name}: {kind} {t.name!r} is declared twice")
            seen.add(t.name)
            if t.data_type == pb.DataType.Value("TYPE_INVALID"):
                p(f"{name}: {kind} {t.name!r} has no data_type")
            if not t.dims and not t.reshape.shape:
                p(f"{name}: {kind} {t.name!r} has no dims")
            if any(d == 0 or d < -1 for d in t.dims):
                p(f"{name}: {kind} {t.name!r} has invalid dims {list(t.dims)}; use -1 (variable) or a positive size")
    if not ins:
        p(f"{name}: declares no inputs")
    if not outs:
        p(f"{name}: declares no outputs")

    if backend == "ensemble":
        problems += _check_ensemble(name, cfg, configs)
        return problems

    if available_backends is not None and backend and backend not in available_backends:
        p(
            f"{name}: needs Triton's {backend!r} backend, which this tritonserver does not have (it has "
            f"{', '.join(sorted(available_backends)) or 'none'}); serve it in NVIDIA's Triton container "
            f"(docs/deploy.md) or rebuild with `bertops triton build --flavor cpu`"
        )
    if cfg.HasField("dynamic_batching"):
        big = [b for b in cfg.dynamic_batching.preferred_batch_size if b > cfg.max_batch_size or b < 1]
        if big:
            p(f"{name}: preferred_batch_size {big[0]} is outside 1..max_batch_size ({cfg.max_batch_size})")
        if cfg.max_batch_size == 0:
            p(f"{name}: dynamic_batching needs max_batch_size > 0")
    for group in cfg.instance_group:
        if group.count < 0:
            p(f"{name}: instance_group count must not be negative")
    version = versions[-1] if versions else None
    if version is not None:
        if backend == "python" and not (version / (cfg.default_model_filename or "model.py")).is_file():
            p(f"{name}: python model without {version.relative_to(repo)}/model.py")
        onnx_name = (cfg.default_model_filename or "model.onnx") if backend == "onnxruntime" else "model.onnx"
        onnx_file = version / onnx_name
        if backend == "onnxruntime" and not onnx_file.is_file():
            p(f"{name}: no {onnx_file.relative_to(repo)} for the onnxruntime backend")
        elif onnx_file.is_file():
            problems += check_encoder_against_onnx(cfg, onnx_file)
        if (version / META_FILE).is_file():
            problems += _check_bertops_model(repo, name, cfg, version, configs)
    for w in cfg.model_warmup:
        if cfg.max_batch_size and w.batch_size > cfg.max_batch_size:
            p(f"{name}: warmup {w.name!r} batch_size {w.batch_size} exceeds max_batch_size {cfg.max_batch_size}")
        for key, spec in w.inputs.items():
            if key not in ins:
                p(f"{name}: warmup {w.name!r} feeds {key!r}, which is not an input")
                continue
            if _dtype(pb, spec.data_type) != ins[key][0]:
                p(f"{name}: warmup {w.name!r} input {key!r} is {_dtype(pb, spec.data_type)}, "
                  f"the input is {ins[key][0]}")
            if spec.WhichOneof("input_data_type") == "input_data_file":
                data = folder / "warmup" / spec.input_data_file
                if not data.is_file():
                    p(f"{name}: warmup data file {data.relative_to(repo)} is missing")
                elif ins[key][0] != "TYPE_STRING":
                    size = np.dtype(_np_dtype(ins[key][0])).itemsize * int(np.prod(spec.dims or [1]))
                    if data.stat().st_size != size:
                        p(f"{name}: warmup file {data.relative_to(repo)} has {data.stat().st_size} bytes, dims "
                          f"{list(spec.dims)} need {size}")
        missing = [k for k in ins if k not in w.inputs]
        if missing:
            p(f"{name}: warmup {w.name!r} does not feed input {missing[0]!r}")

    return problems


def _np_dtype(triton_dtype: str) -> str:
    return {"TYPE_BOOL": "bool", "TYPE_UINT8": "u1", "TYPE_UINT16": "<u2", "TYPE_UINT32": "<u4", "TYPE_UINT64": "<u8",
            "TYPE_INT8": "i1", "TYPE_INT16": "<i2", "TYPE_INT32": "<i4", "TYPE_INT64": "<i8", "TYPE_FP16": "<f2",
            "TYPE_FP32": "<f4", "TYPE_FP64": "<f8", "TYPE_BF16": "<u2"}.get(triton_dtype, "u1")


def _check_bertops_model(repo: Path, name: str, cfg, version: Path, configs: dict) -> list[str]:
    problems = []
    try:
        meta = load_model_meta(version)
        get_task(meta["task"])
    except (BertopsError, KeyError, json.JSONDecodeError) as exc:
        return [f"{name}: {META_FILE} is unreadable ({exc}); rebuild with `bertops triton build`"]
    has_tokenizer = any((version / n).is_file() for n in TOKENIZER_FILES[:2])
    if meta.get("role") in ("tokenizer", "postprocess") and not has_tokenizer:
        problems.append(f"{name}: no tokenizer.json or vocab.txt in {version.relative_to(repo)}")
    if meta.get("role") == "postprocess":
        encoder = meta.get("encoder", "")
        if encoder not in configs:
            problems.append(f"{name}: calls {encoder!r} over BLS, but the repository has no such model")
        else:
            enc_in, enc_out = _io(configs[encoder])
            for n in ENCODER_INPUTS:
                if n not in enc_in:
                    problems.append(f"{name}: BLS sends {n!r}, but {encoder} has no such input")
            for n in meta.get("encoder_outputs", []):
                if n not in enc_out:
                    problems.append(f"{name}: BLS asks {encoder} for output {n!r}, which it does not declare")
            if configs[encoder].max_batch_size < int(meta.get("max_batch_size", 1)):
                problems.append(f"{name}: its length buckets reach {meta['max_batch_size']} rows, above "
                                f"{encoder}'s max_batch_size {configs[encoder].max_batch_size}")
        if get_task(meta["task"]).needs_labels and not (version / LABELS_FILE).is_file():
            problems.append(f"{name}: no {LABELS_FILE} in {version.relative_to(repo)}")
    return problems


def _check_ensemble(name: str, cfg, configs: dict) -> list[str]:
    problems: list[str] = []
    p = problems.append
    steps = cfg.ensemble_scheduling.step
    if not steps:
        return [f"{name}: ensemble without ensemble_scheduling steps"]
    ens_in, ens_out = _io(cfg)
    available = dict(ens_in)  # tensor name -> (dtype, dims) known so far
    for i, step in enumerate(steps):
        target = configs.get(step.model_name)
        if target is None:
            p(f"{name}: step {i} runs {step.model_name!r}, which is not in the repository")
            continue
        t_in, t_out = _io(target)
        if target.max_batch_size < cfg.max_batch_size:
            p(f"{name}: step model {step.model_name} has max_batch_size {target.max_batch_size}, below the ensemble's "
              f"{cfg.max_batch_size}")
        for key, tensor in step.input_map.items():
            if key not in t_in:
                p(f"{name}: step {step.model_name} maps {key!r}, which is not an input of {step.model_name}")
            elif tensor not in available:
                p(f"{name}: step {step.model_name} reads {tensor!r} before any input or step produces it")
            elif available[tensor][0] != t_in[key][0]:
                p(f"{name}: step {step.model_name} input {key!r} is {t_in[key][0]}, "
                  f"but {tensor!r} is {available[tensor][0]}")
        optional = {t.name for t in target.input if t.optional}
        for key in t_in:
            if key not in step.input_map and key not in optional:
                p(f"{name}: step {step.model_name} input {key!r} is not mapped")
        for key, tensor in step.output_map.items():
            if key not in t_out:
                p(f"{name}: step {step.model_name} maps output {key!r}, which {step.model_name} does not declare")
            else:
                available[tensor] = t_out[key]
    for out, (dtype, dims) in ens_out.items():
        if out not in available:
            p(f"{name}: ensemble output {out!r} is produced by no step")
        elif available[out][0] != dtype:
            p(f"{name}: ensemble output {out!r} is {dtype}, but its step produces {available[out][0]}")
        elif list(available[out][1]) != list(dims):
            p(f"{name}: ensemble output {out!r} has dims {list(dims)}, but its step produces {list(available[out][1])}")
    if cfg.HasField("dynamic_batching") or len(cfg.instance_group):
        p(f"{name}: an ensemble takes no dynamic_batching or instance_group (its steps do)")
    return problems


def validate_repository(repo: str | Path, available_backends: Sequence[str] | None = None) -> list[str]:
    """Every problem in a Triton model repository, as one-line strings ``"MODEL: what is wrong; fix"``.

    Each ``config.pbtxt`` is parsed with Triton's ``ModelConfig``; ensembles are checked step by step
    (models exist, mapped names exist with matching dtypes, outputs produced); ONNX models against their
    graph (:func:`check_encoder_against_onnx`); bertops' python models against their BLS target.
    ``available_backends`` (e.g. ``("python",)``) also flags models needing a backend the server lacks.
    """
    repo = Path(repo)
    if not repo.is_dir():
        return [f"{repo} is not a directory; build one with `bertops triton build --repo {repo}`"]
    problems: list[str] = []
    configs: dict = {}
    for folder in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cfg_file = folder / "config.pbtxt"
        if not cfg_file.is_file():
            problems.append(f"{folder.name}: no config.pbtxt")
            continue
        try:
            configs[folder.name] = parse_config(cfg_file)
        except BertopsError as exc:
            problems.append(" ".join(str(exc).split()))
    if not configs and not problems:
        return [f"{repo} holds no models; build one with `bertops triton build --export DIR --name NAME --repo {repo}`"]
    for name, cfg in configs.items():
        problems += _check_model(repo, name, cfg, configs, available_backends)
    return [" ".join(p.split()) for p in problems]


def local_backends() -> list[str]:
    """Backends the local (pip) tritonserver can load: the private backend directory's entries."""
    from bertops.triton.server import prepare_backend_dir

    return sorted(p.name for p in prepare_backend_dir().iterdir() if p.is_dir())


def check_servable(repo: str | Path, available_backends: Sequence[str] | None = None) -> None:
    """Raise a one-line :class:`BertopsError` when ``repo`` should not be served (see :func:`validate_repository`)."""
    if available_backends is None:
        available_backends = local_backends()
    problems = validate_repository(repo, available_backends)
    if problems:
        more = ""
        if len(problems) > 1:
            more = f" (and {len(problems) - 1} more; list them with `bertops triton validate --repo {repo}`)"
        raise BertopsError(f"refusing to serve {repo}: {problems[0]}{more}")


def repository_models(repo: str | Path) -> dict[str, str]:
    """Ensembles in ``repo`` -> their task (from the bertops parameters), for listing endpoints."""
    out = {}
    for folder in sorted(Path(repo).iterdir()):
        cfg_file = folder / "config.pbtxt"
        if folder.is_dir() and cfg_file.is_file():
            try:
                cfg = parse_config(cfg_file)
            except BertopsError:
                continue
            if cfg.platform == "ensemble":
                task = cfg.parameters["bertops_task"].string_value if "bertops_task" in cfg.parameters else "?"
                out[folder.name] = task
    return out
