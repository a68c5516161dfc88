"""``bertops checkpoint``: inspect and convert checkpoints (HF layout)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from bertops.cli._common import ModelDir, command, group, out

app = group("Inspect and convert checkpoints (HF layout).")


@command(app, "info")
def info(model: ModelDir):
    """Print a checkpoint's architecture, heads and parameter count."""
    from bertops.checkpoint import describe_checkpoint, resolve_model_dir

    out.print_json(json.dumps(describe_checkpoint(resolve_model_dir(model))))


@command(app, "convert")
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="RUN_DIR/checkpoints (newest intact) or RUN_DIR/checkpoints/TAG.")],
    out_dir: Annotated[Path, typer.Argument(help="New folder for the HF-layout checkpoint.")],
):
    """DeepSpeed engine checkpoint (any ZeRO stage) -> config.json + model.safetensors + tokenizer files."""
    from bertops.train.convert import convert_checkpoint

    out.print(str(convert_checkpoint(checkpoint, out_dir)), highlight=False)

