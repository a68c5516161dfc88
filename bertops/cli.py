"""The ``bertops`` command line: a thin layer that parses options and calls library functions.

Every command is wrapped by :func:`_errors`, which turns a :class:`BertopsError` into one red line
on stderr and exit code 1 (no traceback); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import platform
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from bertops.errors import BertopsError

app = typer.Typer(
    help="bertops: BERT from raw text to a production inference endpoint.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
tokenizer_app = typer.Typer(help="Train or inspect WordPiece tokenizers.", no_args_is_help=True)
config_app = typer.Typer(help="Show and validate configs (YAML + key=value overrides).", no_args_is_help=True)
checkpoint_app = typer.Typer(help="Inspect and convert checkpoints (HF layout).", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(config_app, name="config")
app.add_typer(checkpoint_app, name="checkpoint")

console = Console(stderr=True)
out = Console()


def _errors(fn):
    """One-line errors for user mistakes, exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BertopsError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def command(group: typer.Typer, *args, **kwargs):
    """``group.command`` with the error wrapper applied."""

    def deco(fn):
        return group.command(*args, **kwargs)(_errors(fn))

    return deco


# --- info -----------------------------------------------------------------------------------------


def runtime_info() -> dict:
    """Versions and hardware the runtime sees (what a bug report needs)."""
    import onnx
    import torch

    from bertops import __version__

    try:
        import onnxruntime as ort

        ort_version, providers = ort.__version__, ort.get_available_providers()
    except ImportError:
        ort_version, providers = "not installed (pip install 'bertops[cpu]' or 'bertops[gpu]')", []
    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except Exception as exc:  # deepspeed's import can fail on odd machines; info must still print
        ds_version = f"unavailable ({type(exc).__name__})"
    return {
        "bertops": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "bf16_cpu": torch.backends.mkldnn.is_available(),
        "onnx": onnx.__version__,
        "onnxruntime": ort_version,
        "onnxruntime_providers": providers,
        "deepspeed": ds_version,
    }


@command(app, "info")
def info(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False):
    """Print versions, whether CUDA is present, and onnxruntime's execution providers."""
    data = runtime_info()
    if as_json:
        out.print_json(json.dumps(data))
        return
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in data.items():
        table.add_row(f"[bold]{key}[/]", ", ".join(value) if isinstance(value, list) else str(value))
    out.print(table)


# --- config ---------------------------------------------------------------------------------------

ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (see bertops/configs/).")]


def _pick(value, default):
    """A flag the user gave wins; otherwise the config's value (whose default lives in bertops.config)."""
    return default if value is None else value
Overrides = Annotated[list[str] | None, typer.Argument(help="Overrides such as model.hidden_size=256.")]


@command(config_app, "show")
def config_show(config: ConfigFile = None, overrides: Overrides = None):
    """Print the resolved config (defaults + YAML + overrides) as YAML, after validation."""
    import yaml

    from bertops.config import load_config

    cfg = load_config(config, overrides or [])
    out.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="", highlight=False)


@command(config_app, "validate")
def config_validate(config: Annotated[Path, typer.Argument(help="YAML file to check.")], overrides: Overrides = None):
    """Check a config file; exit code 0 when valid."""
    from bertops.config import load_config

    load_config(config, overrides or [])
    out.print(f"{config}: valid")


# --- tokenizer ------------------------------------------------------------------------------------


@command(tokenizer_app, "train")
def tokenizer_train(
    input: Annotated[list[Path], typer.Option("--input", "-i", help="Text files to learn from (repeatable).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for tokenizer.json, vocab.txt, configs.")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size, special tokens included.")] = 30522,
    lowercase: Annotated[bool, typer.Option(help="Lowercase text first (uncased model).")] = True,
    strip_accents: Annotated[
        bool | None, typer.Option(help="Strip accents; default: strip when lowercasing, as BERT does.")
    ] = None,
    min_frequency: Annotated[int, typer.Option(help="Drop merges seen fewer times.")] = 2,
):
    """Train a BERT WordPiece tokenizer (CJK characters split, BERT's accent handling)."""
    from bertops.tokenizer import load_tokenizer, train_tokenizer

    path = train_tokenizer(input, out_dir, vocab_size, lowercase, strip_accents, min_frequency)
    tok = load_tokenizer(path)
    out.print(f"wrote {path} (vocab {tok.get_vocab_size()})")


@command(tokenizer_app, "encode")
def tokenizer_encode(
    path: Annotated[Path, typer.Option("--tokenizer", "-t", help="Folder with tokenizer.json or vocab.txt.")],
    text: Annotated[list[str], typer.Argument(help="Text to encode; give two for a pair.")],
):
    """Show the tokens and ids of a text (or a pair)."""
    from bertops.tokenizer import load_tokenizer

    if len(text) > 2:
        raise BertopsError("give one text, or two for a pair")
    tok = load_tokenizer(path)
    enc = tok.encode(*text)
    out.print_json(json.dumps({"tokens": enc.tokens, "input_ids": enc.ids, "token_type_ids": enc.type_ids}))


# --- checkpoint -----------------------------------------------------------------------------------

ModelDir = Annotated[
    str, typer.Option("--model", "-m", help="Checkpoint folder (bertops or HF layout), or a bundled model name.")
]


@command(checkpoint_app, "info")
def checkpoint_info(model: ModelDir):
    """Print a checkpoint's architecture, heads and parameter count."""
    from bertops.checkpoint import describe_checkpoint, resolve_model_dir

    out.print_json(json.dumps(describe_checkpoint(resolve_model_dir(model))))


# --- export / predict -----------------------------------------------------------------------------

export_app = typer.Typer(help="Export checkpoints for inference.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@command(export_app, "onnx")
def export_onnx_cmd(
    model: ModelDir,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for model.onnx, tokenizer, labels, report.")],
    task: Annotated[str | None, typer.Option(
        help="embeddings, sequence-classification, token-classification, fill-mask, pretraining (config export.task).")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32, or fp16 (for CUDA) (config export.precision).")] = None,
    opset: Annotated[int | None, typer.Option(
        help="14-17 (onnxruntime fusion) or 23-25 (standard Attention op) (config export.opset: 17).")] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Sequence length of the latency check (config export.max_seq_len).")] = None,
    config: ConfigFile = None,
):
    """Export to ONNX with one fused attention node per layer, gated on parity with PyTorch."""
    from bertops.checkpoint import resolve_model_dir
    from bertops.config import load_config
    from bertops.export import export_onnx

    cfg = load_config(config).export
    task, precision, opset = _pick(task, cfg.task), _pick(precision, cfg.precision), _pick(opset, cfg.opset)
    with console.status("exporting") as status:
        report = export_onnx(
            resolve_model_dir(model), task, out_dir, precision, opset, _pick(max_seq_len, cfg.max_seq_len),
            progress=lambda msg: status.update(msg), atol=cfg.parity_atol,
        )
    fused = report.get("fused", {})
    parity = report.get("parity", {})
    out.print(f"[bold green]exported[/] {out_dir / 'model.onnx'}  task={task} opset={opset} precision={precision}")
    out.print(f"fused: {json.dumps(fused)}")
    out.print(f"parity (max abs vs PyTorch): {json.dumps(parity)}", soft_wrap=True)
    out.print(f"latency on this machine: {json.dumps(report.get('latency', {}))}", soft_wrap=True)


@command(app, "predict")
def predict_cmd(
    model: Annotated[Path, typer.Option("--model", "-m", help="An export folder (`bertops export onnx --out`).")],
    input_file: Annotated[Path, typer.Option("--input", "-i", help="JSONL with {\"text\": ...} per line (or plain text lines).")],
    output_file: Annotated[Path, typer.Option("--out", "-o", help="JSONL answers, one per input line.")],
    batch_size: Annotated[int, typer.Option(help="Texts per onnxruntime run (grouped by length).")] = 64,
    max_length: Annotated[int, typer.Option(help="Truncate texts to this many tokens.")] = 512,
):
    """Run an exported model on a JSONL file in-process (onnxruntime, length-grouped batches)."""
    from rich.progress import Progress

    from bertops.infer import load_predictor, predict_file

    predictor = load_predictor(model, max_length=max_length)
    with Progress(console=console, transient=True) as bar:
        job = bar.add_task("predicting", total=None)
        n = predict_file(predictor, input_file, output_file, batch_size,
                         progress=lambda done, total: bar.update(job, completed=done, total=total))
    out.print(f"wrote {n} answers to {output_file}")


@command(app, "demo")
def demo_cmd(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the export and answers.")] = Path("runs/demo"),
    repo: Annotated[Path, typer.Option(help="Triton model repository to build.")] = Path("triton_models"),
    serve: Annotated[bool, typer.Option(help="Start tritonserver and query it over HTTP and gRPC.")] = True,
):
    """End to end on the bundled all-MiniLM-L6-v2: export -> predict -> Triton repo -> live server -> queries."""
    from bertops.demo import run_demo

    run_demo(out_dir, repo, say=lambda msg: out.print(msg, highlight=False, soft_wrap=True), serve=serve)


# --- triton / serve / client ----------------------------------------------------------------------

triton_app = typer.Typer(help="Build and check Triton model repositories.", no_args_is_help=True)
client_app = typer.Typer(help="Query models served by `bertops serve` (prints JSON).", no_args_is_help=True)
app.add_typer(triton_app, name="triton")
app.add_typer(client_app, name="client")


@command(triton_app, "build")
def triton_build(
    export: Annotated[Path, typer.Option("--export", "-e", help="Export folder (`bertops export onnx --out`).")],
    name: Annotated[str, typer.Option("--name", "-n", help="Ensemble name clients call.")],
    repo: Annotated[Path, typer.Option("--repo", "-r", help="Model repository folder.")] = Path("triton_models"),
    flavor: Annotated[str | None, typer.Option(
        help="cpu: onnxruntime in the python backend; gpu: onnxruntime backend (config serve.flavor: cpu).")] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Largest batch each model accepts (config serve.max_batch_size).")] = None,
    instances: Annotated[int | None, typer.Option(help="Instances per model, instance_group count (config serve.instances).")] = None,
    max_queue_delay_us: Annotated[int | None, typer.Option(
        help="Dynamic batcher queue delay in µs (config serve.max_queue_delay_us).")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per text before truncation (default 512).")] = None,
    config: ConfigFile = None,
):
    """Write NAME (ensemble), NAME_tokenizer, NAME_encoder and NAME_postprocess into the repository."""
    from bertops.config import load_config
    from bertops.triton.repository import build_repository

    cfg = load_config(config).serve
    flavor = _pick(flavor, cfg.flavor)
    path = build_repository(export, name, repo, flavor=flavor, max_batch_size=_pick(max_batch_size, cfg.max_batch_size),
                            instances=_pick(instances, cfg.instances), preferred_batch_sizes=cfg.preferred_batch_sizes,
                            max_queue_delay_us=_pick(max_queue_delay_us, cfg.max_queue_delay_us), max_length=max_length)
    out.print(f"wrote {path} (+ {name}_tokenizer, {name}_encoder, {name}_postprocess; flavor {flavor}); "
              f"serve with `bertops serve --repo {repo}`", highlight=False)


@command(triton_app, "validate")
def triton_validate(repo: Annotated[Path, typer.Option("--repo", "-r", help="Model repository folder.")] = Path("triton_models")):
    """Parse every config.pbtxt with Triton's ModelConfig and check the wiring and ONNX graphs."""
    from bertops.triton.repository import validate_repository

    problems = validate_repository(repo)
    if problems:
        for problem in problems:
            console.print(f"[bold red]problem:[/] {problem}", highlight=False, soft_wrap=True)
        raise BertopsError(f"{repo} has {len(problems)} problem(s); fix them or rebuild with `bertops triton build`")
    out.print(f"{repo}: valid", highlight=False)


@command(app, "serve")
def serve(
    repo: Annotated[Path, typer.Option("--repo", "-r", help="Model repository folder.")] = Path("triton_models"),
    http_port: Annotated[int | None, typer.Option(help="HTTP/REST port (config serve.http_port: 8000).")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port (config serve.grpc_port: 8001).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus metrics port (config serve.metrics_port: 8002).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind; loopback unless told otherwise (config serve.host).")] = None,
    log_file: Annotated[Path | None, typer.Option(help="Server log (default: a temporary file).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for all models to load.")] = 300.0,
    config: ConfigFile = None,
):
    """Validate the repository, start tritonserver on it, print the endpoints; Ctrl-C stops it cleanly."""
    import time

    from bertops.triton.repository import check_servable, repository_models
    from bertops.triton.server import TritonServer

    from bertops.config import load_config

    cfg = load_config(config).serve
    check_servable(repo)  # one-line refusal before anything starts
    server = TritonServer(repo, _pick(http_port, cfg.http_port), _pick(grpc_port, cfg.grpc_port),
                          _pick(metrics_port, cfg.metrics_port), host=_pick(host, cfg.host), log_file=log_file)
    try:
        server.start(timeout)
        models = ", ".join(f"{m} ({t})" for m, t in repository_models(repo).items())
        out.print(f"serving {repo}: {models}", highlight=False)
        out.print(f"  HTTP    http://{server.http_url}  (health: /v2/health/ready)", highlight=False)
        out.print(f"  gRPC    {server.grpc_url}", highlight=False)
        out.print(f"  metrics http://{server.metrics_url}/metrics", highlight=False)
        out.print(f"  log     {server.log_path}; Ctrl-C to stop", highlight=False)
        while server.running:
            time.sleep(0.5)
        raise BertopsError(f"tritonserver exited with code {server.process.returncode}; see {server.log_path}")
    except KeyboardInterrupt:
        console.print("stopping tritonserver ...")
    finally:
        server.stop()


ClientUrl = Annotated[str | None, typer.Option("--url", "-u", help="HOST:PORT (default 127.0.0.1:8000 http, :8001 grpc).")]
ClientProtocol = Annotated[str, typer.Option("--protocol", "-p", help="http or grpc.")]
ClientModel = Annotated[str, typer.Option("--model", "-m", help="Ensemble name (bertops triton build --name).")]
ClientTexts = Annotated[list[str], typer.Argument(help="Texts to send.")]


def _client_predict(url, protocol, model, texts, pairs=None) -> None:
    from bertops.client import Client

    with Client(url, protocol) as client:
        answers = client.predict(model, texts, pairs)
    out.print_json(json.dumps([{"text": t, **a} for t, a in zip(texts, answers)], ensure_ascii=False))


@command(client_app, "classify")
def client_classify(texts: ClientTexts, model: ClientModel, url: ClientUrl = None, protocol: ClientProtocol = "http",
                    pair: Annotated[list[str] | None, typer.Option("--pair", help="Second text per text (repeat).")] = None):
    """Label each text (sequence-classification)."""
    _client_predict(url, protocol, model, texts, pair or None)


@command(client_app, "ner")
def client_ner(texts: ClientTexts, model: ClientModel, url: ClientUrl = None, protocol: ClientProtocol = "http"):
    """Entity spans with character offsets (token-classification)."""
    _client_predict(url, protocol, model, texts)


@command(client_app, "embed")
def client_embed(texts: ClientTexts, model: ClientModel, url: ClientUrl = None, protocol: ClientProtocol = "http"):
    """Sentence embeddings (embeddings)."""
    _client_predict(url, protocol, model, texts)


@command(client_app, "fill-mask")
def client_fill_mask(texts: ClientTexts, model: ClientModel, url: ClientUrl = None, protocol: ClientProtocol = "http"):
    """Top-k tokens for every [MASK] (fill-mask)."""
    _client_predict(url, protocol, model, texts)


def main() -> None:  # console-script entry point
    sys.exit(app())
