"""Serving benchmark: Triton's perf_analyzer over concurrency, beside in-process bertops.infer.

For each task it builds a repository from an export (real all-MiniLM-L6-v2 embeddings by default,
plus tiny heads with --tasks), starts the real tritonserver on loopback, and sweeps
perf_analyzer (gRPC, one text per request, the bundled real sentences of mixed lengths cycled as
input data) over --concurrency. In the same run it measures bertops.infer in-process throughput
on the same texts (batches of 32, length-grouped), so the serving overhead shows as a ratio.

    python bench/serving.py --out bench/results/serving.json
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bertops.checkpoint import resolve_model_dir, save_model
from bertops.config import load_config, packaged_configs
from bertops.data.corpus import bundled_sentences as sentences
from bertops.export import export_onnx
from bertops.infer import load_predictor
from bertops.tasks import EMBEDDINGS, get_task
from bertops.triton.builder import build_repository
from bertops.triton.server import TritonServer
from bertops.triton.wheel import find_perf_analyzer, perf_analyzer_env

ROOT = Path(__file__).resolve().parents[1]
NER = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


def make_export(task: str, work: Path) -> Path:
    out = work / f"export-{task}"
    if task == EMBEDDINGS.name:
        export_onnx(resolve_model_dir("all-MiniLM-L6-v2"), task, out)
        return out
    tiny = next(p for p in packaged_configs() if p.name == "tiny.yaml")  # the tiny model's one home
    extra = {"num_labels": 5, "id2label": NER} if get_task(task).token_level else {"num_labels": 3}
    cfg = dataclasses.replace(load_config(tiny).model, **extra)
    ckpt = save_model(get_task(task).build_model(cfg), work / f"ckpt-{task}",
                      tokenizer_dir=resolve_model_dir("all-MiniLM-L6-v2"))
    export_onnx(ckpt, task, out)
    return out


def in_process_throughput(export_dir: Path, texts: list[str], seconds: float = 8.0) -> float:
    """Texts per second through bertops.infer, batches of 32 (the served max batch)."""
    pred = load_predictor(export_dir)
    pred.predict(texts[:32])
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        lo = (done // 32 * 32) % len(texts)
        pred.predict(texts[lo : lo + 32], batch_size=32)
        done += 32
    return done / (time.perf_counter() - t0)


def perf_sweep(pa: Path, env: dict, url: str, model: str, texts: list[str], concurrency: list[int], work: Path,
               per_request: int = 1) -> list[dict]:
    data = work / f"{model}-input.json"
    data.write_text(json.dumps({"data": [{"TEXT": {"content": [t], "shape": [1]}} for t in texts]}))
    rows = []
    for c in concurrency:
        csv_file = work / f"{model}-c{c}-b{per_request}.csv"
        cmd = [str(pa), "-m", model, "-u", url, "-i", "grpc", "-b", str(per_request), "--input-data", str(data),
               "--concurrency-range", f"{c}:{c}", "--measurement-interval", "4000", "--stability-percentage", "25",
               "--max-trials", "6", "-f", str(csv_file), "--percentile", "50"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"perf_analyzer failed for {model} at concurrency {c}")
        rec = next(csv.DictReader(csv_file.open()))
        p99 = float(rec.get("p99 latency", 0)) / 1e3
        row = {"concurrency": c, "texts_per_request": per_request, "infer_per_s": float(rec["Inferences/Second"]),
               "p50_ms": float(rec.get("p50 latency", 0)) / 1e3, "p99_ms": p99}
        print(f"  {model:28s} c={c:3d} b={per_request:2d} {row['infer_per_s']:8.1f} texts/s  p50 {row['p50_ms']:7.2f} ms  p99 {p99:7.2f} ms", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="embeddings,sequence-classification,token-classification,fill-mask")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--queue-delay-us", type=int, default=200, help="dynamic batcher max queue delay")
    ap.add_argument("--texts-per-request", default="1", help="comma list; perf_analyzer -b (texts in one request)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/serving.json")
    args = ap.parse_args()
    tasks = args.tasks.split(",")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    texts = sentences()
    work = Path(tempfile.mkdtemp(prefix="bertops-serving-"))
    repo = work / "repo"
    exports = {t: make_export(t, work) for t in tasks}
    names = {t: t.replace("-", "_") for t in tasks}
    for t in tasks:
        build_repository(exports[t], names[t], repo, max_batch_size=32, preferred_batch_sizes=(8, 16, 32),
                         max_queue_delay_us=args.queue_delay_us)
    pa, env = find_perf_analyzer(), perf_analyzer_env()
    results = {}
    with TritonServer(repo) as server:
        for t in tasks:
            print(f"{t}:", flush=True)
            sweep = [row for b in args.texts_per_request.split(",")
                     for row in perf_sweep(pa, env, server.grpc_url, names[t], texts, concurrency, work, int(b))]
            results[t] = {"served": sweep}
    for t in tasks:  # in-process after the server is gone, so neither competes for the 2 cores
        local = in_process_throughput(exports[t], texts)
        best = max(results[t]["served"], key=lambda r: r["infer_per_s"])
        results[t].update(in_process_per_s=round(local, 1), best_concurrency=best["concurrency"],
                          served_over_in_process=round(best["infer_per_s"] / local, 2))
        results[t]["best_texts_per_request"] = best["texts_per_request"]
        print(f"{t}: in-process {local:.1f}/s, best served {best['infer_per_s']:.1f}/s at c={best['concurrency']} "
              f"b={best['texts_per_request']} "
              f"-> {best['infer_per_s'] / local:.2f}x", flush=True)
    out = {"machine": {"cpus": len(os.sched_getaffinity(0))}, "texts": "bundled real sentences (256, mixed lengths), cycled",
           "protocol": "grpc", "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
