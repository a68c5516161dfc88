"""Serving benchmark: Triton's perf_analyzer over concurrency, beside in-process bertops.infer.

For each task (real all-MiniLM-L6-v2 embeddings, and tiny heads) and precision it builds one
repository per pipeline layout (``single``: one python model; ``ensemble``: tokenizer -> postprocess
-> encoder), starts the real tritonserver on loopback, and sweeps perf_analyzer (gRPC, one text per
request, the bundled real sentences of mixed lengths cycled as input data) over --concurrency. In the
same run, right before each model's sweep (the server idle), it measures bertops.infer in-process
throughput on the same texts (batches of 32, length-grouped; the faster of one thread per core and
one thread), so the serving overhead shows as a ratio.

Where the time goes: around every perf_analyzer run the server's statistics API (queue and compute
time of every model, executions, rows) and the ``single`` model's ``bertops_stage_seconds_total``
metric (decode, tokenize, encoder, postprocess, respond) are read, and their differences divided by
the requests served: microseconds of each hop per request.

    python bench/serving.py --out bench/results/serving.json
    python bench/serving.py --precisions fp32,int8 --work /tmp/serving --prepare-only   # exports first,
    python bench/serving.py --precisions fp32,int8 --work /tmp/serving                 # then only timing
    python bench/serving.py --flavor cuda --precisions fp32,fp16 --pipelines single    # encoder on the GPU

``--flavor cuda`` builds the repositories with the encoder on onnxruntime's CUDA provider inside the
python models (onnxruntime-gpu in this Python) and times the in-process side on the same provider.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from bertops.checkpoint import resolve_model_dir, save_model
from bertops.config import load_config, packaged_configs
from bertops.data.corpus import bundled_sentences as sentences
from bertops.errors import BertopsError
from bertops.export import export_onnx
from bertops.infer import load_predictor, physical_cores
from bertops.tasks import EMBEDDINGS, get_task
from bertops.triton.builder import PROVIDERS, build_repository
from bertops.triton.server import TritonServer
from bertops.triton.wheel import find_perf_analyzer, perf_analyzer_env

ROOT = Path(__file__).resolve().parents[1]
NER = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


def make_export(task: str, work: Path, precision: str = "fp32", model: str = "all-MiniLM-L6-v2") -> Path:
    """The export folder of ``task`` at ``precision`` in ``work`` (reused when a complete one is there):
    ``model``'s weights for embeddings, a random tiny head with its tokenizer for the others."""
    out = work / f"export-{task}-{precision}"
    if (out / "model.onnx").is_file():
        return out
    if task == EMBEDDINGS.name:
        export_onnx(resolve_model_dir(model), task, out, precision=precision)
        return out
    tiny = next(p for p in packaged_configs() if p.name == "tiny.yaml")  # the tiny model's one home
    extra = {"num_labels": 5, "id2label": NER} if get_task(task).token_level else {"num_labels": 3}
    cfg = dataclasses.replace(load_config(tiny).model, **extra)
    ckpt = save_model(get_task(task).build_model(cfg), work / f"ckpt-{task}",
                      tokenizer_dir=resolve_model_dir(model))
    export_onnx(ckpt, task, out, precision=precision)
    return out


def in_process_throughput(export_dir: Path, texts: list[str], seconds: float = 8.0, rounds: int = 3,
                          providers: list[str] | None = None) -> dict[int, float]:
    """Texts per second through bertops.infer, batches of 32 (the served max batch), per intra-op thread
    count: the default (one per physical core) and 1, alternated in ``rounds`` blocks, median per count.

    Both, because on cores shared with other jobs onnxruntime's spinning thread pool can fall far below
    one thread, while the served models run one thread per instance; the ratio uses the faster of the two.
    On the CUDA provider (``providers``) only the default count runs: the GPU does the work.
    """
    counts = [physical_cores()] if providers and providers[0] != "CPUExecutionProvider" else \
        sorted({physical_cores(), 1}, reverse=True)
    preds = {t: load_predictor(export_dir, threads=t, providers=providers) for t in counts}
    for pred in preds.values():
        pred.predict(texts[:32])
    rates: dict[int, list[float]] = {t: [] for t in preds}
    block = seconds / (rounds * len(preds))
    for _ in range(rounds):
        for threads, pred in preds.items():
            done, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < block:
                lo = (done // 32 * 32) % len(texts)
                pred.predict(texts[lo : lo + 32], batch_size=32)
                done += 32
            rates[threads].append(done / (time.perf_counter() - t0))
    return {t: float(np.median(r)) for t, r in rates.items()}


def _rounded(x):
    """An answer with its floats rounded to 3 places (batch composition moves the last digits)."""
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def served_agreement(server, model: str, export_dir: Path, texts: list[str], providers: list[str] | None) -> dict:
    """The served answers to ``texts`` (gRPC and HTTP, through bertops.client) against in-process
    bertops.infer on the same provider: embeddings by cosine, every other task's answer compared whole
    after rounding its scores (a speed figure is worth nothing if the answers differ)."""
    from bertops.client import Client

    expected = load_predictor(export_dir, providers=providers).predict(texts, batch_size=32)
    out = {}
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        with Client(url, protocol=protocol) as client:
            got = client.predict(model, texts)
        if "embedding" in expected[0]:
            a = np.asarray([g["embedding"] for g in got])
            b = np.asarray([e["embedding"] for e in expected])
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            out[protocol] = {"texts": len(texts), "min_cosine": round(float(cos.min()), 6)}
        else:
            same = sum(_rounded(g) == _rounded(e) for g, e in zip(got, expected))
            out[protocol] = {"texts": len(texts), "same_answers": same}
    return out


STAT_PARTS = ("queue", "compute_input", "compute_infer", "compute_output")
STAGE_LINE = re.compile(r'^bertops_stage_seconds_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)', re.MULTILINE)


def server_counters(server) -> dict:
    """Cumulative per-model statistics (ns, counts) and per-stage seconds of the single pipeline models."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        stats = client.get_inference_statistics()["model_stats"]
    finally:
        client.close()
    out = {}
    for m in stats:
        s = m["inference_stats"]
        row = {part: int(s[part]["ns"]) for part in STAT_PARTS}
        row.update(requests=int(s["success"]["count"]), success_ns=int(s["success"]["ns"]),
                   executions=int(m["execution_count"]), rows=int(m["inference_count"]))
        out[m["name"]] = row
    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    for match in STAGE_LINE.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        out.setdefault(labels["model"], {})[f"stage_{labels['stage']}"] = float(match["value"])
    return out


def hop_breakdown(before: dict, after: dict, entry: str, models: list[str]) -> dict:
    """Microseconds per request of ``entry`` spent in each model (queue, compute) and in each stage of a
    single pipeline model; rows per execution (how well the dynamic batcher batched)."""
    requests = after[entry]["requests"] - before.get(entry, {}).get("requests", 0)
    if requests <= 0:
        return {}
    out = {"requests": requests,
           "server_us": round((after[entry]["success_ns"] - before.get(entry, {}).get("success_ns", 0)) / requests / 1e3, 1)}
    for m in models:
        a, b = after.get(m, {}), before.get(m, {})
        if "executions" not in a:
            continue
        hop = {part: round((a[part] - b.get(part, 0)) / requests / 1e3, 1) for part in STAT_PARTS}
        executions = a["executions"] - b.get("executions", 0)
        hop["rows_per_execution"] = round((a["rows"] - b.get("rows", 0)) / max(executions, 1), 2)
        for key in a:
            if key.startswith("stage_"):
                hop[key] = round((a[key] - b.get(key, 0.0)) / requests * 1e6, 1)
        out[m] = hop
    return out


def perf_sweep(pa: Path, env: dict, server, model: str, texts: list[str], concurrency: list[int], work: Path,
               per_request: int = 1, models: list[str] = ()) -> list[dict]:
    data = work / f"{model}-input.json"
    data.write_text(json.dumps({"data": [{"TEXT": {"content": [t], "shape": [1]}} for t in texts]}))
    rows = []
    for c in concurrency:
        csv_file = work / f"{model}-c{c}-b{per_request}.csv"
        # On cores shared with other jobs a window can miss the stability bound: retry with longer, looser windows
        # (the row records which was used).
        for interval_ms, stability in ((4000, 25), (8000, 50), (8000, 100)):
            cmd = [str(pa), "-m", model, "-u", server.grpc_url, "-i", "grpc", "-b", str(per_request), "--input-data",
                   str(data), "--concurrency-range", f"{c}:{c}", "--measurement-interval", str(interval_ms),
                   "--stability-percentage", str(stability), "--max-trials", "6", "-f", str(csv_file), "--percentile", "50"]
            before = server_counters(server)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
            after = server_counters(server)
            if proc.returncode == 0:
                break
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"perf_analyzer failed for {model} at concurrency {c}")
        rec = next(csv.DictReader(csv_file.open()))
        p99 = float(rec.get("p99 latency", 0)) / 1e3
        row = {"concurrency": c, "texts_per_request": per_request, "infer_per_s": float(rec["Inferences/Second"]),
               "p50_ms": float(rec.get("p50 latency", 0)) / 1e3, "p99_ms": p99,
               "stability_percentage": stability, "hops_us": hop_breakdown(before, after, model, [model, *models])}
        print(f"  {model:28s} c={c:3d} b={per_request:2d} {row['infer_per_s']:8.1f} texts/s  p50 {row['p50_ms']:7.2f} ms  p99 {p99:7.2f} ms", flush=True)
        rows.append(row)
    return rows


def pipeline_models(name: str, pipeline: str) -> list[str]:
    """The helper models of ``name`` in the cpu flavor of a layout (whose statistics are read)."""
    return [f"{name}{suffix}" for suffix in ("_tokenizer", "_postprocess", "_encoder")] if pipeline == "ensemble" else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all-MiniLM-L6-v2", help="embeddings weights (a bundled name or a folder)")
    ap.add_argument("--tasks", default="embeddings,sequence-classification,token-classification,fill-mask")
    ap.add_argument("--pipelines", default="single,ensemble", help="comma list of serve.pipeline layouts to measure")
    ap.add_argument("--precisions", default="fp32", help="comma list; export precisions (fp32, int8; fp16 for cuda)")
    ap.add_argument("--flavor", default="cpu", choices=["cpu", "cuda"],
                    help="where the served encoder runs: onnxruntime's CPU or CUDA provider (serve.flavor)")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--queue-delay-us", type=int, default=200, help="dynamic batcher max queue delay")
    ap.add_argument("--texts-per-request", default="1", help="comma list; perf_analyzer -b (texts in one request)")
    ap.add_argument("--in-process-seconds", type=float, default=12.0, help="in-process timing per model and layout")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for exports and repositories; exports already there are reused (default: a new temp dir)")
    ap.add_argument("--prepare-only", action="store_true", help="write the exports into --work and stop (no timing)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/serving.json")
    args = ap.parse_args()
    tasks, pipelines, precisions = args.tasks.split(","), args.pipelines.split(","), args.precisions.split(",")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    texts = sentences()
    work = args.work or Path(tempfile.mkdtemp(prefix="bertops-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    exports, skipped = {}, {}
    for t in tasks:
        for p in precisions:
            try:
                exports[t, p] = make_export(t, work, p, args.model)
            except BertopsError as exc:  # e.g. a random tiny head that misses the int8 accuracy gate
                if p == "fp32":
                    raise
                skipped[f"{t} {p}"] = str(exc)
                print(f"skipping {t} {p}: {exc}", flush=True)
    if args.prepare_only:
        print(f"exports ready in {work}")
        return
    pa, env = find_perf_analyzer(), perf_analyzer_env()
    providers = PROVIDERS[args.flavor]
    results: dict = {}
    for pipeline in pipelines:  # one server per layout: the other layout's stubs do not share the cores
        repo = work / f"repo-{pipeline}"
        names = {}
        for (t, p), folder in exports.items():
            names[t, p] = f"{t.replace('-', '_')}_{p}"
            build_repository(folder, names[t, p], repo, max_batch_size=32, preferred_batch_sizes=(8, 16, 32),
                             max_queue_delay_us=args.queue_delay_us, pipeline=pipeline, flavor=args.flavor)
        with TritonServer(repo) as server:
            for key, name in names.items():
                # In-process right before this model's sweep, while the server idles: the two figures of a
                # ratio see the same machine (others' jobs on shared cores drift over minutes).
                by_threads = in_process_throughput(exports[key], texts, args.in_process_seconds, providers=providers)
                local = max(by_threads.values())
                print(f"{pipeline} {name}: in-process " + ", ".join(f"{r:.1f} texts/s at {t} thread(s)"
                                                                    for t, r in by_threads.items()), flush=True)
                agreement = served_agreement(server, name, exports[key], texts[:64], providers)
                print(f"{pipeline} {name}: served vs in-process {agreement}", flush=True)
                sweep = [row for b in args.texts_per_request.split(",")
                         for row in perf_sweep(pa, env, server, name, texts, concurrency, work, int(b),
                                               pipeline_models(name, pipeline))]
                best = max(sweep, key=lambda r: r["infer_per_s"])
                entry = results.setdefault(f"{key[0]} {key[1]}", {"task": key[0], "precision": key[1]})
                entry[pipeline] = sweep
                entry[f"{pipeline}_served_vs_in_process"] = agreement
                entry[f"{pipeline}_best"] = {"concurrency": best["concurrency"], "texts_per_request": best["texts_per_request"],
                                             "infer_per_s": best["infer_per_s"], "in_process_per_s": round(local, 1),
                                             "in_process_by_threads": {t: round(r, 1) for t, r in by_threads.items()},
                                             "served_over_in_process": round(best["infer_per_s"] / local, 2)}
                print(f"{key[0]} {key[1]} {pipeline}: in-process {local:.1f}/s, best served {best['infer_per_s']:.1f}/s at "
                      f"c={best['concurrency']} b={best['texts_per_request']} -> {best['infer_per_s'] / local:.2f}x",
                      flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    gpu = None
    if args.flavor == "cuda":
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=False).stdout.strip() or "?"
    out = {"machine": {"cpus": len(os.sched_getaffinity(0)), "cpu": cpu, "gpu": gpu, "flavor": args.flavor},
           "texts": "bundled real sentences (256, mixed lengths), cycled", "protocol": "grpc",
           "command": " ".join(["python", *sys.argv]), "results": results, "skipped": skipped}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
