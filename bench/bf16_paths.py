"""bf16 on the CPU: which runtime runs the bertops export fastest, and at what accuracy.

Every path serves the same fused ``model.onnx`` that ``bertops export onnx`` writes (except the
references), through the same :class:`bertops.infer.Predictor` (tokenization, length grouping,
mean pooling included), so only the engine differs:

  ort-fp32          bertops today: onnxruntime CPU, fp32 (the baseline of every ratio)
  ort-int8          `bertops export onnx --precision int8` (onnxruntime dynamic int8, gated)
  ort-fastmath      onnxruntime with its bf16 GEMM option (mlas.enable_gemm_fastmath_arm64_bfloat16)
  ov-fp32           OpenVINO CPU plugin reading the same file, INFERENCE_PRECISION_HINT=f32
  ov-bf16           OpenVINO on the same file, INFERENCE_PRECISION_HINT=bf16 (AMX / AVX512-BF16)
  ov-bf16-plain     OpenVINO bf16 on the unfused TorchScript graph (before onnxruntime's fusion)
  torch-fp32        the bertops PyTorch model, sdpa attention (reference)
  torch-bf16        the same model cast to bf16 (oneDNN on AMX; reference)

Workloads: b1x128 (one real text of exactly 128 tokens, median of calls) and b32 (8 batches of 32
real bundled sentences of variable length, length-grouped as bertops.infer does). Timing rotates
blocks of calls across paths (``--cycles``) so load from other processes hits all alike; the figure
is the median over all timed calls. ``first_pass_ms`` is each path's first pass over the 8 batches
(new input shapes: OpenVINO specialises per shape on first sight). Accuracy: sentence embeddings of
all 256 bundled sentences against ort-fp32 (cosine mean / min, nearest-neighbour agreement).

    python bench/bf16_paths.py --out bench/results/bf16_paths.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bertops.checkpoint import load_model, resolve_model_dir
from bertops.data.corpus import bundled_sentences as sentences
from bertops.runtimes import cpu_description

ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore")


class TorchSession:
    """The bertops PyTorch model behind the session interface Predictor drives (fp32 out)."""

    def __init__(self, model, dtype):
        self.model = model.to(dtype).eval()

    def run(self, names, feeds):
        with torch.inference_mode():
            out = self.model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return [out[n].float().numpy() for n in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--cycles", type=int, default=5, help="rotations through all paths")
    ap.add_argument("--block", type=int, default=10, help="timed b1 calls per path per cycle")
    ap.add_argument("--paths", default="", help="comma-separated subset of the paths (default: all)")
    ap.add_argument("--threads", type=int, default=0, help="threads per engine (default: physical cores)")
    ap.add_argument("--lock", type=Path, help="file to hold an exclusive flock on while timing (shared machines)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/bf16_paths.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bertops-bf16-") as tmp:  # the exports (~300 MB) go with it
        measure(args, Path(tmp))


def measure(args: argparse.Namespace, work: Path) -> None:
    import onnxruntime as ort
    import openvino as ov

    from bertops.artifacts import read_export
    from bertops.export import _export_torchscript, export_onnx
    from bertops.infer import Predictor, ort_session, physical_cores
    from bertops.runtimes import OpenVINOSession, bf16_unsupported, cpu_flags
    from bertops.tasks import EMBEDDINGS
    from bertops.tokenizer import load_tokenizer

    reason = bf16_unsupported(cpu_flags())
    if reason:
        raise SystemExit(f"bench/bf16_paths.py: {reason}")
    torch.set_grad_enabled(False)
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    model_dir = resolve_model_dir(args.model)
    export_dir = work / "export"
    report = export_onnx(model_dir, EMBEDDINGS.name, export_dir)
    onnx_path = export_dir / "model.onnx"
    chosen = [p for p in args.paths.split(",") if p] or None
    if chosen is None or "ort-int8" in chosen:
        export_onnx(model_dir, EMBEDDINGS.name, work / "int8", precision="int8")
    tok = load_tokenizer(export_dir)
    info = read_export(export_dir).info

    texts = sentences()
    joined = " ".join(texts)
    cut = tok.encode(joined, add_special_tokens=False).offsets[125][1]
    long_text = joined[:cut]  # exactly 126 word pieces + [CLS] + [SEP] = 128 tokens
    batches = [texts[i * 32 : (i + 1) * 32] for i in range(len(texts) // 32)]

    # the unfused graph: TorchScript export of the same model, before onnxruntime's fusion
    model, cfg = load_model(model_dir, EMBEDDINGS.name, attn_implementation="eager")
    plain = work / "plain.onnx"
    _export_torchscript(model, cfg, EMBEDDINGS, tok, 17, 128, plain, work / "fused.onnx")

    def ort_fastmath():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("mlas.enable_gemm_fastmath_arm64_bfloat16", "1")
        return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])

    def torch_model(dtype):
        m, _ = load_model(model_dir, EMBEDDINGS.name, attn_implementation="sdpa")
        return TorchSession(m, dtype)

    makers = {
        "ort-fp32": lambda: ort_session(onnx_path, threads=threads),
        "ort-int8": lambda: ort_session(work / "int8" / "model.onnx", threads=threads),
        "ort-fastmath": ort_fastmath,
        "ov-fp32": lambda: OpenVINOSession(onnx_path, "fp32", threads),
        "ov-bf16": lambda: OpenVINOSession(onnx_path, "bf16", threads),
        "ov-bf16-plain": lambda: OpenVINOSession(plain, "bf16", threads),
        "torch-fp32": lambda: torch_model(torch.float32),
        "torch-bf16": lambda: torch_model(torch.bfloat16),
    }
    chosen = chosen or list(makers)
    if "ort-fp32" not in chosen:
        chosen.insert(0, "ort-fp32")
    paths: dict[str, dict] = {}
    lock = contextlib.ExitStack()
    if args.lock:  # exports above are not timed; everything below is, until the lock is released
        import fcntl

        fcntl.flock(lock.enter_context(open(args.lock, "a")), fcntl.LOCK_EX)  # noqa: SIM115
    for name in chosen:
        t0 = time.perf_counter()
        session = makers[name]()
        load_s = time.perf_counter() - t0
        full = Predictor(session, tok, EMBEDDINGS, info, 512)
        short = Predictor(session, tok, EMBEDDINGS, info, 128)
        t0 = time.perf_counter()
        for batch in batches:
            full.predict(batch, batch_size=32)
        first = (time.perf_counter() - t0) * 1e3 / len(batches)
        paths[name] = {"full": full, "short": short, "load_s": load_s, "first_pass_ms": first}
        print(f"{name:14s} loaded in {load_s:5.2f} s, first pass {first:7.2f} ms/batch", flush=True)

    # accuracy against ort-fp32 on all 256 sentences
    def embed(p):
        return np.array([a["embedding"] for a in p.predict(texts, batch_size=32)], dtype=np.float32)

    ref = embed(paths["ort-fp32"]["full"])
    ref_nn = np.argsort(-(ref @ ref.T) + 2 * np.eye(len(ref)), axis=1)[:, 0]
    accuracy = {}
    for name, p in paths.items():
        got = embed(p["full"])
        cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
        nn = np.argsort(-(got @ got.T) + 2 * np.eye(len(got)), axis=1)[:, 0]
        accuracy[name] = {
            "cosine_mean": round(float(cos.mean()), 6),
            "cosine_min": round(float(cos.min()), 6),
            "max_abs": float(np.abs(ref - got).max()),
            "nearest_neighbour_agreement": round(float((nn == ref_nn).mean()), 4),
        }

    # timing: rotating blocks
    t1: dict[str, list[float]] = {n: [] for n in paths}
    t32: dict[str, list[float]] = {n: [] for n in paths}
    for _ in range(args.cycles):
        for name, p in paths.items():
            time.sleep(0.2)  # let the previous library's worker threads go idle
            p["short"].predict([long_text]), p["full"].predict(batches[0], batch_size=32)  # re-warm, untimed
            for _ in range(args.block):
                t0 = time.perf_counter()
                p["short"].predict([long_text])
                t1[name].append((time.perf_counter() - t0) * 1e3)
            for batch in batches:
                t0 = time.perf_counter()
                p["full"].predict(batch, batch_size=32)
                t32[name].append((time.perf_counter() - t0) * 1e3)

    lock.close()
    results = {}
    b1_base, b32_base = statistics.median(t1["ort-fp32"]), statistics.median(t32["ort-fp32"])
    for name, p in paths.items():
        ms1, ms32 = statistics.median(t1[name]), statistics.median(t32[name])
        results[name] = {
            "b1x128_ms": round(ms1, 3),
            "b32_var_ms": round(ms32, 3),
            "b32_var_seq_per_s": round(32e3 / ms32, 1),
            "speedup_b1x128_vs_ort_fp32": round(b1_base / ms1, 2),
            "speedup_b32_var_vs_ort_fp32": round(b32_base / ms32, 2),
            "first_pass_ms_per_batch": round(p["first_pass_ms"], 2),
            "load_s": round(p["load_s"], 2),
            **accuracy[name],
        }
        r = results[name]
        print(
            f"{name:14s} b1x128 {ms1:7.2f} ms ({r['speedup_b1x128_vs_ort_fp32']:4.2f}x)  b32 {ms32:7.2f} ms "
            f"({r['speedup_b32_var_vs_ort_fp32']:4.2f}x)  cos mean {r['cosine_mean']:.5f} min {r['cosine_min']:.5f} "
            f"nn {r['nearest_neighbour_agreement']:.3f}",
            flush=True,
        )
    out = {
        "machine": {"cpu": cpu_description(), "cores": len(os.sched_getaffinity(0)), "threads": threads,
                    "native_bf16": bf16_unsupported(cpu_flags()) is None, "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "openvino": ov.__version__},
        "model": str(args.model),
        "fused": report.get("fused"),
        "workload": {"b1": "1 x 128 tokens of real text", "b32": f"{len(batches)} batches x 32 real sentences, "
                     "length-grouped", "cycles": args.cycles, "b1_calls_per_block": args.block,
                     "accuracy": f"{len(texts)} sentences' embeddings vs ort-fp32",
                     "timing": "rotating blocks per path, median of all timed calls"},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
