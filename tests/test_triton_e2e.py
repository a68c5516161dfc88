"""Triton serving end to end: generated repositories, a real tritonserver, HTTP and gRPC clients.

One server for the module serves four models built by ``bertops.triton.builder`` (cpu flavor):
real all-MiniLM-L6-v2 embeddings, and tiny random sequence-classification, token-classification and
fill-mask heads exported with ``bertops.export``; NER in the ``ensemble`` layout (tokenizer ->
postprocess -> encoder), the others in the default ``single`` layout (one python model). Answers are
checked against in-process PyTorch and ``bertops.infer``; nothing is mocked except where a test says so
(the fake ``triton_python_backend_utils`` that runs the python-model templates in-process, and a spy
proving ``serve`` never starts).

Every test that uses the exports runs twice (module-scoped ``precision`` parameter, one server each):
on fp32 exports, and on int8 ones (``--precision int8``, the default accuracy gate). int8 answers are
checked "within the gate" against PyTorch (conftest's bounds: embedding cosines, labels and top-k up to
near ties) and against bertops.infer on the same int8 export with the int8 tolerance: the same runtime
runs both, but int8 activations are quantized with each run's range, so another batching moves numbers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    ATOL,
    INT8_FRAGMENT_COSINE,
    PRECISIONS,
    assert_embeddings_within_gate,
    assert_int8_export,
    near_top,
    row_cosines,
)

from bertops.config import ServeConfig
from bertops.errors import BertopsError

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
CLS_LABELS = ["negative", "neutral", "positive"]
HEADS = {
    "cls": ("sequence-classification", dict(num_labels=3, id2label=dict(enumerate(CLS_LABELS)))),
    "ner": ("token-classification", dict(num_labels=5, id2label=dict(enumerate(NER_LABELS)))),
    "mlm": ("fill-mask", {}),
}
MAX_BATCH = 8
TEXTS = [
    "John Smith lives in Paris and works for the United Nations.",
    "Café au lait à Montréal, s'il vous plaît — Zoë Ångström!",
    "東京タワーは東京にあります。北京 and 서울 too.",
    "   extra   spaces    between\twords   and a trailing one ",
    "Angela Merkel visited New York in 2019.",
    "ok",
]
PAIRS = ["A second sentence.", "Une autre phrase.", "另一句话。", "pair", "yes", "no"]
MASK_TEXTS = ["paris is the [MASK] of france.", "the [MASK] sat on the [MASK] all day.", "no mask in this one"]
MODELS = {"minilm": "embeddings", "cls": "sequence-classification", "ner": "token-classification", "mlm": "fill-mask"}
PIPELINES = {"minilm": "single", "cls": "single", "ner": "ensemble", "mlm": "single"}
STEPS = ("_tokenizer", "_encoder", "_postprocess")


# ------------------------------------------------------------------------------------------------
# Fixtures: exports, repository, server (all once per module)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint) -> dict[str, Path]:
    """name -> tiny random checkpoint of each head (conftest's tiny model)."""
    return {name: tiny_checkpoint(task, **extra) for name, (task, extra) in HEADS.items()}


@pytest.fixture(scope="module", params=PRECISIONS)
def precision(request) -> str:
    """The exports' precision: every test using them runs on fp32 and on int8 exports."""
    return request.param


@pytest.fixture(scope="module")
def exports(tmp_path_factory, minilm_dir, checkpoints, precision) -> dict[str, Path]:
    """name -> export folder: real MiniLM embeddings and three tiny random heads, in ``precision``
    (int8: through the default accuracy gate, no option relaxed)."""
    from bertops.export import export_onnx

    root = tmp_path_factory.mktemp(f"exports-{precision}")
    out = {"minilm": root / "minilm"}
    export_onnx(minilm_dir, "embeddings", out["minilm"], precision=precision, max_seq_len=16)
    for name, (task, _) in HEADS.items():
        out[name] = root / name
        export_onnx(checkpoints[name], task, out[name], precision=precision, max_seq_len=16)
    if precision == "int8":
        for folder in out.values():
            assert_int8_export(folder)
    return out


@pytest.fixture(scope="module")
def repo(exports, tmp_path_factory) -> Path:
    from bertops.triton.builder import build_repository

    repo = tmp_path_factory.mktemp("triton") / "models"
    for name, folder in exports.items():
        build_repository(folder, name, repo, max_batch_size=MAX_BATCH, preferred_batch_sizes=(4, 8, 16),
                         pipeline=PIPELINES[name])
    return repo


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    from bertops.triton.server import TritonServer

    srv = TritonServer(repo, log_file=tmp_path_factory.mktemp("log") / "server.log")
    srv.start(timeout=240)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def predictors(exports):
    """In-process bertops.infer predictors on the same exports (the served answers' oracle)."""
    from bertops.infer import load_predictor

    return {name: load_predictor(folder) for name, folder in exports.items()}


@pytest.fixture(scope="module")
def torch_models(checkpoints, minilm_dir):
    from bertops.checkpoint import load_model

    models = {"minilm": load_model(minilm_dir, "embeddings")[0]}
    for name, (task, _) in HEADS.items():
        models[name] = load_model(checkpoints[name], task)[0]
    return models


def _torch_outputs(model, folder: Path, text: str, pair: str | None = None) -> dict:
    import torch

    from bertops.tokenizer import encode, load_tokenizer

    batch = encode(load_tokenizer(folder), [text], None if pair is None else [pair])
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in batch.arrays().items()})
    return {k: v.numpy() for k, v in out.items()}, batch


def _url(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


# ------------------------------------------------------------------------------------------------
# Generated configs: Triton's ModelConfig, ONNX graph names and dtypes (cpu and gpu flavors)
# ------------------------------------------------------------------------------------------------

ONNX_TYPES = {1: "TYPE_FP32", 7: "TYPE_INT64", 10: "TYPE_FP16"}


def _parse(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _assert_matches_onnx(cfg, onnx_path: Path) -> None:
    import onnx
    from tritonclient.grpc import model_config_pb2 as pb

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    assert [t.name for t in cfg.input] == ["input_ids", "attention_mask", "token_type_ids"] == list(inputs)
    assert {t.name for t in cfg.output} == set(outputs)
    for tensors, graph_tensors in ((cfg.input, inputs), (cfg.output, outputs)):
        for t in tensors:
            g = graph_tensors[t.name].type.tensor_type
            assert pb.DataType.Name(t.data_type) == ONNX_TYPES[g.elem_type], t.name
            graph_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in g.shape.dim]
            assert [-1, *t.dims] == graph_dims, (t.name, list(t.dims), graph_dims)


def test_generated_configs_parse_and_match_onnx(repo, exports, tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb

    from bertops.triton.builder import build_repository
    from bertops.triton.validate import repository_models, validate_repository

    assert validate_repository(repo) == []
    assert repository_models(repo) == MODELS
    names = sorted(p.name for p in repo.iterdir() if p.is_dir())
    assert names == sorted([*MODELS, *(f"ner{s}" for s in STEPS)])
    for folder in (repo / n for n in names):
        cfg = _parse(folder / "config.pbtxt")
        assert cfg.name == folder.name
        assert cfg.max_batch_size == MAX_BATCH
        assert cfg.version_policy.latest.num_versions == 1
        if cfg.platform == "ensemble":
            assert [s.model_name for s in cfg.ensemble_scheduling.step] == [f"{cfg.name}_tokenizer", f"{cfg.name}_postprocess"]
            assert [t.name for t in cfg.input] == ["TEXT"] and cfg.input[0].data_type == pb.TYPE_STRING
            assert "RESULT" in {t.name for t in cfg.output}
            continue
        assert cfg.backend == "python"
        assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
        assert cfg.dynamic_batching.max_queue_delay_microseconds == ServeConfig.max_queue_delay_us
        assert cfg.instance_group[0].count == ServeConfig.instances
        assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
        assert (folder / "1" / "model.py").is_file() and (folder / "1" / "bertops_model.json").is_file()
        if folder.name.endswith("_encoder"):
            _assert_matches_onnx(cfg, folder / "1" / "model.onnx")
            assert cfg.model_warmup[0].batch_size == 1
        if folder.name.endswith("_tokenizer") or folder.name in MODELS:  # TEXT in: warmed up with a sentence
            assert cfg.model_warmup[0].inputs["TEXT"].data_type == pb.TYPE_STRING
            assert (folder / "1" / "tokenizer.json").is_file()
        if folder.name in MODELS:  # single pipeline: the export's graph runs inside this model
            assert cfg.parameters["bertops_role"].string_value == "pipeline"
            assert (folder / "1" / "model.onnx").read_bytes() == (exports[folder.name] / "model.onnx").read_bytes()
    typed = {t.name: pb.DataType.Name(t.data_type) for t in _parse(repo / "minilm" / "config.pbtxt").output}
    assert typed == {"RESULT": "TYPE_STRING", "EMBEDDING": "TYPE_FP32"}
    typed = {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in _parse(repo / "cls" / "config.pbtxt").output}
    assert typed == {"RESULT": ("TYPE_STRING", [1]), "LABEL": ("TYPE_STRING", [1]), "PROBABILITIES": ("TYPE_FP32", [3])}
    assert json.loads((repo / "ner_postprocess" / "1" / "labels.json").read_text()) == NER_LABELS
    assert json.loads((repo / "cls" / "1" / "labels.json").read_text()) == CLS_LABELS

    # gpu flavor: Triton's onnxruntime backend on KIND_GPU, validated but not served here; the single
    # pipeline model calls it over BLS, the ensemble's postprocess step too.
    gpu_repo = tmp_path / "gpu"
    for name, pipeline in (("minilm", "single"), ("ner", "ensemble")):
        build_repository(exports[name], name, gpu_repo, flavor="gpu", max_batch_size=16, instances=2, pipeline=pipeline)
        cfg = _parse(gpu_repo / f"{name}_encoder" / "config.pbtxt")
        assert cfg.backend == "onnxruntime" and cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
        assert cfg.instance_group[0].count == 2 and list(cfg.dynamic_batching.preferred_batch_size) == [8, 16]
        assert not (gpu_repo / f"{name}_encoder" / "1" / "model.py").exists()
        _assert_matches_onnx(cfg, gpu_repo / f"{name}_encoder" / "1" / "model.onnx")
        assert (gpu_repo / f"{name}_encoder" / "1" / "model.onnx").read_bytes() == (exports[name] / "model.onnx").read_bytes()
        for warm in cfg.model_warmup[0].inputs.values():
            assert (gpu_repo / f"{name}_encoder" / "warmup" / warm.input_data_file).is_file()
    assert sorted(p.name for p in gpu_repo.iterdir()) == sorted(["minilm", "minilm_encoder", "ner", *(f"ner{s}" for s in STEPS)])
    assert json.loads((gpu_repo / "minilm" / "1" / "bertops_model.json").read_text())["encoder"] == "minilm_encoder"
    assert not (gpu_repo / "minilm" / "1" / "model.onnx").exists()
    assert not _parse(gpu_repo / "minilm" / "config.pbtxt").model_warmup  # the encoder may load after it
    assert validate_repository(gpu_repo) == []
    missing_backend = validate_repository(gpu_repo, available_backends=["python"])
    assert len(missing_backend) == 2 and all("'onnxruntime' backend" in p for p in missing_backend)

    # rebuilding a name in the other layout replaces its models: no stale steps or encoder left behind
    build_repository(exports["ner"], "ner", gpu_repo, pipeline="single")
    build_repository(exports["minilm"], "minilm", gpu_repo, pipeline="single")
    assert sorted(p.name for p in gpu_repo.iterdir()) == ["minilm", "ner"]
    assert validate_repository(gpu_repo, available_backends=["python"]) == []


def test_validator_catches_broken_repositories(repo, tmp_path):
    from bertops.triton.validate import check_encoder_against_onnx, validate_repository

    def copy_of(*models) -> Path:
        dst = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        for m in models:
            shutil.copytree(repo / m, dst / m)
        return dst

    ner = ("ner", "ner_tokenizer", "ner_encoder", "ner_postprocess")
    bad = copy_of(*ner)
    cfg = bad / "ner_encoder" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "token_type_ids"\n  data_type: TYPE_INT64', 'name: "token_type_ids"\n  data_type: TYPE_INT32'))
    problems = validate_repository(bad)
    assert any("'token_type_ids' is TYPE_INT32 in config.pbtxt but TYPE_INT64 in the ONNX graph" in p for p in problems), problems

    bad = copy_of(*ner)
    cfg = bad / "ner_encoder" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "logits"', 'name: "scores"'))
    problems = check_encoder_against_onnx(cfg, bad / "ner_encoder" / "1" / "model.onnx")
    assert any("'scores' is not an ONNX graph output" in p for p in problems), problems
    assert any("asks ner_encoder for output 'logits'" in p for p in validate_repository(bad))

    bad = copy_of(*ner)
    (bad / "ner" / "config.pbtxt").write_text((bad / "ner" / "config.pbtxt").read_text().replace("ensemble_scheduling {", "ensemble_scheduling {{"))
    assert any("does not parse as a Triton ModelConfig" in p for p in validate_repository(bad))

    bad = copy_of("ner", "ner_tokenizer", "ner_encoder")  # postprocess step missing
    assert any("runs 'ner_postprocess', which is not in the repository" in p for p in validate_repository(bad))

    bad = copy_of("cls")  # single pipeline without its graph, or with a graph lacking what the task reads
    (bad / "cls" / "1" / "model.onnx").unlink()
    assert any("no cls/1/model.onnx for its in-process encoder" in p for p in validate_repository(bad))
    bad = copy_of("cls")
    meta_file = bad / "cls" / "1" / "bertops_model.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "encoder_outputs": ["pooled"]}))
    assert any("has no output 'pooled'" in p for p in validate_repository(bad))


# ------------------------------------------------------------------------------------------------
# The python-model templates, run in-process with a stand-in triton_python_backend_utils
# ------------------------------------------------------------------------------------------------


def _fake_pb_utils(bls_handler):
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError:
        INVALID_ARG = 3

        def __init__(self, message, code=None):
            self._message, self.code = message, code

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.output_tensors, self._error = list(output_tensors), error

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    class Request:  # a request as execute() receives it
        def __init__(self, tensors, requested=()):
            self.tensors, self.requested = tensors, list(requested)

        def requested_output_names(self):
            return self.requested

    class InferenceRequest(Request):  # a BLS request
        def __init__(self, model_name, requested_output_names, inputs, preferred_memory=None):
            super().__init__(inputs, requested_output_names)
            self.model_name = model_name

        def exec(self):
            return bls_handler(self)

    pb.Tensor, pb.TritonError, pb.InferenceResponse, pb.InferenceRequest, pb.Request = (
        Tensor, TritonError, InferenceResponse, InferenceRequest, Request)
    pb.get_input_tensor_by_name = lambda r, n: next((t for t in r.tensors if t.name() == n), None)
    pb.get_output_tensor_by_name = lambda r, n: next((t for t in r.output_tensors if t.name() == n), None)
    pb.PreferredMemory = lambda kind, device: (kind, device)
    pb.TRITONSERVER_MEMORY_CPU = 0
    return pb


def _load_template(folder: Path, monkeypatch, pb) -> object:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location(f"bertops_template_{folder.parent.name}", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = json.dumps({"instance_group": [{"count": 1}]})
    model.initialize({"model_repository": str(folder.parent), "model_version": folder.name, "model_config": config})
    return model


@pytest.mark.parametrize("name", ["ner"])
def test_templates_in_process_one_response_per_request(name, repo, predictors, monkeypatch, precision):
    """tokenizer -> postprocess -(BLS)-> encoder with a stand-in pb_utils: a bad request in a dynamic
    batch gets its own error; the others get exactly Predictor.predict's answers."""
    holder = {}
    pb = _fake_pb_utils(lambda req: holder["encoder"].execute([req])[0])
    tokenizer = _load_template(repo / f"{name}_tokenizer" / "1", monkeypatch, pb)
    holder["encoder"] = _load_template(repo / f"{name}_encoder" / "1", monkeypatch, pb)
    post = _load_template(repo / f"{name}_postprocess" / "1", monkeypatch, pb)

    def text_request(rows):
        return pb.Request([pb.Tensor("TEXT", np.array(rows, dtype=np.object_))])

    batches = [[[t.encode()] for t in TEXTS[:3]], [[b"caf\xc3 broken \xff"]], [[TEXTS[3].encode()], [b""]],
               [[b"one", b"two"]]]
    tok_responses = tokenizer.execute([text_request(rows) for rows in batches])
    assert len(tok_responses) == len(batches)
    assert tok_responses[1].has_error() and "TEXT row 0 is not valid UTF-8 (byte 0xc3 at offset 3)" in tok_responses[1].error().message()
    assert tok_responses[1].error().code == pb.TritonError.INVALID_ARG
    if name == "ner":  # pairs are refused by single-text tasks, per request
        assert tok_responses[3].has_error() and "one text per row" in tok_responses[3].error().message()
    else:
        assert not tok_responses[3].has_error()
    good = [i for i, r in enumerate(tok_responses) if not r.has_error()]
    post_requests = [pb.Request(tok_responses[i].output_tensors + [text_request(batches[i]).tensors[0]]) for i in good]
    post_responses = post.execute(post_requests)
    assert len(post_responses) == len(good) and not any(r.has_error() for r in post_responses)
    for i, response in zip(good, post_responses):
        rows = batches[i]
        result = [json.loads(x[0]) for x in pb.get_output_tensor_by_name(response, "RESULT").as_numpy()]
        texts = [r[0].decode() for r in rows]
        pairs = [r[1].decode() for r in rows] if len(rows[0]) == 2 else None
        expected = predictors[name].predict(texts, pairs)
        assert _same(name, result, expected, precision), (result, expected)


def _onnx_bls(pb, session, req, calls: list | None = None, requested: set | None = None):
    """A BLS request to the encoder, answered by onnxruntime ``session`` on the encoder's graph (what
    Triton's onnxruntime backend would run); notes the model called and the outputs asked for."""
    if calls is not None:
        calls.append(req.model_name)
    if requested is not None:
        requested.update(req.requested)
    values = session.run(req.requested, {t.name(): t.as_numpy() for t in req.tensors})
    return pb.InferenceResponse([pb.Tensor(n, v) for n, v in zip(req.requested, values)])


def test_gpu_ensemble_fill_mask_takes_top_k_in_the_encoder(exports, predictors, monkeypatch, tmp_path, precision):
    """gpu flavor, ensemble layout: tokenizer -> postprocess -(BLS)-> NAME_encoder, whose graph (run here by
    onnxruntime, as Triton's onnxruntime backend would) takes softmax + top-k; only those cross, and the
    answers are Predictor.predict's."""
    from bertops.infer import ort_session
    from bertops.postprocess import TOP_K_OUTPUTS
    from bertops.triton.builder import build_repository

    build_repository(exports["mlm"], "mlm", tmp_path, flavor="gpu", pipeline="ensemble")
    session = ort_session(tmp_path / "mlm_encoder" / "1" / "model.onnx", threads=1)
    requested = set()

    pb = _fake_pb_utils(lambda req: _onnx_bls(pb, session, req, requested=requested))
    tokenizer = _load_template(tmp_path / "mlm_tokenizer" / "1", monkeypatch, pb)
    post = _load_template(tmp_path / "mlm_postprocess" / "1", monkeypatch, pb)
    text = pb.Tensor("TEXT", np.array([[t.encode()] for t in MASK_TEXTS], dtype=np.object_))
    tokens = tokenizer.execute([pb.Request([text])])[0]
    assert not tokens.has_error()
    response = post.execute([pb.Request(tokens.output_tensors + [text])])[0]
    assert not response.has_error(), response.error().message()
    result = [json.loads(x[0]) for x in pb.get_output_tensor_by_name(response, "RESULT").as_numpy()]
    assert requested == set(TOP_K_OUTPUTS)  # never the (rows x tokens x vocab) logits
    assert _same("mlm", result, predictors["mlm"].predict(MASK_TEXTS), precision), result
    assert [len(r["masks"]) for r in result] == [1, 2, 0]


@pytest.mark.parametrize("name,flavor", [("cls", "cpu"), ("mlm", "cpu"), ("minilm", "gpu"), ("mlm", "gpu")])
def test_single_pipeline_template_one_response_per_request(name, flavor, repo, exports, predictors, monkeypatch, tmp_path,
                                                           precision):
    """The single pipeline model with a stand-in pb_utils: a bad request in a dynamic batch gets its own
    error; the others get exactly Predictor.predict's answers. The gpu flavor's BLS encoder is answered
    here by onnxruntime on the graph the repository gives NAME_encoder (what Triton's onnxruntime backend
    would run): fill-mask's takes softmax + top-k itself, so only (rows x tokens x K) come back."""
    from bertops.infer import ort_session
    from bertops.postprocess import TOP_K_OUTPUTS
    from bertops.triton.builder import build_repository

    folder = repo / name / "1"
    session = None
    if flavor == "gpu":
        build_repository(exports[name], name, tmp_path, flavor="gpu")
        folder = tmp_path / name / "1"
        session = ort_session(tmp_path / f"{name}_encoder" / "1" / "model.onnx", threads=1)
    bls_calls, bls_outputs = [], set()

    pb = _fake_pb_utils(lambda req: _onnx_bls(pb, session, req, calls=bls_calls, requested=bls_outputs))
    model = _load_template(folder, monkeypatch, pb)

    def text_request(rows):
        return pb.Request([pb.Tensor("TEXT", np.array(rows, dtype=np.object_))])

    texts = MASK_TEXTS if name == "mlm" else TEXTS
    batches = [[[t.encode()] for t in texts[:3]], [[b"caf\xc3 broken \xff"]], [[texts[-1].encode()], [b""]],
               [[b"one", b"two"], [b"three", b"four"]], [[("Paris " * 5000).encode()]]]
    responses = model.execute([text_request(rows) for rows in batches])
    assert len(responses) == len(batches)
    assert responses[1].has_error() and "TEXT row 0 is not valid UTF-8 (byte 0xc3 at offset 3)" in responses[1].error().message()
    assert responses[1].error().code == pb.TritonError.INVALID_ARG
    pairs_ok = name == "cls"
    if not pairs_ok:  # pairs are refused by single-text tasks, per request
        assert responses[3].has_error() and "one text per row" in responses[3].error().message()
    for i, response in enumerate(responses):
        if i == 1 or (i == 3 and not pairs_ok):
            continue
        assert not response.has_error(), response.error().message()
        rows = batches[i]
        result = [json.loads(x[0]) for x in pb.get_output_tensor_by_name(response, "RESULT").as_numpy()]
        first = [r[0].decode() for r in rows]
        pairs = [r[1].decode() for r in rows] if len(rows[0]) == 2 else None
        expected = predictors[name].predict(first, pairs)
        assert _same(name, result, expected, precision), (result, expected)
    assert json.loads(pb.get_output_tensor_by_name(responses[4], "RESULT").as_numpy()[0][0])["truncated"] is True
    assert model.predictor.group_by_length is (flavor == "cpu")
    if flavor == "gpu":
        assert bls_calls and set(bls_calls) == {f"{name}_encoder"}
        if name == "mlm":  # the logits never cross to the python model
            assert bls_outputs == set(TOP_K_OUTPUTS)
        else:
            assert pb.get_output_tensor_by_name(responses[0], "EMBEDDING").as_numpy().shape == (3, 384)
    else:
        assert not bls_calls
    assert all(model.clock[stage] > 0 for stage in ("decode", "tokenize", "encoder", "postprocess", "respond")), model.clock


@pytest.mark.parametrize("pipeline", ["single", "ensemble"])
def test_cuda_flavor_runs_the_graph_on_the_cuda_provider(pipeline, exports, predictors, monkeypatch, tmp_path, precision):
    """cuda flavor: the python model that runs the graph opens it on onnxruntime's CUDA provider (first, the
    CPU's behind it). Where onnxruntime has no CUDA provider (this CPU machine) loading that model fails
    in one line that names the fix; where it has one, the answers are the in-process ones."""
    import onnxruntime as ort

    from bertops.triton.builder import build_repository
    from bertops.triton.runtime import load_model_meta

    build_repository(exports["cls"], "cls", tmp_path, flavor="cuda", pipeline=pipeline)
    runs_graph = tmp_path / ("cls" if pipeline == "single" else "cls_encoder") / "1"
    assert (runs_graph / "model.onnx").is_file()
    meta = load_model_meta(runs_graph)
    assert meta["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert meta["group_by_length"] is False  # a GPU runs one padded batch (bertops.infer.groups_by_length)
    config = (runs_graph.parent / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "CUDAExecutionProvider" in config
    pb = _fake_pb_utils(lambda req: pytest.fail("the cuda flavor runs the graph in-process, not over BLS"))
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BertopsError, match="has no CUDAExecutionProvider .*install onnxruntime-gpu"):
            _load_template(runs_graph, monkeypatch, pb)
        return
    model = _load_template(runs_graph, monkeypatch, pb)
    if pipeline == "ensemble":  # the python encoder model
        assert model.session.get_providers()[0] == "CUDAExecutionProvider"
        return
    (response,) = model.execute([pb.Request([pb.Tensor("TEXT", np.array([[t.encode()] for t in TEXTS], dtype=np.object_))])])
    result = [json.loads(x[0]) for x in pb.get_output_tensor_by_name(response, "RESULT").as_numpy()]
    assert _same("cls", result, predictors["cls"].predict(TEXTS), precision), result


# ------------------------------------------------------------------------------------------------
# Served answers vs in-process PyTorch / bertops.infer, over HTTP and gRPC
# ------------------------------------------------------------------------------------------------


def _key(name: str, answer: dict):
    """What must be identical between a served and an in-process answer."""
    if name == "minilm":
        return (len(answer["embedding"]), answer["truncated"])
    if name == "cls":
        return (answer["label"], answer["truncated"])
    if name == "ner":
        return ([(e["entity"], e["start"], e["end"], e["word"]) for e in answer["entities"]], answer["truncated"])
    return ([[c["token_id"] for c in mask] for mask in answer["masks"]], answer["truncated"])


def _numbers(name: str, answer: dict) -> np.ndarray:
    """The floats of an answer, equal up to float noise (bucket composition changes summation order)."""
    if name == "minilm":
        return np.asarray(answer["embedding"])
    if name == "cls":
        return np.asarray(list(answer["probabilities"].values()))
    if name == "ner":
        return np.asarray([e["score"] for e in answer["entities"]])
    return np.asarray([c["score"] for mask in answer["masks"] for c in mask])


def _close(name: str, a: dict, b: dict, precision: str) -> bool:
    x, y = _numbers(name, a), _numbers(name, b)
    if name == "minilm" and precision == "int8":  # MiniLM's int8 rows move with the batch: cosine
        return bool(row_cosines([x], [y])[0] >= INT8_FRAGMENT_COSINE)
    return np.allclose(x, y, atol=ATOL[precision], rtol=0)


def _same(name: str, got: list[dict], want: list[dict], precision: str = "fp32") -> bool:
    """Served vs in-process answers on the same export: identical labels / spans / token ids, floats
    within the precision's tolerance (conftest.ATOL; int8 MiniLM rows by cosine)."""
    return len(got) == len(want) and all(
        _key(name, a) == _key(name, b) and _close(name, a, b, precision) for a, b in zip(got, want)
    )


@pytest.mark.slow  # starts tritonserver
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_embeddings_match_pytorch(server, exports, torch_models, protocol, precision):
    from bertops.client import Client

    with Client(_url(server, protocol), protocol) as client:
        served = client.embed("minilm", TEXTS)
        raw = client.infer_raw("minilm", np.array([[t.encode()] for t in TEXTS], dtype=object), ("RESULT", "EMBEDDING"))
    assert served.shape == (len(TEXTS), 384)
    references = [_torch_outputs(torch_models["minilm"], exports["minilm"], t)[0]["sentence_embedding"][0] for t in TEXTS]
    if precision == "fp32":
        for text, vector, reference in zip(TEXTS, served, references):
            assert np.abs(vector - reference).max() < 1e-4, text
    else:  # the gate's cosines on the sentences ("ok" is a fragment: conftest.INT8_FRAGMENT_COSINE)
        assert_embeddings_within_gate(served, references, TEXTS)
    np.testing.assert_allclose(raw["EMBEDDING"], served, atol=1e-7)
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow  # starts tritonserver
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_classification_labels_match_pytorch(server, exports, torch_models, protocol, precision):
    from bertops.client import Client

    with Client(_url(server, protocol), protocol) as client:
        singles = client.classify("cls", TEXTS)
        pairs = client.classify("cls", TEXTS, PAIRS)
        raw = client.infer_raw("cls", np.array([[t.encode()] for t in TEXTS], dtype=object), ("LABEL", "PROBABILITIES"))
    for answers, second in ((singles, [None] * len(TEXTS)), (pairs, PAIRS)):
        for text, pair, answer in zip(TEXTS, second, answers):
            logits = _torch_outputs(torch_models["cls"], exports["cls"], text, pair)[0]["logits"][0]
            if precision == "fp32":
                assert answer["label"] == CLS_LABELS[int(logits.argmax())], (text, pair)
            else:  # int8: PyTorch's label up to a near tie (measured: int8 moves these logits by ~1e-4)
                assert near_top(logits, [CLS_LABELS.index(answer["label"])], 2 * ATOL[precision]), (text, pair, logits)
            probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            np.testing.assert_allclose([answer["probabilities"][k] for k in CLS_LABELS], probs, atol=ATOL[precision])
            assert answer["truncated"] is False
    assert [x[0].decode() for x in raw["LABEL"]] == [a["label"] for a in singles]
    np.testing.assert_allclose(raw["PROBABILITIES"], [[a["probabilities"][k] for k in CLS_LABELS] for a in singles], atol=1e-6)


def _word_spans(folder: Path, text: str) -> tuple[set, set]:
    from bertops.tokenizer import encode, load_tokenizer

    batch = encode(load_tokenizer(folder), [text])
    starts, ends, words = set(), set(), {}
    for (s, e), w in zip(batch.offsets[0], batch.word_ids[0]):
        if w is not None:
            lo, hi = words.get(w, (s, e))
            words[w] = (min(lo, s), max(hi, e))
    for s, e in words.values():
        starts.add(s)
        ends.add(e)
    return starts, ends


@pytest.mark.slow  # starts tritonserver
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_ner_spans_match_in_process_and_slice_the_text(server, exports, predictors, protocol, precision):
    from bertops.client import Client

    with Client(_url(server, protocol), protocol) as client:
        served = client.ner("ner", TEXTS)
    expected = predictors["ner"].predict(TEXTS)
    assert sum(len(s) for s in served) > 0, "the tiny random head should tag something"
    for text, spans, reference in zip(TEXTS, served, expected):
        assert _same("ner", [{"entities": spans, "truncated": False}], [reference], precision), (text, spans, reference)
        starts, ends = _word_spans(exports["ner"], text)
        for span in spans:
            assert text[span["start"] : span["end"]] == span["word"]
            assert span["start"] in starts and span["end"] in ends, (text, span)  # whole words only
            assert span["entity"] in {"PER", "LOC"}


@pytest.mark.slow  # starts tritonserver
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_fill_mask_top_k_matches_pytorch(server, exports, torch_models, protocol, precision):
    from bertops.client import Client

    with Client(_url(server, protocol), protocol) as client:
        served = client.fill_mask("mlm", MASK_TEXTS)
    assert [len(m) for m in served] == [1, 2, 0]
    for text, masks in zip(MASK_TEXTS, served):
        out, batch = _torch_outputs(torch_models["mlm"], exports["mlm"], text)
        positions = np.flatnonzero(batch.input_ids[0] == 103)
        assert [m[0]["position"] for m in masks] == positions.tolist()
        for pos, candidates in zip(positions, masks):
            ids = [c["token_id"] for c in candidates]
            if precision == "fp32":
                top = np.argsort(-out["logits"][0, pos], kind="stable")[: len(candidates)]
                assert ids == top.tolist(), text
            else:  # int8: PyTorch's top-5 up to near ties (measured: int8 moves these logits by <= 8e-5)
                assert near_top(out["logits"][0, pos], ids, ATOL[precision]), (text, ids)
            assert len(candidates) == 5


# ------------------------------------------------------------------------------------------------
# Concurrency, bad requests, and the server staying healthy
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # starts tritonserver
def test_sixteen_concurrent_clients(server, predictors, precision):
    from bertops.client import Client

    texts = TEXTS + MASK_TEXTS
    expected = {name: predictors[name].predict(texts) for name in MODELS}
    failures, counts = [], []

    def worker(tid: int) -> None:
        protocol = "http" if tid % 2 == 0 else "grpc"
        done = 0
        try:
            with Client(_url(server, protocol), protocol) as client:
                for j in range(50):
                    name = list(MODELS)[(tid + j) % 4]
                    lo = (tid * 7 + j * 3) % len(texts)
                    rows = [(lo + k) % len(texts) for k in range(1 + (j % 3))]
                    answers = client.predict(name, [texts[r] for r in rows])
                    if not _same(name, answers, [expected[name][r] for r in rows], precision):
                        failures.append((tid, j, name, rows))
                    done += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append((tid, "exception", repr(exc)))
        counts.append(done)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    elapsed = time.monotonic() - started
    assert not failures, failures[:5]
    assert sum(counts) == 16 * 50
    assert server.is_ready()

    # the dynamic batchers really batched: fewer executions than requests, in both layouts (the ragged
    # postprocess step of the ensemble included)
    import tritonclient.http as httpclient

    stats_client = httpclient.InferenceServerClient(server.http_url)
    try:
        stats = {m["name"]: m for m in stats_client.get_inference_statistics()["model_stats"]}
    finally:
        stats_client.close()
    batched = [f"ner{s}" for s in STEPS] + [m for m, layout in PIPELINES.items() if layout == "single"]
    for model in batched:
        requests, executions = int(stats[model]["inference_count"]), int(stats[model]["execution_count"])
        print(f"{model}: {requests} rows in {executions} executions")
        assert executions < requests, model
    print(f"800 requests from 16 concurrent clients in {elapsed:.1f} s")


@pytest.mark.slow  # starts tritonserver
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, predictors, precision):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from bertops.client import Client

    with Client(server.http_url) as client:
        # empty string: a valid text, answered exactly as bertops.infer answers it
        for name in MODELS:
            assert _same(name, client.predict(name, [""]), predictors[name].predict([""]), precision)
        assert client.ner("ner", [""]) == [[]] and client.fill_mask("mlm", [""]) == [[]]

        # 20,000 characters: truncated to 512 tokens, and RESULT says so
        long_text = ("Paris " * 4000)[:20000]
        for name in MODELS:
            answer = client.predict(name, [long_text, "short"])
            assert answer[0]["truncated"] is True and answer[1]["truncated"] is False
            assert _same(name, answer[:1], predictors[name].predict([long_text]), precision)

        # more texts than max_batch_size: the client splits them into requests of at most 8 rows
        many = [TEXTS[i % len(TEXTS)] for i in range(3 * MAX_BATCH + 1)]
        assert [a["label"] for a in client.classify("cls", many)] == [a["label"] for a in predictors["cls"].predict(many)]

        # unknown model: a BertopsError naming the ready models
        with pytest.raises(BertopsError, match=r"model 'nope' is not ready .*ready models: .*minilm"):
            client.predict("nope", ["x"])
        # pairs sent to a single-text task
        with pytest.raises(BertopsError, match="one text per row"):
            client.predict("ner", ["a"], ["b"])

    def raw(protocol, model, data, name="TEXT"):
        module = httpclient if protocol == "http" else grpcclient
        c = module.InferenceServerClient(_url(server, protocol))
        try:
            inp = module.InferInput(name, list(data.shape), "BYTES")
            inp.set_data_from_numpy(data)
            return c.infer(model, [inp])
        finally:
            c.close()

    for protocol in ("http", "grpc"):
        # invalid UTF-8: a per-request INVALID_ARG naming the row and the byte
        with pytest.raises(InferenceServerException, match=r"TEXT row 1 is not valid UTF-8 \(byte 0xff at offset 4\)"):
            raw(protocol, "cls", np.array([[b"fine"], [b"bad \xff\xfe"]], dtype=object))
        with pytest.raises(InferenceServerException, match="unexpected inference input 'TXT'"):
            raw(protocol, "cls", np.array([[b"x"]], dtype=object), name="TXT")
        with pytest.raises(InferenceServerException, match=r"batch.size must be <= 8"):
            raw(protocol, "cls", np.array([[b"x"]] * (MAX_BATCH + 1), dtype=object))
        with pytest.raises(InferenceServerException, match="unknown model: 'nope' is not found"):
            raw(protocol, "nope", np.array([[b"x"]], dtype=object))
        with pytest.raises(InferenceServerException, match=r"TEXT has shape \[1, 3\]; send \[batch, 1\] \(one text per row\) or \[batch, 2\]"):
            raw(protocol, "cls", np.array([[b"a", b"b", b"c"]], dtype=object))

    # a bad request among concurrent good ones: only it fails (one response per request)
    good, errors = [], []
    c = grpcclient.InferenceServerClient(server.grpc_url)

    def callback(result, error, bad):
        (errors if error is not None else good).append((bad, error))

    for i in range(12):
        bad = i == 5
        data = np.array([[b"\xc3\x28 broken" if bad else TEXTS[i % len(TEXTS)].encode()]], dtype=object)
        inp = grpcclient.InferInput("TEXT", list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        c.async_infer("ner", [inp], lambda result, error, bad=bad: callback(result, error, bad))
    deadline = time.monotonic() + 60
    while len(good) + len(errors) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    c.close()
    assert len(good) == 11 and [bad for bad, _ in errors] == [True], errors

    # the server is still ready and still right
    assert server.is_ready()
    with Client(server.grpc_url, "grpc") as client:
        assert _same("ner", client.predict("ner", TEXTS), predictors["ner"].predict(TEXTS), precision)


def test_client_reports_unreachable_server():
    from bertops.client import Client
    from bertops.triton.server import _free_ports

    port = _free_ports("127.0.0.1", 1)[0]
    for protocol in ("http", "grpc"):
        with Client(f"127.0.0.1:{port}", protocol, timeout=5) as client:
            with pytest.raises(BertopsError, match="no Triton server answers at"):
                client.predict("minilm", ["x"])


# ------------------------------------------------------------------------------------------------
# The CLI: client commands, serve (refusal and a real start/stop)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # starts tritonserver
def test_cli_client_commands(server, predictors, precision):
    from typer.testing import CliRunner

    from bertops.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["client", "ner", "--url", server.grpc_url, "--protocol", "grpc", "--model", "ner", *TEXTS[:2]])
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)
    assert [a["text"] for a in answers] == TEXTS[:2]
    assert _same("ner", answers, predictors["ner"].predict(TEXTS[:2]), precision)
    result = runner.invoke(app, ["client", "classify", "--url", server.http_url, "--model", "cls", "a", "b", "--pair", "c", "--pair", "d"])
    assert result.exit_code == 0, result.output
    assert [a["label"] for a in json.loads(result.stdout)] == [a["label"] for a in predictors["cls"].predict(["a", "b"], ["c", "d"])]
    for command in ("embed", "fill-mask"):
        model = "minilm" if command == "embed" else "mlm"
        result = runner.invoke(app, ["client", command, "--url", server.http_url, "--model", model, MASK_TEXTS[0]])
        assert result.exit_code == 0 and len(json.loads(result.stdout)) == 1, result.output
    result = runner.invoke(app, ["client", "embed", "--url", server.http_url, "--model", "nope", "x"])
    assert result.exit_code == 1 and result.output.strip().startswith("error: model 'nope' is not ready")


def test_cli_triton_build_and_validate(exports, tmp_path):
    from typer.testing import CliRunner

    from bertops.cli import app

    runner = CliRunner()
    repo = tmp_path / "models"
    result = runner.invoke(app, ["triton", "build", "--export", str(exports["cls"]), "--name", "sentiment", "--repo",
                                 str(repo), "--flavor", "gpu", "--max-batch-size", "4", "--instances", "2"])
    assert result.exit_code == 0, result.output
    assert "serve with `bertops serve" in result.stdout and "pipeline single, flavor gpu" in " ".join(result.stdout.split())
    assert sorted(p.name for p in repo.iterdir()) == ["sentiment", "sentiment_encoder"]
    cfg = _parse(repo / "sentiment_encoder" / "config.pbtxt")
    assert cfg.max_batch_size == 4 and list(cfg.dynamic_batching.preferred_batch_size) == [] and cfg.instance_group[0].count == 2
    result = runner.invoke(app, ["triton", "validate", "--repo", str(repo)])
    assert result.exit_code == 0 and "valid" in result.stdout, result.output
    result = runner.invoke(app, ["triton", "build", "--export", str(exports["cls"]), "--name", "sentiment", "--repo",
                                 str(repo), "--pipeline", "ensemble"])
    assert result.exit_code == 0 and "pipeline ensemble, flavor cpu" in " ".join(result.stdout.split()), result.output
    assert sorted(p.name for p in repo.iterdir()) == sorted(["sentiment", *(f"sentiment{s}" for s in STEPS)])
    result = runner.invoke(app, ["triton", "build", "--export", str(tmp_path / "nothing"), "--name", "x", "--repo", str(repo)])
    assert result.exit_code == 1 and "has no model.onnx" in result.output and len(result.output.strip().splitlines()) == 1


def test_builder_records_the_runtime_and_gpu_refuses_an_openvino_export(exports, tmp_path):
    """The python models open model.onnx with the runtime the export names (bertops_model.json); a bf16
    export, which runs on OpenVINO's CPU plugin, cannot go on the gpu flavor's onnxruntime backend."""
    from bertops.triton.builder import build_repository

    build_repository(exports["cls"], "cls", tmp_path / "repo")
    assert json.loads((tmp_path / "repo" / "cls" / "1" / "bertops_model.json").read_text())["runtime"]["name"] == "onnxruntime"
    bf16 = tmp_path / "bf16"
    shutil.copytree(exports["cls"], bf16)
    report = json.loads((bf16 / "export_report.json").read_text())
    (bf16 / "export_report.json").write_text(json.dumps({**report, "runtime": {"name": "openvino", "precision": "bf16"}}))
    with pytest.raises(BertopsError, match="runs on OpenVINO's CPU plugin; build it with --flavor cpu"):
        build_repository(bf16, "cls", tmp_path / "gpu", flavor="gpu")
    assert not (tmp_path / "gpu" / "cls").exists()


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert text.startswith("error: refusing to serve") and needle in text, text


def test_serve_refuses_invalid_repositories_before_starting(repo, exports, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from bertops.cli import app
    from bertops.triton import server as server_module
    from bertops.triton.builder import build_repository

    def must_not_start(self, *args, **kwargs):
        raise AssertionError("serve started tritonserver on an invalid repository")

    monkeypatch.setattr(server_module.TritonServer, "start", must_not_start)
    runner = CliRunner()

    broken = tmp_path / "broken"
    for m in ("ner", *(f"ner{s}" for s in STEPS)):
        shutil.copytree(repo / m, broken / m)
    cfg = broken / "ner_encoder" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("TYPE_INT64", "TYPE_INT32", 1))
    _one_line_error(runner.invoke(app, ["serve", "--repo", str(broken)]), "'input_ids' is TYPE_INT32 in config.pbtxt but TYPE_INT64")

    cfg.write_text("name: ner_encoder\nthis is not a config\n")
    _one_line_error(runner.invoke(app, ["serve", "--repo", str(broken)]), "does not parse as a Triton ModelConfig")

    gpu = tmp_path / "gpu"
    build_repository(exports["ner"], "ner", gpu, flavor="gpu")
    _one_line_error(runner.invoke(app, ["serve", "--repo", str(gpu)]), "needs Triton's 'onnxruntime' backend")

    _one_line_error(runner.invoke(app, ["serve", "--repo", str(tmp_path / "missing")]), "is not a directory")


@pytest.mark.slow  # starts tritonserver
@pytest.mark.parametrize("precision", ["fp32"], indirect=True)  # the CLI's start/stop: one more server, not two
def test_serve_starts_prints_endpoints_and_stops_on_ctrl_c(repo, tmp_path):
    from bertops.triton.server import _free_ports

    small = tmp_path / "repo"
    for m in ("ner", "ner_tokenizer", "ner_encoder", "ner_postprocess"):
        shutil.copytree(repo / m, small / m)
    http, grpc, metrics = _free_ports("127.0.0.1", 3)
    code = "import sys; from bertops.cli import main; main()"
    cmd = [sys.executable, "-c", code, "serve", "--repo", str(small), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--log-file", str(tmp_path / "serve.log")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    lines = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C" in line:
                break
        text = "".join(lines)
        assert f"http://127.0.0.1:{http}" in text and f"127.0.0.1:{grpc}" in text, text
        assert f"http://127.0.0.1:{metrics}/metrics" in text and "ner (token-classification)" in text, text
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "stopping tritonserver" in rest
    log = (tmp_path / "serve.log").read_text()
    assert re.search(r"successfully unloaded 'ner_encoder'", log)
