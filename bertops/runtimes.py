"""Which runtime runs an export's graph, and the OpenVINO side of that choice (bf16 on the CPU).

An export folder always holds the fused fp32 (or fp16 / int8) ``model.onnx``. Its report may name
the runtime that runs it (``export_report.json`` -> ``"runtime": {"name": ..., "precision": ...}``);
without one it is onnxruntime, as for every export made before runtimes were recorded.

Why OpenVINO for bf16: onnxruntime's CPU execution provider has no bf16 arithmetic on x86 (its bf16
GEMM option is arm64-only), so a bf16 graph would not even load there. OpenVINO's CPU plugin reads
the same fused ONNX file (it decomposes the com.microsoft Attention / SkipLayerNormalization /
BiasGelu nodes and re-fuses them its own way) and, with ``INFERENCE_PRECISION_HINT=bf16``, runs its
matmuls in bf16 on AMX or AVX512-BF16 while inputs and outputs stay int64 / fp32. Figures that
justify this: docs/BENCHMARKS.md "bf16 inference" (bench/bf16_paths.py).

:class:`OpenVINOSession` has the part of ``onnxruntime.InferenceSession``'s interface that bertops
uses (``run``, ``get_inputs``, ``get_outputs``), so :class:`bertops.infer.Predictor` and the Triton
models drive either runtime the same way (:func:`bertops.infer.open_session` picks it).

Torch-free and openvino-free at import: the Triton python backend imports this module.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertops.errors import BertopsError

RUNTIME_KEY = "runtime"  # export_report.json entry
ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bf16 dot products


@dataclass(frozen=True)
class Runtime:
    """What runs a graph: ``name`` (onnxruntime / openvino) and, for OpenVINO, its inference precision."""

    name: str = ONNXRUNTIME
    precision: str = "fp32"

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "precision": self.precision}


BF16 = Runtime(OPENVINO, "bf16")


def export_runtime(report: Mapping[str, Any]) -> Runtime:
    """The runtime an export report names (onnxruntime when it names none)."""
    raw = report.get(RUNTIME_KEY) or {}
    runtime = Runtime(str(raw.get("name", ONNXRUNTIME)), str(raw.get("precision", report.get("precision", "fp32"))))
    if runtime.name not in (ONNXRUNTIME, OPENVINO):
        raise BertopsError(
            f"the export names runtime {runtime.name!r}, which this bertops does not know "
            f"({ONNXRUNTIME}, {OPENVINO}); upgrade bertops or re-export the model"
        )
    return runtime


# --- native bf16 on this CPU --------------------------------------------------------------------------


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags of the first CPU in ``/proc/cpuinfo`` text (read from the file when None)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_name() -> str:
    """The CPU's model name, for run logs and benchmark reports (figures are named with their CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def cpu_description() -> str:
    """:func:`cpu_name` with the wide-vector / matrix flags that decide bf16 and int8 speed (how benchmarks name their CPU)."""
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512f", "avx512_bf16", "avx512_vnni", "amx")))
    return f"{cpu_name()} ({', '.join(flags)})" if flags else cpu_name()


def bf16_unsupported(flags: Iterable[str]) -> str | None:
    """``None`` when ``flags`` include native bf16 (AVX512-BF16 or AMX-BF16); otherwise why bf16 is refused.

    Without them OpenVINO would emulate bf16 (or silently run fp32): slower than fp32, never faster.
    """
    flags = set(flags)
    if flags & set(NATIVE_BF16_FLAGS):
        return None
    return (
        "this CPU has no native bf16 (neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo), so bf16 would "
        "be slower than fp32; export with --precision int8 (or fp32) instead"
    )


def check_native_bf16(flags: Iterable[str] | None = None) -> None:
    """Raise the one-line :class:`BertopsError` of :func:`bf16_unsupported` unless this CPU has native bf16."""
    reason = bf16_unsupported(cpu_flags() if flags is None else flags)
    if reason:
        raise BertopsError(reason)


# --- OpenVINO -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Port:
    name: str  # onnxruntime's NodeArg has .name; that is all bertops reads from it


def openvino_core():
    try:
        import openvino as ov
    except ImportError:
        raise BertopsError("this export runs on OpenVINO, which is not installed; pip install openvino") from None
    return ov.Core()


class OpenVINOSession:
    """A compiled OpenVINO CPU model behind onnxruntime's ``run(names, feeds) -> [arrays]`` interface.

    ``precision`` is OpenVINO's ``INFERENCE_PRECISION_HINT`` (``bf16`` or ``f32``); one stream on
    ``threads`` cores, tuned for latency like :func:`bertops.infer.ort_session`. Dynamic batch and
    sequence axes: each new input shape costs one shape-specialisation on its first call (cached after).
    Safe to call from several threads (one infer request per thread).
    """

    def __init__(self, onnx_path: str | Path, precision: str = "bf16", threads: int = 1):
        core = openvino_core()
        hint = {"bf16": "bf16", "fp32": "f32", "f32": "f32"}.get(precision)
        if hint is None:
            raise BertopsError(f"OpenVINO precision {precision!r} is not supported here; use bf16 or fp32")
        self.path, self.precision = Path(onnx_path), precision
        try:
            model = core.read_model(str(onnx_path))
            self.compiled = core.compile_model(model, "CPU", {
                "INFERENCE_PRECISION_HINT": hint,
                "INFERENCE_NUM_THREADS": int(threads),
                "NUM_STREAMS": 1,
                "PERFORMANCE_HINT": "LATENCY",
            })
        except Exception as exc:  # OpenVINO raises RuntimeError with multi-line C++ context
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BertopsError(
                f"OpenVINO cannot load {onnx_path}: {first[:300]}; re-export it with `bertops export onnx`"
            ) from None
        self._inputs = [_Port(p.get_any_name()) for p in self.compiled.inputs]
        self._outputs = [_Port(p.get_any_name()) for p in self.compiled.outputs]
        self._local = threading.local()

    def get_inputs(self) -> list[_Port]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Port]:
        return list(self._outputs)

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray], run_options=None) -> list[np.ndarray]:
        """Outputs ``output_names`` (all when None) for ``feeds``, as fp32 arrays the caller owns."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({name: np.ascontiguousarray(array) for name, array in feeds.items()})
        names = [p.name for p in self._outputs] if output_names is None else list(output_names)
        return [np.array(request.get_tensor(name).data, copy=True) for name in names]
