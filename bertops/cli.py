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


def main() -> None:  # console-script entry point
    sys.exit(app())
