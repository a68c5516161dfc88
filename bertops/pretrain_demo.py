"""The pretraining path end to end on the bundled corpus (``bertops demo pretrain``).

bundled sentences -> ``bertops data prepare`` shards (all-MiniLM-L6-v2's WordPiece vocabulary) ->
``bertops pretrain`` of a small BERT for a few steps in this process (DeepSpeed ZeRO-2, one CPU
rank) -> RUN_DIR/final/ -> masked-word ONNX export -> a live tritonserver answering a masked-word
query over HTTP, compared with the in-process answer -> shut down. Each step prints the command
that does the same. A few steps on 90 sentence pairs teach the model little: the point is the path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from bertops.errors import BertopsError

Say = Callable[[str], None]
QUERY = "The capital of France is [MASK]."
MODEL = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=4",
         "model.intermediate_size=256", "model.max_position_embeddings=128"]
TRAIN = ["train.global_batch_size=16", "train.micro_batch_size=8", "train.max_steps=40", "train.warmup_steps=4",
         "train.learning_rate=2e-3", "train.log_every=10", "train.save_every=20", "train.eval_batches=2"]


def run_pretrain_demo(out: str | Path = "runs/demo-pretrain", say: Say = print, serve: bool = True,
                      steps: int = 40) -> dict:
    """Run every stage; returns a summary dict (also written to ``out/demo_summary.json``)."""
    from bertops.checkpoint import DEFAULT_MODEL, resolve_model_dir
    from bertops.config import load_config
    from bertops.data.corpus import write_bundled_corpus
    from bertops.data.prepare import prepare
    from bertops.export import export_onnx
    from bertops.tasks import FILL_MASK
    from bertops.train import pretrain

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BertopsError(f"{out} exists and is not empty; pass a new --out for the demo")
    out.mkdir(parents=True, exist_ok=True)
    corpus, data, run, export_dir, repo = (out / n for n in ("corpus.txt", "data", "run", "export", "triton_models"))
    tokenizer = resolve_model_dir(DEFAULT_MODEL)
    summary: dict = {}

    write_bundled_corpus(corpus)
    say(f"[1/5] data: bertops data prepare --input {corpus} --tokenizer {tokenizer} --out {data} --seq-len 128")
    manifest = prepare([corpus], tokenizer, data, seq_len=128, progress=False)
    summary["examples"] = manifest["splits"]["train"]["examples"]
    say(f"      {summary['examples']} training pairs, {manifest['splits']['eval']['examples']} held out")

    overrides = [*MODEL, *TRAIN, f"train.max_steps={steps}"]
    say(f"[2/5] pretrain: bertops pretrain --data {data} --out {run} {' '.join(overrides)}")
    result = pretrain(load_config(None, overrides), data, run)
    first, last = result.history[0], result.history[-1]
    summary.update(steps=result.steps, precision=result.precision, loss_first=first["loss"], loss_last=last["loss"])
    say(f"      loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']}), "
        f"{result.precision}; curves: {run / 'curves.png'}")

    say(f"[3/5] export: bertops export onnx --model {result.final_dir} --task {FILL_MASK.name} --out {export_dir}")
    report = export_onnx(result.final_dir, FILL_MASK.name, export_dir, progress=lambda m: None)
    summary["parity_max_abs"] = {k: v["max_abs"] for k, v in report["parity"]["outputs"].items()}
    say(f"      parity vs PyTorch {summary['parity_max_abs']}")

    from bertops.infer import load_predictor

    local = load_predictor(export_dir).predict([QUERY])[0]["masks"]
    summary["in_process"] = [c["token"] for c in local[0]]
    say(f"[4/5] in process: {QUERY!r} -> {summary['in_process']}")
    if not serve:
        return _finish(out, summary, say)

    from bertops.client import Client
    from bertops.triton.builder import build_repository
    from bertops.triton.server import TritonServer

    say(f"[5/5] serve: bertops triton build --export {export_dir} --name bert-mlm --repo {repo}; "
        f"bertops serve --repo {repo}")
    build_repository(export_dir, "bert-mlm", repo)
    with TritonServer(repo) as server:
        with Client(server.http_url, "http") as client:
            served = client.fill_mask("bert-mlm", [QUERY])[0]
    summary["served"] = [c["token"] for c in served[0]]
    if summary["served"] != summary["in_process"]:
        raise BertopsError(
            f"served answer {summary['served']} differs from in-process {summary['in_process']}"
        )
    say(f"      served over HTTP: {QUERY!r} -> {summary['served']} (same as in process); server stopped")
    return _finish(out, summary, say)


def _finish(out: Path, summary: dict, say: Say) -> dict:
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(f"done: {out / 'demo_summary.json'}")
    return summary
