"""bf16 exports: the native-bf16 check (a pure function of /proc/cpuinfo flags), the runtime an export
names, and a real all-MiniLM-L6-v2 bf16 export that passes the accuracy gate and answers like fp32 on
text the gate never saw. The export test needs a CPU with native bf16 (AVX512-BF16 or AMX)."""

from __future__ import annotations

import numpy as np
import pytest

from bertops.errors import BertopsError
from bertops.runtimes import BF16, ONNXRUNTIME, Runtime, bf16_unsupported, check_native_bf16, cpu_flags, export_runtime

SAPPHIRE_RAPIDS = "fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
COOPER_LAKE = "fpu sse sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16"
CASCADE_LAKE = "fpu sse sse2 avx avx2 avx512f avx512bw avx512_vnni"
ZEN3 = "fpu sse sse2 avx avx2 fma bmi2 sha_ni"
NATIVE = bf16_unsupported(cpu_flags()) is None


@pytest.mark.parametrize("flags, native", [
    (SAPPHIRE_RAPIDS, True), (COOPER_LAKE, True), ("amx_bf16 amx_tile", True), (CASCADE_LAKE, False), (ZEN3, False), ("", False),
])
def test_native_bf16_is_read_from_cpu_flags(flags, native):
    reason = bf16_unsupported(flags.split())
    assert (reason is None) == native
    if not native:
        assert "avx512_bf16" in reason and "--precision int8" in reason and "\n" not in reason
        with pytest.raises(BertopsError, match="no native bf16"):
            check_native_bf16(flags.split())
    else:
        check_native_bf16(flags.split())


def test_cpu_flags_parses_cpuinfo_text():
    text = (
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
        f"flags\t\t: {SAPPHIRE_RAPIDS}\nbugs\t\t: spectre_v1\n\nprocessor\t: 1\nflags\t\t: {ZEN3}\n"
    )
    assert cpu_flags(text) == set(SAPPHIRE_RAPIDS.split())  # the first CPU's line
    assert cpu_flags("processor\t: 0\nFeatures\t: fp asimd bf16 sve\n") == {"fp", "asimd", "bf16", "sve"}
    assert bf16_unsupported(cpu_flags("Features\t: fp asimd bf16\n")) is not None  # arm64: not an OpenVINO AMX path
    assert cpu_flags("no flags here") == set()


def test_bf16_export_is_refused_before_any_work_without_native_bf16(minilm_dir, tmp_path, monkeypatch):
    """The export path reads this CPU's flags; on a CPU without native bf16 it stops at once, writing nothing."""
    import bertops.runtimes
    from bertops.export import export_onnx

    monkeypatch.setattr(bertops.runtimes, "cpu_flags", lambda cpuinfo=None: set(CASCADE_LAKE.split()))
    with pytest.raises(BertopsError, match="no native bf16.*--precision int8"):
        export_onnx(minilm_dir, "embeddings", tmp_path / "out", precision="bf16")
    assert not (tmp_path / "out").exists()


def test_export_runtime_from_report():
    assert export_runtime({"precision": "fp32"}) == Runtime(ONNXRUNTIME, "fp32")  # exports made before runtimes
    assert export_runtime({"precision": "int8"}) == Runtime(ONNXRUNTIME, "int8")
    assert export_runtime({"precision": "bf16", "runtime": BF16.as_dict()}) == BF16
    with pytest.raises(BertopsError, match="runtime 'tensorrt'"):
        export_runtime({"runtime": {"name": "tensorrt"}})


@pytest.fixture(scope="module")
def bf16_export(tmp_path_factory, minilm_dir):
    from bertops.export import export_onnx

    out = tmp_path_factory.mktemp("bf16")
    return out, export_onnx(minilm_dir, "embeddings", out, precision="bf16")


@pytest.mark.skipif(not NATIVE, reason="this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
def test_bf16_export_passes_the_gate_and_runs_on_openvino(bf16_export, exported, sentences):
    from bertops.infer import load_predictor, open_session
    from bertops.precision import GATE_ROWS
    from bertops.runtimes import OpenVINOSession

    out, report = bf16_export
    assert report["precision"] == "bf16" and report["runtime"] == BF16.as_dict()
    gate = report["accuracy_gate"]
    assert gate["passed"] and gate["figures"]["mean_cosine"] >= 0.99 and gate["figures"]["min_cosine"] >= 0.97
    assert set(report["bf16"]["cpu_bf16_flags"]) & {"avx512_bf16", "amx_bf16"}

    bf16 = load_predictor(out)
    assert isinstance(bf16.session, OpenVINOSession) and bf16.session.precision == "bf16"
    fp32 = load_predictor(exported("embeddings", real=True))
    held_out = sentences[GATE_ROWS:]  # never seen by the gate
    a = np.array([r["embedding"] for r in fp32.predict(held_out, batch_size=32)])
    b = np.array([r["embedding"] for r in bf16.predict(held_out, batch_size=32)])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, (cos.mean(), cos.min())
    assert not np.allclose(a, b, atol=1e-5)  # it really ran in bf16, not fp32

    # the session interface the Triton models use
    session = open_session(out)
    assert [p.name for p in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [p.name for p in session.get_outputs()] == ["last_hidden_state", "sentence_embedding"]
    with pytest.raises(BertopsError, match="runs on OpenVINO's CPU plugin"):
        open_session(out, providers=["CUDAExecutionProvider"])


@pytest.mark.slow
@pytest.mark.skipif(not NATIVE, reason="this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
def test_triton_serves_a_bf16_export_on_openvino(bf16_export, sentences, tmp_path):
    """`bertops triton build` + a real tritonserver: the cpu flavor runs the bf16 export on OpenVINO as
    bertops.infer does in-process; the gpu and cuda flavors (onnxruntime on a GPU) refuse it in one line."""
    from bertops.client import Client
    from bertops.infer import load_predictor
    from bertops.triton.builder import build_repository
    from bertops.triton.server import TritonServer

    out, _ = bf16_export
    repo = tmp_path / "repo"
    for flavor in ("gpu", "cuda"):
        with pytest.raises(BertopsError, match="runs on OpenVINO's CPU plugin; build it with"):
            build_repository(out, "minilm", repo, flavor=flavor)
    build_repository(out, "minilm", repo, max_batch_size=8, preferred_batch_sizes=(4, 8))
    texts = sentences[-24:]
    local = load_predictor(out).predict(texts)
    server = TritonServer(repo, log_file=tmp_path / "server.log")
    server.start(timeout=240)
    try:
        with Client(server.http_url) as client:
            served = client.predict("minilm", texts)
    finally:
        server.stop()
    a = np.array([r["embedding"] for r in local])
    b = np.array([r["embedding"] for r in served])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.9999, cos.min()  # same runtime and graph, batched differently
