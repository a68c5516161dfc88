"""Soak test of the served stack: N seconds at concurrency C over HTTP and gRPC together, every answer checked.

Builds a repository for a tiny random embeddings model (``--model minilm``: real all-MiniLM-L6-v2;
``--export DIR``: yours), starts the real
tritonserver on 127.0.0.1 (all traffic stays on loopback), and runs C client threads -- half HTTP,
half gRPC, each with its own ``bertops.client.Client`` -- sending requests of 1-8 texts drawn from
the bundled real sentences plus long concatenations of them (mixed lengths, some over 512 tokens,
so truncated).  Every row of every answer is compared with ``bertops.infer`` in-process (embedding
within ``--atol``, same ``truncated`` flag).  Exits 1 on any failed or wrong answer, or if a
python-backend stub died during the run.

    python bench/soak.py                       # 60 s at concurrency 64
    python bench/soak.py --seconds 10 --concurrency 8 --json-out soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bertops.checkpoint import resolve_model_dir
from bertops.client import Client
from bertops.data.corpus import bundled_sentences
from bertops.errors import BertopsError
from bertops.export import export_onnx
from bertops.infer import load_predictor
from bertops.triton.builder import build_repository
from bertops.triton.server import TritonServer


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mixed_texts(long: int, seed: int = 0) -> list[str]:
    """The 256 bundled sentences (25-400 characters), plus ``long`` concatenations of 5-60 of them."""
    sentences = bundled_sentences()
    rng = random.Random(seed)
    return sentences + [" ".join(rng.sample(sentences, rng.randint(5, 60))) for _ in range(long)]


def make_export(model: str, work: Path) -> Path:
    """Real all-MiniLM-L6-v2, or the packaged tiny config with random weights (cheap compute: stresses serving)."""
    out = work / f"export-{model}"
    if model == "minilm":
        export_onnx(resolve_model_dir("all-MiniLM-L6-v2"), "embeddings", out)
        return out
    import torch

    from bertops.checkpoint import save_model
    from bertops.config import load_config, packaged_configs
    from bertops.tasks import get_task

    torch.manual_seed(0)
    cfg = load_config(next(p for p in packaged_configs() if p.name == "tiny.yaml")).model
    ckpt = save_model(get_task("embeddings").build_model(cfg), work / "ckpt",
                      tokenizer_dir=resolve_model_dir("all-MiniLM-L6-v2"))
    export_onnx(ckpt, "embeddings", out)
    return out


def soak(url_http: str, url_grpc: str, model: str, texts: list[str], expected: list[dict], seconds: float,
         concurrency: int, atol: float, max_rows: int = 8) -> dict:
    """Run the clients; return counts and latencies per protocol."""
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    stats = {p: {"requests": 0, "texts": 0, "failed": 0, "wrong": 0, "latencies": []} for p in ("http", "grpc")}
    errors: list[str] = []

    def worker(index: int) -> None:
        protocol = "http" if index % 2 == 0 else "grpc"
        rng = random.Random(index)
        mine = {"requests": 0, "texts": 0, "failed": 0, "wrong": 0, "latencies": []}
        with Client(url_http if protocol == "http" else url_grpc, protocol, timeout=120) as client:
            while time.monotonic() < deadline:
                rows = rng.sample(range(len(texts)), rng.randint(1, max_rows))
                start = time.perf_counter()
                try:
                    answers = client.predict(model, [texts[r] for r in rows])
                except BertopsError as exc:
                    mine["failed"] += 1
                    with lock:
                        errors.append(f"{protocol}: {exc}")
                    continue
                mine["latencies"].append(time.perf_counter() - start)
                mine["requests"] += 1
                mine["texts"] += len(rows)
                for r, got in zip(rows, answers):
                    want = expected[r]
                    if got.get("truncated") != want["truncated"] or not np.allclose(
                        got["embedding"], want["embedding"], atol=atol
                    ):
                        mine["wrong"] += 1
                        with lock:
                            errors.append(f"{protocol}: wrong answer for text {r}")
        with lock:
            for k in ("requests", "texts", "failed", "wrong"):
                stats[protocol][k] += mine[k]
            stats[protocol]["latencies"] += mine["latencies"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    out = {"seconds": round(elapsed, 1), "errors": errors[:10]}
    for protocol, s in stats.items():
        lat = sorted(s.pop("latencies")) or [float("nan")]
        out[protocol] = {**s, "requests_per_s": round(s["requests"] / elapsed, 1),
                         "texts_per_s": round(s["texts"] / elapsed, 1),
                         "p50_ms": round(statistics.median(lat) * 1e3, 1),
                         "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--concurrency", type=int, default=64, help="client threads, half HTTP, half gRPC")
    ap.add_argument("--model", choices=("tiny", "minilm"), default="tiny",
                    help="tiny: random 2-layer model (the server does the work); minilm: real all-MiniLM-L6-v2")
    ap.add_argument("--export", type=Path, default=None, help="an embeddings export instead of --model")
    ap.add_argument("--long", type=int, default=64, help="long texts (5-60 sentences joined) added to the 256")
    ap.add_argument("--instances", type=int, default=1, help="instances per model (bertops triton build)")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bertops-soak-") as tmp:
        work = Path(tmp)
        export = args.export or make_export(args.model, work)
        repo = build_repository(export, "soak", work / "repo", instances=args.instances).parent
        texts = mixed_texts(args.long)
        predictor = load_predictor(export)
        expected = predictor.predict(texts)
        del predictor
        print(f"{len(texts)} texts ({min(map(len, texts))}-{max(map(len, texts))} characters, "
              f"{sum(e['truncated'] for e in expected)} over 512 tokens); {args.concurrency} clients for "
              f"{args.seconds:.0f} s", flush=True)
        with TritonServer(repo, log_file=work / "tritonserver.log") as server:
            stubs = {s.pid for s in server.stubs()}
            result = soak(server.http_url, server.grpc_url, "soak", texts, expected, args.seconds,
                          args.concurrency, args.atol)
            stubs_alive = stubs == {s.pid for s in server.stubs()} and server.running
    result.update(model=str(args.export or args.model), texts=len(texts), cpu=cpu_model(),
                  cores=len(os.sched_getaffinity(0)), concurrency=args.concurrency, instances=args.instances,
                  stubs_survived=stubs_alive)
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    bad = sum(result[p]["failed"] + result[p]["wrong"] for p in ("http", "grpc"))
    if bad or not stubs_alive:
        print(f"FAILED: {bad} failed or wrong answers; stubs survived: {stubs_alive}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
