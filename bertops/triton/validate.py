"""Check a Triton model repository before serving: config.pbtxt parsing, model wiring, ONNX match.

:func:`validate_repository` checks the wiring of the whole repository (ensemble steps, tensor names,
dtypes, batch sizes, warmup files) and, through :func:`check_encoder_against_onnx`, the encoder's
tensors against the ONNX graph. The builder runs it after writing; ``bertops serve`` before starting.
Protobuf, tritonclient and onnx are imported where they are used.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bertops.artifacts import LABELS_FILE, load_task
from bertops.errors import BertopsError
from bertops.tokenizer import TOKENIZER_FILES
from bertops.triton.runtime import ENCODER_INPUTS, META_FILE, load_model_meta

# ONNX TensorProto element types -> Triton data types (names of model_config.DataType).
ONNX_TO_TRITON = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
    13: "TYPE_UINT64", 16: "TYPE_BF16",
}



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
        elif onnx_file.is_file() and ENCODER_INPUTS[0] in ins:  # a single-pipeline model takes TEXT instead
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
        task = load_task(meta["task"], version)
    except (BertopsError, KeyError, json.JSONDecodeError) as exc:
        return [f"{name}: {META_FILE} is unreadable ({exc}); rebuild with `bertops triton build`"]
    has_tokenizer = any((version / n).is_file() for n in TOKENIZER_FILES[:2])
    role = meta.get("role")
    if role in ("tokenizer", "postprocess", "pipeline") and not has_tokenizer:
        problems.append(f"{name}: no tokenizer.json or vocab.txt in {version.relative_to(repo)}")
    if role == "pipeline" and not meta.get("encoder"):  # onnxruntime in the model's own process
        onnx_file = version / "model.onnx"
        if not onnx_file.is_file():
            problems.append(f"{name}: no {onnx_file.relative_to(repo)} for its in-process encoder")
        else:
            try:
                outputs = onnx_signature(onnx_file)["outputs"]
            except BertopsError as exc:
                outputs = {}
                problems.append(f"{name}: {exc}")
            for n in meta.get("encoder_outputs", []):
                if outputs and n not in outputs:
                    problems.append(f"{name}: {onnx_file.relative_to(repo)} has no output {n!r}, which task "
                                    f"{task.name} reads; rebuild from the right export")
    if role == "postprocess" or (role == "pipeline" and meta.get("encoder")):
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
    if role in ("postprocess", "pipeline") and task.needs_labels and not (version / LABELS_FILE).is_file():
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
    from bertops.triton.wheel import prepare_backend_dir

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
    """The models clients call in ``repo`` (ensembles and ``single`` pipeline models) -> their task (from the bertops parameters), for listing endpoints."""
    out = {}
    for folder in sorted(Path(repo).iterdir()):
        cfg_file = folder / "config.pbtxt"
        if folder.is_dir() and cfg_file.is_file():
            try:
                cfg = parse_config(cfg_file)
            except BertopsError:
                continue
            entry = cfg.platform == "ensemble" or (
                "bertops_role" in cfg.parameters and cfg.parameters["bertops_role"].string_value == "pipeline")
            if entry:
                task = cfg.parameters["bertops_task"].string_value if "bertops_task" in cfg.parameters else "?"
                out[folder.name] = task
    return out
