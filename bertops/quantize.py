"""int8 export (``bertops export onnx --precision int8``): dynamic quantization of the fused graph, gated.

What was measured (all-MiniLM-L6-v2, fused opset-17 export, 128 held-out bundled sentences, embedding
cosine to fp32; 2-core Intel Xeon with AVX512-VNNI and AMX; docs/BENCHMARKS.md has the speed):

=====================================================  =============  ===========
onnxruntime.quantization variant                       mean cosine    min cosine
=====================================================  =============  ===========
dynamic, per-channel signed weights (chosen)           0.9927         0.9827
dynamic, per-tensor weights                            0.9611         0.9202
dynamic, per-channel, reduce_range (7-bit weights)     0.9914         0.9758
dynamic, per-tensor, reduce_range                      0.8733         0.7519
static QOperator, MinMax calibration on 128 sentences  0.9390         0.8965
static QDQ int8 activations, MinMax calibration        0.9368         0.8835
=====================================================  =============  ===========

Static quantization fixes one activation range per tensor from calibration text, and BERT's
activations have outliers that a per-batch (dynamic) range follows; static also leaves the fused
``Attention`` op in fp32 (onnxruntime has no static QAttention). So: dynamic, per-channel, signed
int8 weights (``QAttention``, ``MatMulInteger`` with per-channel scales), uint8 activations.

What stays fp32: the embeddings (``EmbedLayerNormalization``: a table lookup, no arithmetic to save;
quantizing it cost a little accuracy) and the head (the pooler / classifier matmuls run on one row per
text: no speed to gain, and they decide the label). Per-layer sensitivity was flat on MiniLM (keeping
any one of its 6 layers in fp32 lifted mean cosine by 0.0005-0.0017), so no layer is excluded up
front; when the gate misses, :func:`int8` ranks the layers by how much keeping each one in fp32
brings the outputs back (``bertops.accuracy.output_cosine``) and falls them back to fp32 one by one,
most sensitive first, until the gate holds or ``export.int8_max_fp32_share`` of the layers are fp32.

onnxruntime's quantizer needs ``DefaultTensorType=FLOAT`` to get past shape inference on the
``com.microsoft`` fused ops.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bertops.accuracy import GateResult, describe, metric_drop, output_cosine
from bertops.errors import BertopsError
from bertops.precision import (
    Candidate,
    accuracy_gate,
    check_structure,
    eval_scores,
    gate_inputs,
    gate_reference,
)

EMBEDDINGS, HEAD = "embeddings", "head"
PARTS = (EMBEDDINGS, HEAD)  # what export.int8_fp32_parts may name besides layers
_LAYER = re.compile(r"layers?[._/](\d+)[./]")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime.quantization logs a warning per tensor it cannot type; the graph is checked afterwards."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def node_parts(model) -> dict[str, list[str]]:
    """Quantizable node names of a fused graph by part: ``embeddings``, ``layer.N``, ``head``.

    The fused attention nodes are named ``Attention_N`` in layer order; the dense matmuls keep the
    PyTorch module path (``.../layer.N/...``); whatever is neither is the embeddings or the head.
    """
    parts: dict[str, list[str]] = {}
    attention = 0
    for node in model.graph.node:
        if node.op_type in ("Attention", "MultiHeadAttention"):
            part, attention = f"layer.{attention}", attention + 1
        elif node.op_type in ("EmbedLayerNormalization", "Gather"):
            part = EMBEDDINGS
        elif node.op_type in ("MatMul", "Gemm"):
            match = _LAYER.search(node.name + "/")
            part = f"layer.{match.group(1)}" if match else HEAD
        else:
            continue
        parts.setdefault(part, []).append(node.name)
    return parts


def quantize(src: Path, dst: Path, exclude: list[str], per_channel: bool, reduce_range: bool) -> None:
    """onnxruntime dynamic quantization: int8 weights (signed), uint8 activations, ``exclude`` stays fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel, reduce_range=reduce_range,
            nodes_to_exclude=list(exclude), extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


def _layers(parts: dict[str, list[str]]) -> list[str]:
    return sorted((p for p in parts if p.startswith("layer.")), key=lambda p: int(p.split(".")[1]))


def int8(c: Candidate) -> dict[str, Any]:
    """Quantize ``c.fp32_path`` into ``c.out_path`` and gate it; fall layers back to fp32 until it passes."""
    import onnx

    from bertops.infer import ort_session

    if c.exporter_path != "torchscript":
        raise BertopsError("int8 quantizes the onnxruntime-fused graph of opsets 14-17; use --opset 17 with --precision int8")
    cfg = c.config
    started = time.perf_counter()
    fp32_model = onnx.load(str(c.fp32_path))
    parts = node_parts(fp32_model)
    layers = _layers(parts)
    unknown = [p for p in cfg.int8_fp32_parts if p not in parts and p not in PARTS and p not in layers]
    if unknown:
        raise BertopsError(f"export.int8_fp32_parts names {unknown[0]!r}; use {', '.join(PARTS)} or layer.0..layer.{len(layers) - 1}")
    fixed = [p for p in cfg.int8_fp32_parts if p in parts]
    budget = min(int(cfg.int8_max_fp32_share * len(layers) + 1e-9), len([p for p in layers if p not in fixed]))

    c.say(f"int8: fp32 reference on {gate_inputs(c)[2]}")
    reference_session = ort_session(c.fp32_path)
    reference = gate_reference(c, reference_session)
    reference_scores = None
    if cfg.eval_data:
        c.say(f"int8: scoring {cfg.eval_data} with the fp32 graph")
        reference_scores = eval_scores(c, reference_session)
    trial = c.out_path.with_name(c.out_path.name + ".trial")
    attempts: list[dict[str, Any]] = []

    def attempt(fallback: list[str], dst: Path) -> tuple[GateResult, tuple[Any, list[str]]]:
        kept = fixed + [p for p in fallback if p not in fixed]
        quantize(c.fp32_path, dst, [n for p in kept for n in parts[p]], cfg.int8_per_channel, cfg.int8_reduce_range)
        session = ort_session(dst)
        result, run = accuracy_gate(c, reference, session)
        if reference_scores is not None:  # --eval-data: the task's main metric, fp32 vs this graph
            scored = metric_drop(c.task, reference_scores, eval_scores(c, session), c.limits)
            result = GateResult({**result.figures, "eval_data": scored.figures}, result.failures + scored.failures)
        return result, (run, kept)

    try:
        fallback: list[str] = []
        c.say("int8: quantizing (dynamic, per-channel int8 weights)" if cfg.int8_per_channel else "int8: quantizing (per-tensor weights)")
        result, (run, kept) = attempt(fallback, c.out_path)
        attempts.append({"fp32_layers": [], **result.figures, "passed": result.passed})
        sensitivity: dict[str, float] = {}
        order: list[str] = []
        while not result.passed and len(fallback) < budget:
            if not order:  # rank once: what keeping each layer alone in fp32 gives back
                base = output_cosine(reference, run)
                for layer in (p for p in layers if p not in fixed):
                    c.say(f"int8: gate missed ({describe(result.failures)}); measuring {layer}'s sensitivity")
                    _, (trial_run, _) = attempt([layer], trial)
                    sensitivity[layer] = round(output_cosine(reference, trial_run) - base, 6)
                order = sorted(sensitivity, key=lambda p: -sensitivity[p])
            fallback.append(order[len(fallback)])
            c.say(f"int8: falling back {', '.join(fallback)} to fp32")
            result, (run, kept) = attempt(fallback, c.out_path)
            attempts.append({"fp32_layers": list(fallback), **result.figures, "passed": result.passed})
    finally:
        trial.unlink(missing_ok=True)

    figures = result.figures
    if not result.passed:
        fell = f"after falling back {len(fallback)} of {len(layers)} layers to fp32" if fallback else "with no layer in fp32"
        raise BertopsError(
            f"int8 accuracy gate failed {fell} ({describe(result.failures)}; figures {_short(figures)}); "
            f"nothing was written; relax the named limit, or export --precision fp32"
        )
    final = onnx.load(str(c.out_path))
    onnx.checker.check_model(final)
    check_structure(final, c.task, c.cfg, c.exporter_path, "int8")
    excluded = [n for p in kept for n in parts[p]]
    return {
        "int8": {
            "method": "onnxruntime.quantization.quantize_dynamic",
            "weights": "int8 signed, " + ("per-channel" if cfg.int8_per_channel else "per-tensor")
                       + (", reduce_range (7-bit)" if cfg.int8_reduce_range else ""),
            "activations": "uint8, dynamic per-batch range",
            "fp32_parts": kept,
            "excluded_nodes": excluded,
            "quantized_nodes": sum(len(v) for v in parts.values()) - len(excluded),
            "sensitivity_output_cosine_gain": sensitivity,
            "attempts": attempts,
            "seconds": round(time.perf_counter() - started, 2),
        },
        "accuracy_gate": {
            "reference": "the fp32 graph of this export (onnxruntime CPU)",
            "inputs": gate_inputs(c)[2],
            "limits": vars(c.limits),
            "figures": figures,
            "passed": True,
        },
    }


def _short(figures: dict[str, Any]) -> str:
    flat = {**{k: v for k, v in figures.items() if not isinstance(v, dict)}, **figures.get("eval_data", {})}
    return ", ".join(f"{k}={v}" for k, v in flat.items())
