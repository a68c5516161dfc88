"""int8 export behind the accuracy gate, on the real all-MiniLM-L6-v2 and real text.

The gate compares answers with the fp32 graph on the first 128 bundled sentences
(``bertops.precision.GATE_ROWS``); the checks here use the other 128, which the export never saw.
The classification heads are decision functions over MiniLM's features (nearest centroid of k-means
clusters of the bundled sentences / their tokens; a random tiny model would say nothing about how
int8 moves answers). They are not fine-tuned, so their margins are small: int8 flips about 1.2% of
their labels and moves entity F1 against fp32's spans by about 3 points, which the default gate
refuses (tested). The served/predict checks therefore export them with the gate relaxed through its
options (recorded in the report) and check that the answers stay within that gate on held-out text.
Slow tests start a real tritonserver.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bertops.config import ExportConfig
from bertops.errors import BertopsError
from bertops.precision import GATE_ROWS
from bertops.tasks import EMBEDDINGS, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION

runner = CliRunner()
CLS_LABELS = ["negative", "neutral", "positive"]
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
# Per-tensor weights on every node, nothing kept in fp32, no fallback: measured mean cosine ~0.96 on MiniLM.
BROKEN = {"int8_per_channel": False, "int8_fp32_parts": (), "int8_max_fp32_share": 0.0}
# The gates the centroid heads are exported under (see the module docstring), and no layer fallback.
RELAXED = {"cls": {"gate_min_agreement": 0.97}, "ner": {"gate_max_drop": 5.0}, "minilm": {}}


@pytest.fixture(scope="module")
def held_out(sentences) -> list[str]:
    return sentences[GATE_ROWS:]


def _kmeans(x: np.ndarray, k: int, iters: int = 20) -> np.ndarray:
    """Deterministic k-means (seeded random start): (N, H) -> (k, H) centroids."""
    c = x[np.random.default_rng(0).choice(len(x), k, replace=False)]
    for _ in range(iters):
        assign = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
    return c


def _centroid_head(minilm_dir: Path, task, labels: list[str], out: Path, sentences: list[str]) -> Path:
    """MiniLM + a nearest-centroid head (weight c_k, bias -|c_k|^2 / 2) over the features the head reads."""
    import torch

    from bertops.checkpoint import load_model, save_model
    from bertops.tokenizer import encode, load_tokenizer

    model, _ = load_model(minilm_dir, task.name, new_head=True, num_labels=len(labels), id2label=dict(enumerate(labels)))
    batch = encode(load_tokenizer(minilm_dir), sentences, max_length=128).arrays()
    with torch.inference_mode():
        enc = model.bert(*(torch.from_numpy(batch[n]) for n in ("input_ids", "attention_mask", "token_type_ids")))
    if task.token_level:
        feats = enc["last_hidden_state"].numpy()[batch["attention_mask"].astype(bool)]
    else:
        feats = enc["pooler_output"].numpy()
    c = _kmeans(feats.astype(np.float64), len(labels))
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(c).float())
        model.classifier.bias.copy_(torch.from_numpy(-0.5 * (c**2).sum(1)).float())
    return save_model(model, out, tokenizer_dir=minilm_dir)


@pytest.fixture(scope="module")
def heads(minilm_dir, sentences, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("heads")
    return {
        "cls": _centroid_head(minilm_dir, SEQUENCE_CLASSIFICATION, CLS_LABELS, root / "cls", sentences),
        "ner": _centroid_head(minilm_dir, TOKEN_CLASSIFICATION, NER_LABELS, root / "ner", sentences),
    }


@pytest.fixture(scope="module")
def exports(minilm_dir, heads, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """name -> {"fp32": folder, "int8": folder}: MiniLM embeddings and the two centroid heads."""
    from bertops.export import export_onnx

    root = tmp_path_factory.mktemp("q-exports")
    sources = {"minilm": (minilm_dir, EMBEDDINGS.name), "cls": (heads["cls"], SEQUENCE_CLASSIFICATION.name),
               "ner": (heads["ner"], TOKEN_CLASSIFICATION.name)}
    out: dict[str, dict[str, Path]] = {}
    for name, (src, task) in sources.items():
        out[name] = {}
        for precision in ("fp32", "int8"):
            out[name][precision] = root / f"{name}-{precision}"
            export_onnx(src, task, out[name][precision], precision=precision, config=ExportConfig(**RELAXED[name]))
    return out


def _cosines(a: list[dict], b: list[dict]) -> np.ndarray:
    x = np.asarray([r["embedding"] for r in a])
    y = np.asarray([r["embedding"] for r in b])
    return (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)


def _spans(answers: list[dict]) -> list[set]:
    return [{(s["entity"], s["start"], s["end"]) for s in a["entities"]} for a in answers]


def _span_f1(ref: list[set], got: list[set]) -> float:
    hit = sum(len(a & b) for a, b in zip(ref, got))
    total = sum(len(a) for a in ref) + sum(len(b) for b in got)
    return 1.0 if total == 0 else 2 * hit / total


# --- the gate gates -----------------------------------------------------------------------------------


def test_broken_quantization_is_refused_with_figures_and_nothing_written(minilm_dir, tmp_path):
    """Per-tensor weights everywhere, nothing in fp32, no fallback: the real export path refuses it."""
    from bertops.cli import app

    config = tmp_path / "broken.yaml"
    config.write_text("export:\n  precision: int8\n" + "".join(
        f"  {k}: {json.dumps(list(v) if isinstance(v, tuple) else v)}\n" for k, v in BROKEN.items()))
    out = tmp_path / "new" / "int8"
    result = runner.invoke(app, ["export", "onnx", "-m", str(minilm_dir), "-o", str(out), "-c", str(config)])
    assert result.exit_code == 1
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error: int8 accuracy gate failed"), line
    assert "mean cosine 0.9" in line and "< 0.99 (--gate-min-mean-cosine)" in line and "nothing was written" in line
    assert "nearest_neighbour_agreement=" in line
    assert not (tmp_path / "new").exists()  # the folder this call created is gone

    from bertops.export import export_onnx

    cfg = ExportConfig(**BROKEN, gate_min_mean_cosine=0.9, gate_min_cosine=0.8)  # the options the error names
    report = export_onnx(minilm_dir, EMBEDDINGS.name, out, precision="int8", config=cfg)
    gate = report["accuracy_gate"]
    assert gate["passed"] and gate["limits"]["min_mean_cosine"] == 0.9
    assert 0.9 <= gate["figures"]["mean_cosine"] < 0.99  # what the default gate refused
    assert report["int8"]["excluded_nodes"] == [] and report["int8"]["weights"] == "int8 signed, per-tensor"
    assert (out / "model.onnx").is_file()


def test_default_gate_refuses_labels_int8_moves(heads, tmp_path):
    """The centroid classifier loses 1.2% of its labels to int8: refused at 99% agreement, figures named."""
    from bertops.export import export_onnx

    with pytest.raises(BertopsError, match=r"label agreement 9\d\.\d+% < 99\.00% \(--gate-min-agreement\)"):
        export_onnx(heads["cls"], SEQUENCE_CLASSIFICATION.name, tmp_path / "cls", precision="int8",
                    config=ExportConfig(int8_max_fp32_share=0.0))
    assert not (tmp_path / "cls").exists()


def test_sensitive_layers_fall_back_to_fp32_until_the_gate_holds(minilm_dir, tmp_path):
    """A gate stricter than per-channel int8 meets on its own: layers are ranked, then kept fp32 one by one."""
    import onnx

    from bertops.export import export_onnx

    cfg = ExportConfig(gate_min_mean_cosine=0.9950, int8_max_fp32_share=1.0)
    report = export_onnx(minilm_dir, EMBEDDINGS.name, tmp_path / "fallback", precision="int8", config=cfg)
    q = report["int8"]
    attempts = q["attempts"]
    assert not attempts[0]["passed"] and attempts[-1]["passed"] and len(attempts) >= 2
    assert [len(a["fp32_layers"]) for a in attempts] == list(range(len(attempts)))
    assert attempts[-1]["mean_cosine"] >= 0.995 > attempts[0]["mean_cosine"]
    order = sorted(q["sensitivity_output_cosine_gain"], key=lambda k: -q["sensitivity_output_cosine_gain"][k])
    assert attempts[-1]["fp32_layers"] == order[: len(attempts) - 1]  # most sensitive first
    # the excluded nodes are really fp32 in the written graph: the layer's attention is not QAttention
    graph = onnx.load(str(tmp_path / "fallback" / "model.onnx"))
    kinds = {n.name: n.op_type for n in graph.graph.node}
    kept = [n for n in q["excluded_nodes"] if n.startswith("Attention_")]
    assert kept and all(kinds[n] == "Attention" for n in kept)
    assert sum(t == "QAttention" for t in kinds.values()) == 6 - len(kept)


# --- passing exports answer like fp32 on held-out text --------------------------------------------------


def test_int8_embeddings_match_fp32_on_held_out_text(exports, held_out):
    from bertops.infer import load_predictor

    report = json.loads((exports["minilm"]["int8"] / "export_report.json").read_text())
    assert report["precision"] == "int8" and report["accuracy_gate"]["passed"]
    assert report["node_counts"]["com.microsoft.QAttention"] == 6 and report["fused"]["attention"] == 6
    assert "embeddings" in report["int8"]["fp32_parts"] and report["int8"]["excluded_nodes"]
    fp32 = load_predictor(exports["minilm"]["fp32"]).predict(held_out)
    int8 = load_predictor(exports["minilm"]["int8"]).predict(held_out)
    cos = _cosines(fp32, int8)
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, (cos.mean(), cos.min())
    assert len(held_out) == 128


def test_int8_labels_and_spans_match_fp32_on_held_out_text(exports, held_out):
    from bertops.infer import load_predictor

    for name in ("cls", "ner"):
        report = json.loads((exports[name]["int8"] / "export_report.json").read_text())
        assert report["accuracy_gate"]["passed"], report["accuracy_gate"]
        limits = report["accuracy_gate"]["limits"]
        assert limits["min_agreement"] == RELAXED["cls"]["gate_min_agreement"] if name == "cls" else \
            limits["max_drop_points"] == RELAXED["ner"]["gate_max_drop"]
    fp32 = load_predictor(exports["cls"]["fp32"]).predict(held_out)
    int8 = load_predictor(exports["cls"]["int8"]).predict(held_out)
    assert len({r["label"] for r in fp32}) == 3  # the head really separates the texts
    agreement = np.mean([a["label"] == b["label"] for a, b in zip(fp32, int8)])
    assert agreement >= 0.96, agreement  # the (relaxed) gate's 97% on 256 other rows; one more flip allowed here
    fp32 = _spans(load_predictor(exports["ner"]["fp32"]).predict(held_out))
    int8 = _spans(load_predictor(exports["ner"]["int8"]).predict(held_out))
    assert sum(map(len, fp32)) > 100
    assert _span_f1(fp32, int8) >= 0.94, _span_f1(fp32, int8)  # the (relaxed) gate: 5 points


def test_eval_data_gates_the_main_metric(exports, heads, sentences, tmp_path):
    """--eval-data: the task's own metric on labelled rows, fp32 vs int8, recorded and gated in points."""
    from bertops.cli import app
    from bertops.infer import load_predictor

    labels = [r["label"] for r in load_predictor(exports["cls"]["fp32"]).predict(sentences)]
    int8 = [r["label"] for r in load_predictor(exports["cls"]["int8"]).predict(sentences)]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(sentences, labels)))
    config = tmp_path / "no-fallback.yaml"
    config.write_text("export:\n  int8_max_fp32_share: 0\n  gate_min_agreement: 0.97\n")
    # as a fine-tuned folder records it: the length its texts are read at (the gate's eval texts too)
    head = tmp_path / "head"
    shutil.copytree(heads["cls"], head)
    raw = json.loads((head / "config.json").read_text())
    (head / "config.json").write_text(json.dumps({**raw, "bertops_max_length": 96}))
    base = ["export", "onnx", "-m", str(head), "--task", SEQUENCE_CLASSIFICATION.name, "--precision", "int8",
            "--eval-data", str(data), "-c", str(config)]
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "a"), "--gate-max-drop", "10"])
    assert result.exit_code == 0, result.output
    gate = json.loads((tmp_path / "a" / "export_report.json").read_text())["accuracy_gate"]
    # labels are compared on the eval texts (the head's own domain), not on the bundled sentences
    assert gate["inputs"] == f"the first {len(sentences)} texts of eval.jsonl (--eval-data; max 96 tokens)"
    assert gate["figures"]["rows"] == len(sentences)
    scored = gate["figures"]["eval_data"]
    # gold = fp32's labels, so fp32 scores 1.0 and int8 scores its agreement with fp32 on these rows
    assert scored["metric"] == "accuracy" and scored["fp32"] == 1.0 and scored["examples"] == len(sentences)
    # int8 activations are quantized with one range per run, so batching moves a borderline row: within 2 rows
    flips = 100 * (1 - np.mean(np.array(labels) == np.array(int8)))
    assert abs(scored["drop_points"] - flips) <= 100 * 2 / len(sentences) + 1e-6
    assert scored["drop_points"] > 0  # the centroid head loses labels to int8 on 256 rows
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "b"), "--gate-max-drop", f"{scored['drop_points'] / 2:.3f}"])
    assert result.exit_code == 1
    assert "eval-data accuracy" in result.output and "points below fp32's 100.00" in result.output
    assert "--gate-max-drop" in result.output and not (tmp_path / "b").exists()


# --- the same answers through predict and Triton --------------------------------------------------------


def test_int8_exports_through_predict_cli(exports, held_out, tmp_path):
    from bertops.cli import app

    texts = tmp_path / "in.txt"
    texts.write_text("\n".join(held_out[:32]) + "\n")
    answers = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / f"{precision}.jsonl"
        result = runner.invoke(app, ["predict", "-m", str(exports["ner"][precision]), "-i", str(texts), "-o", str(out)])
        assert result.exit_code == 0, result.output
        answers[precision] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers["int8"]) == 32
    assert _span_f1(_spans(answers["fp32"]), _spans(answers["int8"])) >= 0.94  # the (relaxed) gate: 5 points


@pytest.mark.slow
def test_triton_serves_int8_exports_like_in_process(exports, held_out, tmp_path):
    """`bertops triton build` + a real tritonserver: int8 models answer as bertops.infer does with the same
    export, and within the gate of fp32."""
    from bertops.client import Client
    from bertops.infer import load_predictor
    from bertops.triton.builder import build_repository
    from bertops.triton.server import TritonServer

    repo = tmp_path / "repo"
    for name in ("minilm", "cls", "ner"):
        build_repository(exports[name]["int8"], name, repo, max_batch_size=8, preferred_batch_sizes=(4, 8))
    texts = held_out[:24]
    local = {name: load_predictor(exports[name]["int8"]).predict(texts) for name in ("minilm", "cls", "ner")}
    fp32 = {name: load_predictor(exports[name]["fp32"]).predict(texts) for name in ("minilm", "cls", "ner")}
    server = TritonServer(repo, log_file=tmp_path / "server.log")
    server.start(timeout=240)
    try:
        with Client(server.http_url) as client:
            served = {name: client.predict(name, texts) for name in ("minilm", "cls", "ner")}
    finally:
        server.stop()
    # Same graph; int8 activation ranges are per run, so another batching moves numbers slightly.
    same = _cosines(served["minilm"], local["minilm"])  # measured: batched vs alone, mean 0.992, min 0.978
    assert same.mean() >= 0.98 and same.min() >= 0.96
    cos = _cosines(served["minilm"], fp32["minilm"])
    assert cos.mean() >= 0.99 and cos.min() >= 0.97  # the gate, on held-out text
    assert np.mean([a["label"] == b["label"] for a, b in zip(served["cls"], local["cls"])]) >= 0.9
    assert np.mean([a["label"] == b["label"] for a, b in zip(served["cls"], fp32["cls"])]) >= 0.9  # 97% gate, 24 rows
    assert _span_f1(_spans(local["ner"]), _spans(served["ner"])) >= 0.94
    assert _span_f1(_spans(fp32["ner"]), _spans(served["ner"])) >= 0.94
    assert all(set(r) == {"embedding", "truncated"} for r in served["minilm"])  # answers unchanged in shape
    assert all({"label", "score", "probabilities"} <= set(r) for r in served["cls"])


def test_int8_is_refused_for_tasks_without_a_gate(minilm_dir, tmp_path):
    from bertops import tasks
    from bertops.export import export_onnx
    from bertops.tasks import register_task

    ungated = register_task(dataclasses.replace(EMBEDDINGS, name="ungated-embeddings", gate=None, module=""))
    try:
        with pytest.raises(BertopsError, match="has no accuracy gate"):
            export_onnx(minilm_dir, ungated.name, tmp_path / "u", precision="int8", max_seq_len=16)
    finally:
        tasks._REGISTRY.pop(ungated.name, None)  # other tests list the registered tasks
    assert not (tmp_path / "u").exists()
