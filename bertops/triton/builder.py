"""Build a Triton model repository for one export folder: one python model per task, or an ensemble.

``build_repository(export_dir, NAME, repo)`` writes, for one export folder (``bertops export onnx --out
DIR``), the model clients call, ``NAME`` (TEXT -> RESULT + the task's serve_outputs, e.g. EMBEDDING),
in one of two layouts (``pipeline``, ``serve.pipeline`` in the config)::

    single (default)                         ensemble
    repo/                                    repo/
      NAME/            python: tokenize,       NAME/              ensemble TEXT -> RESULT ...
        config.pbtxt   encode, post-process      config.pbtxt, 1/
        1/model.py, bertops_model.json,        NAME_tokenizer/    python TEXT -> input_ids, ..., TRUNCATED
          tokenizer files, labels.json,        NAME_encoder/      cpu/cuda: python + onnxruntime; gpu: onnxruntime backend
          model.onnx (cpu/cuda)                NAME_postprocess/  python: BLS to NAME_encoder per length
        warmup/TEXT                                               bucket, then the task's postprocess
      NAME_encoder/    gpu flavor only: Triton's onnxruntime backend (KIND_GPU), called over BLS

``single`` runs everything a request needs in one python-backend process (cpu / cuda flavor: onnxruntime
inside it, on its CPU / CUDA execution provider; gpu flavor: one BLS call per length group to
``NAME_encoder`` in Triton's onnxruntime backend, which NVIDIA's container has and the pip wheel has not) through
:meth:`bertops.infer.Predictor.answer`, the in-process code: one stub hop per request instead of the
ensemble's three plus its scheduler (docs/BENCHMARKS.md "Serving" measures both). ``ensemble`` keeps
tokenization, encoder and post-processing in separate models, which Triton can scale and time apart.
Rebuilding a name in one layout removes that name's models of the other.

Every python model folder also gets the export's ``task_plugin.py`` when its task is defined outside
bertops (``bertops.artifacts.load_task`` runs it in the backend process).

The python models import ``bertops`` (numpy, tokenizers, onnxruntime; no torch), so bertops must be
installed in the Python environment of Triton's python backend: ``bertops serve`` runs the server with
this interpreter first on ``PATH``; in NVIDIA's container, pip install bertops there (docs/deploy.md).

``RESULT`` is, for every row, the JSON of exactly the dict ``bertops.infer.Predictor.predict`` returns
for that text (``"truncated"`` included): both call the same tokenizer encode, the same length buckets
and the same ``Task.postprocess``, so served and in-process answers cannot drift. Every ``config.pbtxt``
is written with Triton's own ``ModelConfig`` protobuf and the result is checked by
:func:`bertops.triton.validate.validate_repository` before it is moved into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertops import __version__
from bertops.artifacts import LABELS_FILE, MODEL_FILE, PLUGIN_FILE, copy_support, read_export
from bertops.config import ServeConfig
from bertops.errors import BertopsError
from bertops.infer import DEFAULT_MAX_LENGTH, groups_by_length
from bertops.postprocess import TOP_K_OUTPUTS
from bertops.runtimes import OPENVINO, export_runtime
from bertops.tasks import Task, TaskInfo
from bertops.tokenizer import encode, load_tokenizer
from bertops.triton.graph_top_k import add_top_k
from bertops.triton.runtime import DEFAULT_MAX_REQUEST_BYTES, ENCODER_INPUTS, META_FILE, string_tensor_bytes
from bertops.triton.validate import _pb, _text_format, onnx_signature, validate_repository

FLAVORS = ("cpu", "cuda", "gpu")
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
"""onnxruntime providers of a python model that runs the graph itself, per flavor (gpu: Triton's backend runs it)."""
PIPELINES = ("single", "ensemble")
STEP_SUFFIXES = ("_tokenizer", "_encoder", "_postprocess")
TEMPLATES = Path(__file__).parent / "templates"
WARMUP_TEXT = "Triton warms this model up with a short sample sentence."
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
    copy_support(export_dir, version_dir, labels)
    _write_meta(version_dir, meta)


def _write_meta(version_dir: Path, meta: dict) -> None:
    (version_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _template(name: str, dest: Path) -> None:
    shutil.copyfile(TEMPLATES / f"{name}.py", dest / "model.py")


def _copy_onnx(export_dir: Path, version_dir: Path) -> None:
    shutil.copyfile(export_dir / MODEL_FILE, version_dir / MODEL_FILE)
    for extra in export_dir.glob(f"{MODEL_FILE}.data*"):  # external weights of >2 GB graphs
        shutil.copyfile(extra, version_dir / extra.name)


@dataclass
class _Build:
    """What every model of one build shares (the export, its graph, the settings, the staging folder)."""

    export_dir: Path
    staging: Path
    pb: object
    task: Task
    labels: list
    signature: dict
    flavor: str
    max_batch: int
    preferred: list
    delay_us: int
    instances: int
    meta: dict
    params: dict
    sample: object  # the tokenized warmup text

    @property
    def graph_top_k(self) -> bool:
        """gpu flavor: the encoder is another process, so a task with graph_top_k has it take top-k in its graph."""
        return self.flavor == "gpu" and bool(self.task.graph_top_k)

    @property
    def encoder_outputs(self) -> list:
        """What the python side asks the encoder for: the task's reads, or TOP_K_OUTPUTS."""
        return list(TOP_K_OUTPUTS) if self.graph_top_k else list(self.task.reads)

    def folder(self, name: str, warmup: bool = True) -> Path:
        folder = self.staging / name
        (folder / "1").mkdir(parents=True)
        if warmup:
            (folder / "warmup").mkdir()
        return folder

    def common(self, cfg, kind: str = "KIND_CPU", **params) -> None:
        _common(self.pb, cfg, self.max_batch, self.preferred, self.delay_us, self.instances, kind,
                {**self.params, **params})

    def text_warmup(self, cfg, folder: Path) -> None:
        _warmup(self.pb, cfg, {"TEXT": ("TYPE_STRING", [1])})
        (folder / "warmup" / "TEXT").write_bytes(string_tensor_bytes([WARMUP_TEXT]))

    def result_outputs(self) -> dict:
        return _result_outputs(self.task, self.labels, self.signature["outputs"])


def build_repository(
    export_dir: str | Path,
    name: str,
    repo: str | Path,
    flavor: str = ServeConfig.flavor,
    max_batch_size: int = ServeConfig.max_batch_size,
    instances: int = ServeConfig.instances,
    preferred_batch_sizes: Sequence[int] = ServeConfig.preferred_batch_sizes,
    max_queue_delay_us: int = ServeConfig.max_queue_delay_us,
    max_length: int | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    pipeline: str = ServeConfig.pipeline,
) -> Path:
    """Write the model ``name`` (and its helper models) for ``export_dir`` into ``repo``; return ``repo/name``.

    Existing models of the same names are replaced (other models in ``repo`` are left alone); the new
    ones are assembled in a hidden folder, validated, and only then moved into place.
    ``preferred_batch_sizes`` above ``max_batch_size`` are dropped. ``max_length`` (tokens, default
    the length the model was fine-tuned on, else ``min(512, max_position_embeddings)``) is where texts are truncated; a request whose TEXT holds
    more than ``max_request_bytes`` bytes is refused. ``pipeline``: ``single`` or ``ensemble`` (module doc).
    """
    export_dir, repo = Path(export_dir), Path(repo)
    if flavor not in FLAVORS:
        raise BertopsError(f"flavor {flavor!r} is unknown; use cpu or cuda (python + onnxruntime's CPU or CUDA "
                           f"provider) or gpu (Triton's onnxruntime backend)")
    if pipeline not in PIPELINES:
        raise BertopsError(f"pipeline {pipeline!r} is unknown; use single (one python model) or ensemble")
    if not _NAME.match(name):
        raise BertopsError(f"model name {name!r} is not usable by Triton; use letters, digits, '_', '-', '.'")
    if max_batch_size < 1 or instances < 1:
        raise BertopsError("max_batch_size and instances must be at least 1")
    if max_queue_delay_us < 0:
        raise BertopsError("max_queue_delay_us must not be negative")
    if max_request_bytes < 1:
        raise BertopsError("max_request_bytes must be at least 1")
    export = read_export(export_dir)
    task, labels, max_positions = export.task, list(export.labels), export.max_positions
    runtime = export_runtime(export.report)
    if flavor != "cpu" and runtime.name == OPENVINO:
        raise BertopsError(
            f"{export_dir} is a {runtime.precision} export, which runs on OpenVINO's CPU plugin; build it with "
            f"--flavor cpu, or export with --precision fp16 for the GPU"
        )
    limit = export.trained_length or min(DEFAULT_MAX_LENGTH, max_positions)
    max_length = limit if max_length is None else int(max_length)
    if not 2 <= max_length <= max_positions:
        raise BertopsError(f"max_length={max_length} is out of range for this model; use 2..{max_positions}")
    preferred = sorted({int(b) for b in preferred_batch_sizes if 0 < int(b) <= max_batch_size})

    signature = onnx_signature(export_dir / MODEL_FILE)
    missing = [n for n in ENCODER_INPUTS if n not in signature["inputs"]]
    if missing:
        raise BertopsError(
            f"{export_dir / MODEL_FILE} has no input {missing[0]!r}; re-export it with `bertops export onnx`"
        )
    graph_outputs = signature["outputs"]
    absent = [o for o in task.reads if o not in graph_outputs]
    if absent:
        raise BertopsError(
            f"{export_dir / MODEL_FILE} has no output {absent[0]!r}, which task {task.name} needs; "
            f"it was exported for another task (outputs: {', '.join(graph_outputs)})"
        )
    if task.needs_labels:
        classes = graph_outputs[task.outputs[0]][1][-1]
        if classes > 0 and classes != len(labels):
            raise BertopsError(
                f"{export_dir}: {LABELS_FILE} names {len(labels)} labels but the graph has {classes} classes; re-export it"
            )

    repo.mkdir(parents=True, exist_ok=True)
    staging = repo / f".{name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    meta = {"bertops_version": __version__, "name": name, "task": task.name, "flavor": flavor, "pipeline": pipeline,
            "max_length": max_length, "max_batch_size": max_batch_size, "pairs": task.pairs,
            "token_level": task.token_level, "max_request_bytes": int(max_request_bytes),
            "runtime": runtime.as_dict(),  # what runs model.onnx in a python model (bertops.infer.open_model)
            "providers": PROVIDERS.get(flavor),  # and on which onnxruntime providers
            "group_by_length": groups_by_length(PROVIDERS.get(flavor, ["CUDAExecutionProvider"]))}  # gpu: CUDA too
    params = {"bertops_task": task.name, "bertops_max_length": max_length}
    try:
        sample = encode(load_tokenizer(export_dir), [WARMUP_TEXT], max_length=max_length)
        b = _Build(export_dir, staging, _pb(), task, labels, signature, flavor, max_batch_size, preferred,
                   max_queue_delay_us, instances, meta, params, sample)
        if pipeline == "single":
            written = [_pipeline_model(b, name)]
            if flavor == "gpu":
                written.append(_encoder_model(b, f"{name}_encoder"))
        else:
            written = [_tokenizer_model(b, f"{name}_tokenizer", name), _encoder_model(b, f"{name}_encoder"),
                       _postprocess_model(b, f"{name}_postprocess", f"{name}_encoder"), _ensemble_model(b, name)]
        problems = validate_repository(staging)
        if problems:
            raise BertopsError(f"the generated repository is invalid (a bug in bertops): {problems[0]}")
        for folder in [name, *(name + s for s in STEP_SUFFIXES)]:  # the other layout's models go too
            target = repo / folder
            if target.exists():
                shutil.rmtree(target)
            if folder in written:
                os.replace(staging / folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    problems = [p for p in validate_repository(repo) if any(p.startswith(f"{n}:") for n in written)]
    if problems:
        raise BertopsError(f"{repo} is invalid after the build: {problems[0]}")
    return repo / name


def _pipeline_model(b: _Build, name: str) -> str:
    """``single``: one python model, TEXT -> RESULT (+ serve_outputs); the encoder in-process (cpu) or over BLS (gpu)."""
    encoder = f"{name}_encoder" if b.flavor == "gpu" else None
    # No warmup over BLS: models load in parallel, so the encoder may not be ready yet (it has its own).
    folder = b.folder(name, warmup=encoder is None)
    cfg = b.pb.ModelConfig(name=name, backend="python")
    _tensor(b.pb, cfg.input, "TEXT", "TYPE_STRING", [-1], ragged=True)
    for n, (dtype, dims) in b.result_outputs().items():
        _tensor(b.pb, cfg.output, n, dtype, dims)
    b.common(cfg, bertops_role="pipeline")
    if encoder is None:
        b.text_warmup(cfg, folder)
    _template("pipeline", folder / "1")
    _copy_support(b.export_dir, folder / "1", {**b.meta, "role": "pipeline", "encoder": encoder,
                                               "encoder_outputs": b.encoder_outputs, "labels": b.labels}, labels=True)
    if encoder is None:
        _copy_onnx(b.export_dir, folder / "1")
    where = f"onnxruntime in this process, {PROVIDERS[b.flavor][0]}" if encoder is None else f"{encoder} over BLS"
    _write_config(folder, cfg, f"{name}: {b.task.name} ({b.task.description}); TEXT [batch, 1 or 2] UTF-8 -> RESULT "
                               f"JSON per row; tokenize, encode ({where}) and post-process in one python model")
    return name


def _tokenizer_model(b: _Build, name: str, ensemble: str) -> str:
    folder = b.folder(name)
    cfg = b.pb.ModelConfig(name=name, backend="python")
    _tensor(b.pb, cfg.input, "TEXT", "TYPE_STRING", [-1], ragged=True)
    for n, (dtype, dims) in _tokenizer_outputs(b.task).items():
        _tensor(b.pb, cfg.output, n, dtype, dims)
    b.common(cfg)
    b.text_warmup(cfg, folder)
    _template("tokenizer", folder / "1")
    _copy_support(b.export_dir, folder / "1", {**b.meta, "role": "tokenizer"}, labels=False)
    _write_config(folder, cfg, f"{name}: UTF-8 text -> WordPiece ids ({b.task.name}); part of ensemble {ensemble}")
    return name


def _encoder_model(b: _Build, name: str) -> str:
    """The exported graph: Triton's onnxruntime backend (gpu flavor) or the python encoder template (cpu)."""
    folder = b.folder(name)
    if b.flavor == "gpu":
        cfg = b.pb.ModelConfig(name=name, backend="onnxruntime", default_model_filename="model.onnx")
        kind = "KIND_GPU"
    else:
        cfg = b.pb.ModelConfig(name=name, backend="python")
        kind = "KIND_CPU"
    for n in ENCODER_INPUTS:
        dtype, dims = b.signature["inputs"][n]
        _tensor(b.pb, cfg.input, n, dtype, dims[1:])
    for n, (dtype, dims) in b.signature["outputs"].items():
        _tensor(b.pb, cfg.output, n, dtype, dims[1:])
    if b.graph_top_k:
        scores, ids = TOP_K_OUTPUTS
        _tensor(b.pb, cfg.output, scores, "TYPE_FP32", [-1, TaskInfo.top_k])
        _tensor(b.pb, cfg.output, ids, "TYPE_INT64", [-1, TaskInfo.top_k])
    b.common(cfg, kind)
    width = int(b.sample.input_ids.shape[1])
    _warmup(b.pb, cfg, {n: (b.signature["inputs"][n][0], [width]) for n in ENCODER_INPUTS})
    for n, arr in b.sample.arrays().items():
        (folder / "warmup" / n).write_bytes(np.ascontiguousarray(arr[0], dtype="<i8").tobytes())
    _copy_onnx(b.export_dir, folder / "1")
    if b.graph_top_k:  # softmax + top-k in the graph: (B, T, K) cross the process boundary, not (B, T, vocab)
        add_top_k(b.export_dir / MODEL_FILE, folder / "1" / MODEL_FILE, b.task.graph_top_k, TaskInfo.top_k)
    if b.flavor != "gpu":
        _template("encoder", folder / "1")
        _write_meta(folder / "1", {**b.meta, "role": "encoder"})
        if (b.export_dir / PLUGIN_FILE).is_file():
            shutil.copyfile(b.export_dir / PLUGIN_FILE, folder / "1" / PLUGIN_FILE)
    backend = "Triton's onnxruntime backend (KIND_GPU)" if b.flavor == "gpu" else \
        f"onnxruntime in the python backend ({', '.join(PROVIDERS[b.flavor])})"
    _write_config(folder, cfg, f"{name}: the exported ONNX graph ({b.task.name}), run by {backend}")
    return name


def _postprocess_model(b: _Build, name: str, encoder: str) -> str:
    folder = b.folder(name, warmup=False)
    cfg = b.pb.ModelConfig(name=name, backend="python")
    _tensor(b.pb, cfg.input, "TEXT", "TYPE_STRING", [-1], ragged=True)
    for n, (dtype, dims) in _tokenizer_outputs(b.task).items():
        _tensor(b.pb, cfg.input, n, dtype, dims, ragged=True)
    for n, (dtype, dims) in b.result_outputs().items():
        _tensor(b.pb, cfg.output, n, dtype, dims)
    b.common(cfg, bertops_encoder=encoder)
    _template("postprocess", folder / "1")
    _copy_support(b.export_dir, folder / "1", {**b.meta, "role": "postprocess", "encoder": encoder,
                                               "encoder_outputs": b.encoder_outputs, "labels": b.labels}, labels=True)
    _write_config(folder, cfg, f"{name}: BLS to {encoder} per length bucket, then bertops.tasks {b.task.name} "
                               f"postprocess -> JSON")
    return name


def _ensemble_model(b: _Build, name: str) -> str:
    folder = b.folder(name, warmup=False)  # an ensemble still needs a version folder
    cfg = b.pb.ModelConfig(name=name, platform="ensemble", max_batch_size=b.max_batch)
    cfg.version_policy.latest.num_versions = 1
    _tensor(b.pb, cfg.input, "TEXT", "TYPE_STRING", [-1])
    result_outputs = b.result_outputs()
    for n, (dtype, dims) in result_outputs.items():
        _tensor(b.pb, cfg.output, n, dtype, dims)
    for key, value in b.params.items():
        cfg.parameters[key].string_value = str(value)
    tok_outputs = _tokenizer_outputs(b.task)
    step = cfg.ensemble_scheduling.step.add(model_name=f"{name}_tokenizer", model_version=-1)
    step.input_map["TEXT"] = "TEXT"
    for n in tok_outputs:
        step.output_map[n] = n
    step = cfg.ensemble_scheduling.step.add(model_name=f"{name}_postprocess", model_version=-1)
    step.input_map["TEXT"] = "TEXT"
    for n in tok_outputs:
        step.input_map[n] = n
    for n in result_outputs:
        step.output_map[n] = n
    _write_config(folder, cfg, f"{name}: {b.task.name} ({b.task.description}); TEXT [batch, 1 or 2] UTF-8 -> "
                               f"RESULT JSON per row")
    return name


def _tokenizer_outputs(task: Task) -> dict[str, tuple[str, list[int]]]:
    out = {n: ("TYPE_INT64", [-1]) for n in ENCODER_INPUTS}
    if task.token_level:
        out.update(OFFSETS=("TYPE_INT64", [-1, 2]), WORD_IDS=("TYPE_INT64", [-1]))
    out["TRUNCATED"] = ("TYPE_BOOL", [1])
    return out


def _result_outputs(task: Task, labels: Sequence[str], graph_outputs: dict) -> dict[str, tuple[str, list[int]]]:
    """The ensemble's outputs: RESULT (JSON per row) and the task's ``serve_outputs``."""
    out = {"RESULT": ("TYPE_STRING", [1])}
    for spec in task.serve_outputs:
        out[spec.name] = (spec.dtype, [spec.width(labels, graph_outputs)])
    return out
