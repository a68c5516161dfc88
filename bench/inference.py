"""In-process inference benchmark: one run, same real inputs, every path side by side.

Paths (all fp32 on the CPU unless --providers says otherwise):
  hf-eager      transformers BertModel, eager attention, + mean pooling (the baseline)
  hf-sdpa       transformers BertModel, SDPA attention
  ort-plain     torch.onnx export of the HF model, run in onnxruntime as exported
  ort-optimized the same file after onnxruntime.transformers.optimizer (fused BERT ops)
  bertops       `bertops export onnx` + `bertops.infer` (fused graph + length grouping)
  bertops-padded  the same export with one padded run per batch (shows what grouping buys); on CUDA,
                where one padded run per batch is the default, bertops-grouped instead
  bertops-int8  `bertops export onnx --precision int8` (dynamic per-channel int8, accuracy-gated) + `bertops.infer`
  bertops-bf16  `--precision bf16` (OpenVINO, gated) where the CPU has native bf16 (skipped with --no-int8 too)

With --providers CUDAExecutionProvider,CPUExecutionProvider (onnxruntime-gpu and a CUDA torch) every
path runs on the GPU instead: the HF rows on torch's CUDA device (their pooled answer copied back to
the host, as onnxruntime's are), plus hf-sdpa-fp16 (the HF model in fp16, the GPU baseline) and
bertops-fp16 (`--precision fp16`, its parity gate run on the CUDA provider); the int8 and bf16 rows are
CPU kernels and are left out. The floors then use the GPU's measured fp32 and fp16 matmul rates.

Workloads: latency at batch 1 x 128 tokens (median of --reps runs), and throughput at batch 32 of
real sentences of variable length (the bundled sentences, 8 batches, padded to each batch's
longest for the padded paths; --batch-size 256 --batches 1 gives one batch of all of them). Every path starts from text, so tokenization is included.
Ratios are against hf-eager measured in the same run. Also prints the GEMM floor: the time the
real (unpadded) tokens' FLOPs would take at this machine's measured fp32 matmul rate; the int8 row is
also given as a ratio to bertops fp32 and to that fp32 floor, with the int8 export's accuracy-gate figures.

    python bench/inference.py --out bench/results/inference.json
"""

from __future__ import annotations

import argparse
import os
import warnings
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bertops.checkpoint import resolve_model_dir
from bertops.data.corpus import bundled_sentences as sentences
from bertops.numerics import median_ms
from bertops.runtimes import cpu_description

ROOT = Path(__file__).resolve().parents[1]


def gemm_gflops() -> float:
    """Best measured fp32 matmul rate of this machine (GFLOP/s): torch's BLAS and onnxruntime's
    MLAS on a 1024^3 product, whichever is faster."""
    import onnx
    from onnx import TensorProto, helper

    from bertops.infer import ort_session

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best_ms = median_ms(lambda: torch.mm(a, b), runs=20, warmup=3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1024, 1024]) for n in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1024, 1024])],
    )
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), f"{tmp}/mm.onnx")
        sess = ort_session(f"{tmp}/mm.onnx")
        feeds = {"a": a.numpy(), "b": b.numpy()}
        best_ms = min(best_ms, median_ms(lambda: sess.run(None, feeds), runs=20, warmup=3))
    return 2 * 1024**3 / (best_ms / 1e3) / 1e9


def gemm_gflops_cuda(dtype) -> float:
    """Measured matmul rate of the CUDA device (GFLOP/s) at ``dtype`` on a 8192^3 product."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=dtype) for _ in range(2))
    ms = median_ms(lambda: (torch.mm(a, b), torch.cuda.synchronize()), runs=10, warmup=3)
    return 2 * 8192**3 / (ms / 1e3) / 1e9


def bert_flops(n_tokens_per_row: list[int], layers: int, hidden: int, inter: int) -> float:
    """Matmul FLOPs of the encoder on these rows with no padding (attention scores included)."""
    total = 0.0
    for t in n_tokens_per_row:
        dense = 2 * t * (4 * hidden * hidden + 2 * hidden * inter)  # QKV+out, FFN in+out
        attn = 2 * 2 * t * t * hidden  # QK^T and PV
        total += layers * (dense + attn)
    return total


warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--cycles", type=int, default=4, help="rotations through all paths")
    ap.add_argument("--block", type=int, default=10, help="timed b1 calls per path per cycle")
    ap.add_argument("--batches", type=int, default=8, help="batches of --batch-size real sentences")
    ap.add_argument("--batch-size", type=int, default=32, help="sentences per batch (the bundled 256 at most in all)")
    ap.add_argument("--providers", default="CPUExecutionProvider")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 and bf16 exports and their rows")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/inference.json")
    args = ap.parse_args()

    import onnxruntime as ort
    import transformers
    from onnxruntime.transformers import optimizer

    from bertops.export import export_onnx
    from bertops.infer import load_predictor, ort_session

    torch.set_grad_enabled(False)
    model_dir = resolve_model_dir(args.model)
    providers = args.providers.split(",")
    cuda = providers[0] == "CUDAExecutionProvider"
    device = "cuda" if cuda else "cpu"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--providers CUDAExecutionProvider needs a CUDA build of torch and a GPU for the HF rows")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    texts = sentences()
    # A real text of exactly 128 tokens ([CLS] + 126 + [SEP]): the joined sentences cut after the
    # 126th token, so no path pays for tokenizing text it then throws away.
    joined = " ".join(texts)
    offsets = hf_tok(joined, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    long_text = joined[: offsets[125][1]]
    bs = args.batch_size
    batches = [texts[i * bs : (i + 1) * bs] for i in range(min(args.batches, len(texts) // bs))]
    bk = f"b{bs}_var"  # result keys: b32_var_ms, ...

    def hf_inputs(batch, max_length=512):
        return hf_tok(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)

    b1 = hf_inputs([long_text], max_length=128)
    assert b1["input_ids"].shape == (1, 128)
    lengths = [int(hf_inputs(b)["attention_mask"].sum(1).max()) for b in batches]
    real_tokens = [hf_inputs(b)["attention_mask"].sum(1).tolist() for b in batches]
    padded = sum(bs * L for L in lengths)
    real = sum(sum(r) for r in real_tokens)

    work = Path(tempfile.mkdtemp(prefix="bertops-bench-"))
    paths: dict[str, tuple] = {}

    def record(name, b1_fn, batch_fn):
        paths[name] = (b1_fn, batch_fn)

    def mean_pool(hidden, mask):
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)

    hf_rows = [("hf-eager", "eager", torch.float32), ("hf-sdpa", "sdpa", torch.float32)]
    if cuda:
        hf_rows.append(("hf-sdpa-fp16", "sdpa", torch.float16))
    for row, impl, dtype in hf_rows:
        hf = transformers.BertModel.from_pretrained(model_dir, attn_implementation=impl, dtype=torch.float32)
        hf = hf.to(device=device, dtype=dtype).eval()

        def run_hf(batch, hf=hf, max_length=512):
            enc = hf_inputs(batch, max_length)
            return mean_pool(hf(**enc).last_hidden_state, enc["attention_mask"]).float().cpu()

        record(row, lambda f=run_hf: f([long_text], max_length=128), run_hf)

    # plain export of the HF model, and onnxruntime's optimizer on it
    hf = transformers.BertModel.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    b1 = {k: v.cpu() for k, v in b1.items()}
    plain = work / "plain.onnx"
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dyn = {n: {0: "batch", 1: "sequence"} for n in names}
    class Wrapped(torch.nn.Module):  # keyword call: HF's forward takes more positional arguments
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    torch.onnx.export(
        Wrapped(hf).eval(), (b1["input_ids"], b1["attention_mask"], b1["token_type_ids"]), str(plain), input_names=names,
        output_names=["last_hidden_state"], dynamic_axes={**dyn, "last_hidden_state": {0: "batch", 1: "sequence"}},
        opset_version=17, dynamo=False,
    )
    cfg = hf.config
    opt = optimizer.optimize_model(str(plain), model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size)
    opt.save_model_to_file(str(work / "optimized.onnx"))
    for name, path in (("ort-plain", plain), ("ort-optimized", work / "optimized.onnx")):
        sess = ort_session(path, providers)

        def run_ort(batch, sess=sess, max_length=512):
            enc = hf_tok(batch, padding=True, truncation=True, max_length=max_length, return_tensors="np")
            (hidden,) = sess.run(["last_hidden_state"], {n: enc[n].astype(np.int64) for n in names})
            m = enc["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * m).sum(1) / m.sum(1)
            return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)

        record(name, lambda f=run_ort: f([long_text], max_length=128), run_ort)

    export_dir = work / "bertops"
    report = export_onnx(model_dir, "embeddings", export_dir)
    # "bertops" is load_predictor's default (length groups on the CPU, one padded run per batch on CUDA);
    # the other row shows what that choice buys
    for name, grouped in (("bertops", None), ("bertops-grouped" if cuda else "bertops-padded", cuda)):
        pred = load_predictor(export_dir, providers=providers, group_by_length=grouped)
        pred128 = load_predictor(export_dir, providers=providers, max_length=128, group_by_length=grouped)
        record(name, lambda p=pred128: p.predict([long_text]), lambda b, p=pred: p.predict(b, batch_size=bs))
    fp16_report = None
    if cuda:  # fp16 is a GPU format: its parity gate runs on the CUDA provider
        fp16_dir = work / "bertops-fp16"
        fp16_report = export_onnx(model_dir, "embeddings", fp16_dir, precision="fp16")
        pred = load_predictor(fp16_dir, providers=providers)
        pred128 = load_predictor(fp16_dir, providers=providers, max_length=128)
        record("bertops-fp16", lambda p=pred128: p.predict([long_text]), lambda b, p=pred: p.predict(b, batch_size=bs))
    int8_report = None
    if not args.no_int8 and not cuda:  # int8 and bf16 are CPU kernels
        int8_dir = work / "bertops-int8"
        int8_report = export_onnx(model_dir, "embeddings", int8_dir, precision="int8")
        pred = load_predictor(int8_dir, providers=providers)
        pred128 = load_predictor(int8_dir, providers=providers, max_length=128)
        record("bertops-int8", lambda p=pred128: p.predict([long_text]), lambda b, p=pred: p.predict(b, batch_size=bs))
    from bertops.runtimes import bf16_unsupported, cpu_flags

    if not args.no_int8 and not cuda and bf16_unsupported(cpu_flags()) is None:  # bf16 where the CPU has it natively
        bf16_dir = work / "bertops-bf16"
        export_onnx(model_dir, "embeddings", bf16_dir, precision="bf16")
        pred, pred128 = load_predictor(bf16_dir), load_predictor(bf16_dir, max_length=128)
        record("bertops-bf16", lambda p=pred128: p.predict([long_text]), lambda b, p=pred: p.predict(b, batch_size=bs))

    # Timing in rotating blocks: every cycle runs a block of calls of every path in turn, so load
    # from other processes on a shared machine hits all paths alike, while each block is long
    # enough that one library's spinning worker threads (OpenMP, onnxruntime) do not slow the next
    # library's first calls. The figure per path is the median over all its timed calls.
    for b1_fn, batch_fn in paths.values():  # warm-up
        b1_fn(), batch_fn(batches[0])
    t1: dict[str, list[float]] = {n: [] for n in paths}
    t32: dict[str, list[float]] = {n: [] for n in paths}
    for cycle in range(args.cycles):
        for name, (b1_fn, batch_fn) in paths.items():
            time.sleep(0.2)  # let the previous library's threads go idle
            b1_fn(), batch_fn(batches[0])  # re-warm this library's threads (untimed)
            for _ in range(args.block):
                t0 = time.perf_counter()
                b1_fn()
                t1[name].append((time.perf_counter() - t0) * 1e3)
            for batch in batches:
                t0 = time.perf_counter()
                batch_fn(batch)
                t32[name].append((time.perf_counter() - t0) * 1e3)
    results: dict[str, dict] = {}
    for name in paths:
        ms1, ms32 = statistics.median(t1[name]), statistics.median(t32[name])
        results[name] = {"b1x128_ms": round(ms1, 3), f"{bk}_ms": round(ms32, 3), f"{bk}_seq_per_s": round(bs * 1e3 / ms32, 1)}
        print(f"{name:16s} b1x128 {ms1:8.2f} ms   b{bs} variable {ms32:8.2f} ms ({bs * 1e3 / ms32:7.1f} seq/s)", flush=True)

    gflops = gemm_gflops_cuda(torch.float32) if cuda else gemm_gflops()
    gflops16 = gemm_gflops_cuda(torch.float16) if cuda else None
    flops_real = bert_flops([t for r in real_tokens for t in r], cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size)
    floor_ms = flops_real / len(batches) / (gflops * 1e9) * 1e3
    flops_b1 = bert_flops([128], cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size)
    floor_b1 = flops_b1 / (gflops * 1e9) * 1e3
    base = results["hf-eager"]
    summary = {
        name: {
            **r,
            "speedup_b1x128_vs_hf_eager": round(base["b1x128_ms"] / r["b1x128_ms"], 2),
            f"speedup_{bk}_vs_hf_eager": round(base[f"{bk}_ms"] / r[f"{bk}_ms"], 2),
        }
        for name, r in results.items()
    }
    for name, r in summary.items():
        r["b1x128_vs_fp32_floor"] = round(r["b1x128_ms"] / floor_b1, 2)
        r[f"{bk}_vs_fp32_floor"] = round(r[f"{bk}_ms"] / floor_ms, 2)
        if gflops16:
            r["b1x128_vs_fp16_floor"] = round(r["b1x128_ms"] / (floor_b1 * gflops / gflops16), 2)
            r[f"{bk}_vs_fp16_floor"] = round(r[f"{bk}_ms"] / (floor_ms * gflops / gflops16), 2)
    if "hf-sdpa-fp16" in summary:  # the GPU baseline: HF in fp16 on the same card
        base16 = results["hf-sdpa-fp16"]
        for r in summary.values():
            r["speedup_b1x128_vs_hf_fp16"] = round(base16["b1x128_ms"] / r["b1x128_ms"], 2)
            r[f"speedup_{bk}_vs_hf_fp16"] = round(base16[f"{bk}_ms"] / r[f"{bk}_ms"], 2)
    for name in ("bertops-int8", "bertops-bf16", "bertops-fp16"):
        if name in summary:
            fp32, low = results["bertops"], summary[name]
            low["speedup_b1x128_vs_bertops_fp32"] = round(fp32["b1x128_ms"] / low["b1x128_ms"], 2)
            low[f"speedup_{bk}_vs_bertops_fp32"] = round(fp32[f"{bk}_ms"] / low[f"{bk}_ms"], 2)
    gpu = torch.cuda.get_device_name(0) if cuda else None
    out = {
        "machine": {"gpu": gpu, "cpu": cpu_description(), "cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
                    "providers": providers, "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "transformers": transformers.__version__},
        "model": str(args.model),
        "workload": {"b1": "1 x 128 tokens", f"b{bs}": f"{len(batches)} batches x {bs} real sentences",
                     "padding_share": round(1 - real / padded, 3), "cycles": args.cycles, "b1_calls_per_block": args.block,
                     "timing": "rotating blocks per path, median of all timed calls"},
        "gemm_gflops_fp32": round(gflops, 1),
        "gemm_gflops_fp16": round(gflops16, 1) if gflops16 else None,
        "floor_ms": {"b1x128": round(floor_b1, 3), f"{bk}_real_tokens": round(floor_ms, 3)},
        "fused": report.get("fused"),
        "results": summary,
    }
    if fp16_report is not None:
        out["fp16"] = {"parity": fp16_report.get("parity", {}).get("fp16_parity")}
    if int8_report is not None:
        out["int8"] = {"accuracy_gate": int8_report["accuracy_gate"],
                       "fp32_parts": int8_report["int8"]["fp32_parts"], "weights": int8_report["int8"]["weights"]}
    print(json.dumps(out, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
