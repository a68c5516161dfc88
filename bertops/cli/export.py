"""``bertops export``: export checkpoints for inference (ONNX, gated on parity with PyTorch)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

from bertops.cli._common import (
    ConfigFile,
    ModelDir,
    choices,
    command,
    config_default,
    console,
    group,
    out,
    pick,
    task_names,
    value,
)

app = group("Export checkpoints for inference.")
ADVANCED = "Advanced"
TaskName = choices("TaskName", task_names())
GATE = "Accuracy gate (int8)"


def _precisions() -> list[str]:
    from bertops.precision import PRECISIONS  # numpy-only registry

    return list(PRECISIONS)


Precision = choices("Precision", _precisions())


@command(app, "onnx")
def onnx(
    model: ModelDir,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for model.onnx, tokenizer, labels, report.")],
    task: Annotated[TaskName | None, typer.Option(
        help=f"Head whose outputs the graph exposes ({config_default('export.task')}).")] = None,
    precision: Annotated[Precision | None, typer.Option(
        help="fp16 pays off on CUDA only; int8 (CPU) is quantized after the fp32 checks and written only if its "
             "answers pass the accuracy gate against fp32 on real text, falling sensitive layers back to fp32 "
             "when needed; bf16 (CPUs with AVX512-BF16 or AMX) runs the same graph on OpenVINO behind the same gate "
             f"({config_default('export.precision')}).")] = None,
    opset: Annotated[int | None, typer.Option(
        help=f"14-17 (onnxruntime fusion) or 23-25 (standard Attention op) ({config_default('export.opset')}).",
        rich_help_panel=ADVANCED)] = None,
    max_seq_len: Annotated[int | None, typer.Option(
        help=f"Sequence length of the parity and latency check ({config_default('export.max_seq_len')}).",
        rich_help_panel=ADVANCED)] = None,
    eval_data: Annotated[Path | None, typer.Option(
        help="Labelled file (fine-tuning formats): the task's main metric must stay within --gate-max-drop "
             "points of fp32 too.", rich_help_panel=GATE)] = None,
    gate_min_mean_cosine: Annotated[float | None, typer.Option(
        help=f"Embeddings: mean cosine to fp32 ({config_default('export.gate_min_mean_cosine')}).",
        rich_help_panel=GATE)] = None,
    gate_min_cosine: Annotated[float | None, typer.Option(
        help=f"Embeddings: worst sentence's cosine to fp32 ({config_default('export.gate_min_cosine')}).",
        rich_help_panel=GATE)] = None,
    gate_min_agreement: Annotated[float | None, typer.Option(
        help=f"Classification: share of labels identical to fp32 ({config_default('export.gate_min_agreement')}).",
        rich_help_panel=GATE)] = None,
    gate_max_drop: Annotated[float | None, typer.Option(
        help="Points of entity F1 (vs fp32's spans) and of the --eval-data main metric that may be lost "
             f"({config_default('export.gate_max_drop')}).", rich_help_panel=GATE)] = None,
    config: ConfigFile = None,
):
    """Export to ONNX with one fused attention node per layer, gated on parity with PyTorch; int8 also on
    accuracy against fp32 (embeddings cosine, label agreement, entity F1; see the gate options)."""
    from bertops.checkpoint import resolve_model_dir
    from bertops.config import load_config
    from bertops.export import export_onnx

    cfg = load_config(config).export
    flags = {"eval_data": None if eval_data is None else str(eval_data), "gate_min_mean_cosine": gate_min_mean_cosine,
             "gate_min_cosine": gate_min_cosine, "gate_min_agreement": gate_min_agreement, "gate_max_drop": gate_max_drop}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    cfg.validate()
    task, precision, opset = pick(value(task), cfg.task), pick(value(precision), cfg.precision), pick(opset, cfg.opset)
    with console.status("exporting") as status:
        report = export_onnx(
            resolve_model_dir(model), task, out_dir, precision, opset, pick(max_seq_len, cfg.max_seq_len),
            progress=lambda msg: status.update(msg), atol=cfg.parity_atol, config=cfg,
        )
    fused = report.get("fused", {})
    parity = report.get("parity", {})
    out.print(f"[bold green]exported[/] {out_dir / 'model.onnx'}  task={task} opset={opset} precision={precision}")
    out.print(f"fused: {json.dumps(fused)}")
    out.print(f"parity (max abs vs PyTorch): {json.dumps(parity)}", soft_wrap=True)
    if "accuracy_gate" in report:
        gate, kept = report["accuracy_gate"], report.get(precision, {}).get("fp32_parts", [])
        where = f"; kept in fp32: {', '.join(kept) or 'nothing'}" if "fp32_parts" in report.get(precision, {}) else ""
        out.print(f"accuracy gate vs fp32 (passed): {json.dumps(gate['figures'])}{where}", soft_wrap=True)
    if "runtime" in report:
        out.print(f"runtime: {json.dumps(report['runtime'])}; vs onnxruntime fp32: "
                  f"{json.dumps(report.get(precision, {}).get('latency', {}))}", soft_wrap=True)
    out.print(f"latency on this machine: {json.dumps(report.get('latency', {}))}", soft_wrap=True)
