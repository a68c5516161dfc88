"""Numbers that export and bench share: PyTorch-vs-onnxruntime parity, ONNX graph inspection, median timing.

numpy at import; torch and onnx are imported inside the functions that need them.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from bertops.tasks import Task

# (domain, op_type) of fused nodes, by kind. "" is the default ONNX domain.
MS = "com.microsoft"
FUSED_KINDS: dict[str, tuple[tuple[str, str], ...]] = {
    "attention": ((MS, "Attention"), (MS, "MultiHeadAttention"), ("", "Attention"), ("ai.onnx", "Attention"),
                  (MS, "QAttention")),  # QAttention: int8 exports (bertops.quantize)
    "skip_layernorm": ((MS, "SkipLayerNormalization"), (MS, "SkipSimplifiedLayerNormalization")),
    "embed_layernorm": ((MS, "EmbedLayerNormalization"), (MS, "QEmbedLayerNormalization")),
    "gelu": ((MS, "BiasGelu"), (MS, "FastGelu"), (MS, "Gelu"), ("", "Gelu"), ("ai.onnx", "Gelu")),
}


# --- graph inspection -----------------------------------------------------------------------------


def node_counts(model) -> dict[str, int]:
    """Node-type counts of an ONNX ModelProto: plain op names for the default domain, ``domain.Op`` for others."""
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node)
    return dict(sorted(counts.items()))


def fused_counts(model) -> dict[str, int]:
    """How many fused nodes of each kind (attention, skip_layernorm, embed_layernorm, gelu) a graph has."""
    pairs = Counter((n.domain, n.op_type) for n in model.graph.node)
    return {kind: sum(pairs[p] for p in ops) for kind, ops in FUSED_KINDS.items()}


def io_signature(model) -> dict[str, list[dict[str, Any]]]:
    """Graph inputs/outputs as {name, dtype, shape}; symbolic dims by name (batch, sequence)."""
    import onnx

    def describe(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
            shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
            out.append({"name": v.name, "dtype": dtype, "shape": shape})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


# --- parity ---------------------------------------------------------------------------------------


def torch_outputs(model, task: Task, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The task's outputs of a PyTorch model on one numpy batch, as float32 numpy arrays."""
    import torch

    with torch.inference_mode():
        out = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    return {n: out[n].float().numpy() for n in task.outputs}


def compare(model, session, task: Task, batches: list[dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Max abs difference per output between PyTorch ``model`` and onnxruntime ``session``.

    Per-token outputs (``task.per_token``): ``max_abs`` over real tokens (the gated figure) and
    ``max_abs_all_positions`` including padding. Padded positions are never consumed (mean pooling
    masks them, token-level post-processing drops them), and fused attention kernels legitimately
    compute them differently (the hidden states of padded *query* rows are garbage-in either way and
    accumulate in another order), so only real tokens are gated. Measured on all-MiniLM-L6-v2:
    ~3e-6 on real tokens, up to ~1e-4 at padding.
    """
    names = list(task.outputs)
    result: dict[str, dict[str, float]] = {n: {"max_abs": 0.0} for n in names}
    for batch in batches:
        ref = torch_outputs(model, task, batch)
        got = dict(zip(names, session.run(names, batch)))
        real = batch["attention_mask"].astype(bool)
        for name in names:
            diff = np.abs(got[name].astype(np.float32) - ref[name])
            if not np.isfinite(diff).all():
                diff = np.where(np.isfinite(diff), diff, np.inf)
            if name in task.per_token:
                r = result[name]
                r["max_abs"] = max(r["max_abs"], float(diff[real].max()))
                r["max_abs_all_positions"] = max(r.get("max_abs_all_positions", 0.0), float(diff.max()))
            else:
                result[name]["max_abs"] = max(result[name]["max_abs"], float(diff.max()))
    return result


def worst(figures: dict[str, dict[str, float]]) -> tuple[str, float]:
    """The output with the largest ``max_abs`` in :func:`compare` figures, and that value (NaN counts as worst)."""
    name = max(figures, key=lambda n: np.inf if np.isnan(figures[n]["max_abs"]) else figures[n]["max_abs"])
    return name, figures[name]["max_abs"]


# --- timing ---------------------------------------------------------------------------------------


def median_ms(fn: Callable[[], Any], runs: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``runs`` calls after ``warmup`` untimed ones, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times), 3)
