"""The bf16 export precision (``bertops export onnx --precision bf16``): OpenVINO on CPUs with native bf16.

The shipped graph is the fused fp32 ``model.onnx`` itself; what makes it bf16 is the runtime the
report names (``"runtime": {"name": "openvino", "precision": "bf16"}``, :mod:`bertops.runtimes`):
OpenVINO's CPU plugin compiles it with ``INFERENCE_PRECISION_HINT=bf16`` and runs its matmuls on AMX
or AVX512-BF16. onnxruntime has no bf16 CPU kernels on x86; OpenVINO bf16 ran 2.0-2.7x onnxruntime fp32,
1.3-1.4x int8 at 2 threads (mixed at 1), with embeddings indistinguishable from fp32 (docs/BENCHMARKS.md "bf16 inference").

Refused, in one line and before any work, on a CPU without native bf16 (:func:`check_native_bf16`):
there bf16 is emulated or silently fp32, never faster. The bf16 runtime goes through the same accuracy
gate as int8 (:func:`bertops.precision.accuracy_gate`) against the fp32 graph on onnxruntime.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from bertops import runtimes
from bertops.accuracy import GateResult, describe, metric_drop
from bertops.errors import BertopsError
from bertops.numerics import median_ms
from bertops.precision import Candidate, accuracy_gate, eval_scores, gate_inputs, gate_reference
from bertops.runtimes import BF16, OpenVINOSession, check_native_bf16


def precheck() -> None:
    """Refuse bf16 on this CPU before the export starts (one line: why, and what to use instead)."""
    check_native_bf16()
    runtimes.openvino_core()  # one line when openvino is not installed


def bf16(c: Candidate) -> dict[str, Any]:
    """Ship the fp32 graph with the OpenVINO bf16 runtime, once that runtime passes the accuracy gate."""
    import openvino as ov

    from bertops.export import latency_inputs
    from bertops.infer import ort_session, physical_cores

    precheck()
    started = time.perf_counter()
    shutil.copyfile(c.fp32_path, c.out_path)
    threads = physical_cores()
    c.say(f"bf16: fp32 reference on {gate_inputs(c)[2]}")
    reference_session = ort_session(c.fp32_path, threads=threads)
    reference = gate_reference(c, reference_session)
    c.say("bf16: compiling for OpenVINO's CPU plugin (INFERENCE_PRECISION_HINT=bf16)")
    session = OpenVINOSession(c.out_path, BF16.precision, threads)
    result, _ = accuracy_gate(c, reference, session)
    if c.config.eval_data:
        c.say(f"bf16: scoring {c.config.eval_data} with the fp32 graph and with bf16")
        scored = metric_drop(c.task, eval_scores(c, reference_session), eval_scores(c, session), c.limits)
        result = GateResult({**result.figures, "eval_data": scored.figures}, result.failures + scored.failures)
    if not result.passed:
        raise BertopsError(
            f"bf16 accuracy gate failed ({describe(result.failures)}; figures {result.figures}); "
            f"nothing was written; relax the named limit, or export --precision fp32"
        )

    c.say("bf16: measuring latency (onnxruntime fp32 vs OpenVINO bf16)")
    latency: dict[str, Any] = {"runs": 5, "threads": threads}
    for label, batch in latency_inputs(c.tok, c.max_seq_len).items():
        fp32_ms = median_ms(lambda b=batch: reference_session.run(None, b), 5, warmup=2)
        bf16_ms = median_ms(lambda b=batch: session.run(None, b), 5, warmup=2)
        latency[label] = {"shape": list(batch["input_ids"].shape), "onnxruntime_fp32_ms": fp32_ms,
                          "openvino_bf16_ms": bf16_ms, "speedup": round(fp32_ms / bf16_ms, 2)}
    native = sorted(runtimes.cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile"})
    return {
        "runtime": BF16.as_dict(),
        "bf16": {
            "method": "OpenVINO CPU plugin compiles the fused fp32 graph with INFERENCE_PRECISION_HINT=bf16",
            "graph": "model.onnx is the fp32 graph; weights and matmuls run in bf16, inputs/outputs int64/fp32",
            "cpu_bf16_flags": native,
            "latency": latency,
            "seconds": round(time.perf_counter() - started, 2),
        },
        "accuracy_gate": {
            "reference": "the fp32 graph of this export (onnxruntime CPU)",
            "candidate": "the same graph on OpenVINO CPU, bf16",
            "inputs": gate_inputs(c)[2],
            "limits": vars(c.limits),
            "figures": result.figures,
            "passed": True,
        },
        "versions_runtime": {"openvino": ov.__version__},
    }
