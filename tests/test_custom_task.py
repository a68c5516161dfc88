"""A task registered outside the package (examples/quality_score_task.py) exports, predicts and serves.

The example is loaded from its file, as a user's own module would be; nothing in bertops names it.
Its tiny random checkpoint is exported through the parity gate, predicted in-process (here and in a
fresh process that loads the export's task plugin), built into a Triton repository and served by a
real tritonserver over HTTP and gRPC with the same answers.

All of it runs on an fp32 export and on an int8 one (``precision`` parameter). The example task has
no accuracy gate (so ``--precision int8`` refuses it, as it should); for its int8 export this module
registers it with a regression gate of its own (:func:`score_gate`), as a user defining the task would.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PRECISIONS, assert_int8_export

from bertops.errors import BertopsError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "quality_score_task.py"
TEXTS = ["A clear, well written sentence.", "bad txt", "", "Zoë's café in Zürich serves crème brûlée. " * 3]
PAIRS = ["Another sentence.", "something else", "empty first", "short"]
# int8 scores vs PyTorch (measured <= 5e-4; the scores spread over 1e-2 across TEXTS), and served vs
# in-process on the same export (another batching quantizes the activations with another range).
SCORE_ATOL = {"fp32": 1e-4, "int8": 2e-3}
SERVED_ATOL = {"fp32": 1e-5, "int8": 1e-3}


def score_gate(ref, got, limits):
    """A regression score's accuracy gate: the candidate's scores must correlate with fp32's (Pearson, i.e.
    the cosine of the centred score columns) at least as the embeddings' mean cosine must (--gate-min-mean-cosine)."""
    from bertops.accuracy import GateResult

    a = np.array([r["score"] for r in ref.answers], dtype=np.float64)
    b = np.array([r["score"] for r in got.answers], dtype=np.float64)
    x, y = a - a.mean(), b - b.mean()
    corr = float(np.nan_to_num(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)), nan=-1.0))
    figures = {"rows": len(a), "score_correlation": round(corr, 5), "max_abs_diff": round(float(np.abs(a - b).max()), 6)}
    failures = [] if corr >= limits.min_mean_cosine else [
        f"score correlation {corr:.4f} < {limits.min_mean_cosine:g} (--gate-min-mean-cosine)"]
    return GateResult(figures, failures)


@pytest.fixture(scope="module")
def task():
    spec = importlib.util.spec_from_file_location("quality_score_task", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality_score_task"] = module
    spec.loader.exec_module(module)
    return module.QUALITY_SCORE


@pytest.fixture(scope="module")
def checkpoint(task, tmp_path_factory, minilm_dir):
    import torch
    from conftest import tiny_config

    from bertops.checkpoint import save_model

    torch.manual_seed(0)
    model = task.build_model(tiny_config())
    return save_model(model, tmp_path_factory.mktemp("quality-ckpt"), tokenizer_dir=minilm_dir)


@pytest.fixture(scope="module", params=PRECISIONS)
def export(task, checkpoint, tmp_path_factory, request):
    """(folder, report) of the export in each precision; int8 with the task registered with score_gate."""
    from bertops import tasks
    from bertops.export import export_onnx

    precision = request.param
    out = tmp_path_factory.mktemp(f"quality-export-{precision}")
    with pytest.MonkeyPatch.context() as mp:
        if precision == "int8":
            mp.setitem(tasks._REGISTRY, task.name, dataclasses.replace(task, gate=score_gate))
        report = export_onnx(checkpoint, task.name, out, precision=precision, max_seq_len=16)
    return out, report


@pytest.fixture(scope="module")
def expected(task, checkpoint, export):
    """PyTorch's scores for TEXTS / PAIRS (the oracle for in-process and served answers)."""
    import torch

    from bertops.checkpoint import load_model
    from bertops.tokenizer import encode, load_tokenizer

    model, _ = load_model(checkpoint, task.name)
    batch = encode(load_tokenizer(checkpoint), TEXTS, PAIRS)
    with torch.inference_mode():
        scores = model(**{k: torch.from_numpy(v) for k, v in batch.arrays().items()})["score"]
    return scores.reshape(-1).numpy()


@pytest.fixture(scope="module")
def repo(export, tmp_path_factory):
    from bertops.triton.builder import build_repository

    repo = tmp_path_factory.mktemp("quality-triton") / "models"
    build_repository(export[0], "quality", repo, max_batch_size=8, preferred_batch_sizes=(4, 8))  # single
    build_repository(export[0], "quality_ens", repo, max_batch_size=8, preferred_batch_sizes=(4, 8), pipeline="ensemble")
    return repo


def test_registered_from_outside_the_package(task):
    from bertops.tasks import get_task, task_names

    assert "quality-score" in task_names() and get_task("quality-score") is task
    assert task.module == "quality_score_task" and Path(task.source) == EXAMPLE.resolve()
    assert not task.builtin and task.reads == ("score",)


def test_register_task_refuses_clashes_and_inconsistent_records(task):
    from dataclasses import replace

    from bertops.tasks import EMBEDDINGS, Task, register_task

    with pytest.raises(BertopsError, match="task 'embeddings' is already registered"):
        register_task(replace(task, name=EMBEDDINGS.name, module="", source=None))
    with pytest.raises(BertopsError, match="reads names 'logits', which is not one of outputs"):
        register_task(Task(name="broken", build_model=task.build_model, outputs=("score",),
                           postprocess=task.postprocess, reads=("logits",)))
    with pytest.raises(BertopsError, match="graph_top_k names 'score', which is not one of per_token"):
        register_task(Task(name="broken", build_model=task.build_model, outputs=("score",),
                           postprocess=task.postprocess, graph_top_k="score"))


def test_export_passes_parity_and_carries_the_plugin(export):
    out, report = export
    assert report["task"] == "quality-score"
    assert report["parity"]["outputs"]["score"]["max_abs"] <= 1e-4 and report["parity"]["pairs"] is True
    assert report["task_plugin"] == {"file": "task_plugin.py", "module": "quality_score_task"}
    assert (out / "task_plugin.py").read_text() == EXAMPLE.read_text()
    assert "task_plugin.py" in report["files"] and not (out / "labels.json").exists()
    assert [o["name"] for o in report["io"]["outputs"]] == ["score"]
    assert report["precision"] in PRECISIONS
    if report["precision"] == "int8":
        assert_int8_export(out)
        assert report["accuracy_gate"]["figures"]["score_correlation"] >= 0.99


def test_predicts_in_process_like_pytorch(export, expected):
    from bertops.infer import load_predictor

    answers = load_predictor(export[0]).predict(TEXTS, PAIRS)
    assert [set(a) for a in answers] == [{"score", "truncated"}] * len(TEXTS)
    np.testing.assert_allclose([a["score"] for a in answers], expected, atol=SCORE_ATOL[export[1]["precision"]])


def test_a_fresh_process_loads_the_task_from_the_export(export, expected):
    """No import of the example: bertops.infer finds the task in the export's task_plugin.py."""
    code = (
        "import json, sys; from bertops.infer import load_predictor; "
        "print(json.dumps(load_predictor(sys.argv[1]).predict(json.loads(sys.argv[2]), json.loads(sys.argv[3]))))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(export[0]), json.dumps(TEXTS), json.dumps(PAIRS)],
                            capture_output=True, text=True, timeout=300, cwd="/")
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    np.testing.assert_allclose([a["score"] for a in answers], expected, atol=SCORE_ATOL[export[1]["precision"]])


def test_repository_has_a_score_output_and_the_plugin(repo):
    from bertops.triton.validate import parse_config, validate_repository

    assert validate_repository(repo) == []
    for entry in ("quality", "quality_ens"):
        cfg = parse_config(repo / entry / "config.pbtxt")
        assert [(o.name, list(o.dims)) for o in cfg.output] == [("RESULT", [1]), ("SCORE", [1])]
    for model in ("quality", "quality_ens_tokenizer", "quality_ens_encoder", "quality_ens_postprocess"):
        assert (repo / model / "1" / "task_plugin.py").read_text() == EXAMPLE.read_text(), model


@pytest.mark.slow  # starts tritonserver
def test_served_over_http_and_grpc_equals_in_process(repo, export, tmp_path):
    from bertops.client import Client, text_tensor
    from bertops.infer import load_predictor
    from bertops.triton.server import TritonServer

    atol = SERVED_ATOL[export[1]["precision"]]
    local = load_predictor(export[0]).predict(TEXTS, PAIRS)
    singles = load_predictor(export[0]).predict(TEXTS)
    with TritonServer(repo, log_file=tmp_path / "server.log") as server:
        for (protocol, url), model in itertools.product((("http", server.http_url), ("grpc", server.grpc_url)),
                                                        ("quality", "quality_ens")):
            with Client(url, protocol) as client:
                served = client.predict(model, TEXTS, PAIRS)
                assert [a["truncated"] for a in served] == [a["truncated"] for a in local]
                np.testing.assert_allclose([a["score"] for a in served], [a["score"] for a in local], atol=atol)
                one = client.predict(model, TEXTS)
                np.testing.assert_allclose([a["score"] for a in one], [a["score"] for a in singles], atol=atol)
                raw = client.infer_raw(model, text_tensor(TEXTS, PAIRS), outputs=("RESULT", "SCORE"))
                assert raw["SCORE"].shape == (len(TEXTS), 1) and raw["SCORE"].dtype == np.float32
                np.testing.assert_allclose(raw["SCORE"].reshape(-1), [a["score"] for a in local], atol=atol)
