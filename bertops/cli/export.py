"""``bertops export``: export checkpoints for inference (ONNX, gated on parity with PyTorch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from bertops.cli._common import (
    ConfigFile, ModelDir, choices, command, config_default, console, group, out, pick, task_names, value
)

app = group("Export checkpoints for inference.")
ADVANCED = "Advanced"
TaskName = choices("TaskName", task_names())
Precision = choices("Precision", ["fp32", "fp16"])


@command(app, "onnx")
def onnx(
    model: ModelDir,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for model.onnx, tokenizer, labels, report.")],
    task: Annotated[TaskName | None, typer.Option(
        help=f"Head whose outputs the graph exposes ({config_default('export.task')}).")] = None,
    precision: Annotated[Precision | None, typer.Option(
        help=f"fp16 pays off on CUDA only ({config_default('export.precision')}).")] = None,
    opset: Annotated[int | None, typer.Option(
        help=f"14-17 (onnxruntime fusion) or 23-25 (standard Attention op) ({config_default('export.opset')}).",
        rich_help_panel=ADVANCED)] = None,
    max_seq_len: Annotated[int | None, typer.Option(
        help=f"Sequence length of the parity and latency check ({config_default('export.max_seq_len')}).",
        rich_help_panel=ADVANCED)] = None,
    config: ConfigFile = None,
):
    """Export to ONNX with one fused attention node per layer, gated on parity with PyTorch."""
    from bertops.checkpoint import resolve_model_dir
    from bertops.config import load_config
    from bertops.export import export_onnx

    cfg = load_config(config).export
    task, precision, opset = pick(value(task), cfg.task), pick(value(precision), cfg.precision), pick(opset, cfg.opset)
    with console.status("exporting") as status:
        report = export_onnx(
            resolve_model_dir(model), task, out_dir, precision, opset, pick(max_seq_len, cfg.max_seq_len),
            progress=lambda msg: status.update(msg), atol=cfg.parity_atol,
        )
    fused = report.get("fused", {})
    parity = report.get("parity", {})
    out.print(f"[bold green]exported[/] {out_dir / 'model.onnx'}  task={task} opset={opset} precision={precision}")
    out.print(f"fused: {json.dumps(fused)}")
    out.print(f"parity (max abs vs PyTorch): {json.dumps(parity)}", soft_wrap=True)
    out.print(f"latency on this machine: {json.dumps(report.get('latency', {}))}", soft_wrap=True)
