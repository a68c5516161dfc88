"""``bertops predict``: run an exported model on a JSONL file in-process (onnxruntime)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bertops.cli._common import command, console, out

app = typer.Typer()
ADVANCED = "Advanced"


@command(app, "predict")
def predict(
    model: Annotated[Path, typer.Option(
        "--model", "-m", help="An export folder (`bertops export onnx --out`), or a fine-tuned folder (OUT/final).")],
    input_file: Annotated[
        Path, typer.Option("--input", "-i", help="JSONL with {\"text\": ...} per line (or plain text lines).")
    ],
    output_file: Annotated[Path, typer.Option("--out", "-o", help="JSONL answers, one per input line.")],
    batch_size: Annotated[
        int, typer.Option(help="Texts per onnxruntime run (grouped by length).", rich_help_panel=ADVANCED)
    ] = 64,
    max_length: Annotated[
        Optional[int], typer.Option(help="Truncate texts to this many tokens (default: what the model was fine-tuned on, else 512).", rich_help_panel=ADVANCED)
    ] = None,
):
    """Run an exported model on a JSONL file in-process (onnxruntime, length-grouped batches)."""
    from rich.progress import Progress

    from bertops.infer import load_predictor, predict_file

    if (model / "model.onnx").is_file() or not (model / "model.safetensors").is_file():
        predictor = load_predictor(model, max_length=max_length)
    else:  # a fine-tuned checkpoint folder: PyTorch, then the same task post-processing
        from bertops.estimator import load_torch_predictor

        predictor = load_torch_predictor(model, max_length=max_length)
    with Progress(console=console, transient=True) as bar:
        job = bar.add_task("predicting", total=None)
        n = predict_file(predictor, input_file, output_file, batch_size,
                         progress=lambda done, total: bar.update(job, completed=done, total=total))
    out.print(f"wrote {n} answers to {output_file}")
