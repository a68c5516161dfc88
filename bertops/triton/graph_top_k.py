"""An encoder graph that takes softmax + top-k of a per-token output itself (``Task.graph_top_k``).

Why: with the gpu flavor the encoder runs in Triton's onnxruntime backend, a process apart from the
python model that post-processes, and fill-mask's (rows x tokens x vocab) logits -- 122 KB per token
for a 30522-token vocabulary in fp32 -- would cross that boundary over BLS. Appended here, the top K
probabilities and token ids per position, (rows x tokens x K) each, cross instead; the python side
turns them into the same answers (:func:`bertops.postprocess.fill_mask_top_k`).

Cast to float32 -> Softmax(axis=-1) -> TopK(K, largest, sorted): an fp16 export ranks fp32 probabilities.
The original outputs stay (a client may still ask for them); Triton sends only what is requested.
"""

from __future__ import annotations

from pathlib import Path

from bertops.postprocess import TOP_K_OUTPUTS


def add_top_k(src: Path, dst: Path, output: str, k: int) -> None:
    """Write ``src`` with TOP_K_OUTPUTS of ``output`` ((B, T, V) -> (B, T, k) float32 and int64) to ``dst``.

    External weight files (graphs over 2 GB) are not loaded: ``dst`` keeps referring to them by name,
    so they must sit next to it."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    source = next(o for o in graph.output if o.name == output)
    dims = source.type.tensor_type.shape.dim
    shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in dims[:-1]] + [k]
    scores, ids = TOP_K_OUTPUTS
    prefix = f"bertops_top_k_{output}"
    graph.initializer.append(numpy_helper.from_array(np.array([k], dtype=np.int64), f"{prefix}_k"))
    graph.node.extend([
        helper.make_node("Cast", [output], [f"{prefix}_fp32"], to=TensorProto.FLOAT, name=f"{prefix}_cast"),
        helper.make_node("Softmax", [f"{prefix}_fp32"], [f"{prefix}_probs"], axis=-1, name=f"{prefix}_softmax"),
        helper.make_node("TopK", [f"{prefix}_probs", f"{prefix}_k"], [scores, ids], axis=-1, largest=1, sorted=1,
                         name=f"{prefix}_topk"),
    ])
    graph.output.extend([helper.make_tensor_value_info(scores, TensorProto.FLOAT, shape),
                         helper.make_tensor_value_info(ids, TensorProto.INT64, shape)])
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
