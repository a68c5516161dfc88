"""``bertops triton``: build and check Triton model repositories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bertops.cli._common import ConfigFile, choices, command, config_default, console, group, out, pick, value
from bertops.errors import BertopsError

app = group("Build and check Triton model repositories.")
ADVANCED = "Advanced"
Flavor = choices("Flavor", ["cpu", "cuda", "gpu"])
Pipeline = choices("Pipeline", ["single", "ensemble"])

Repo = Annotated[Path, typer.Option("--repo", "-r", help="Model repository folder.")]


@command(app, "build")
def build(
    export: Annotated[Path, typer.Option("--export", "-e", help="Export folder (`bertops export onnx --out`).")],
    name: Annotated[str, typer.Option("--name", "-n", help="Model name clients call.")],
    repo: Repo = Path("triton_models"),
    flavor: Annotated[Flavor | None, typer.Option(
        help=f"Where the encoder runs. cpu / cuda: onnxruntime's CPU / CUDA provider in the python backend (cuda needs "
             f"onnxruntime-gpu in the server's Python); gpu: Triton's onnxruntime backend, NVIDIA's container "
             f"({config_default('serve.flavor')}).")] = None,
    pipeline: Annotated[Pipeline | None, typer.Option(
        help=f"single: one python model tokenizes, encodes and post-processes; ensemble: tokenizer -> "
             f"post-process -> encoder models ({config_default('serve.pipeline')}).")] = None,
    max_batch_size: Annotated[int | None, typer.Option(
        help=f"Largest batch each model accepts ({config_default('serve.max_batch_size')}).", rich_help_panel=ADVANCED)] = None,
    instances: Annotated[int | None, typer.Option(
        help=f"Instances per model, instance_group count ({config_default('serve.instances')}).",
        rich_help_panel=ADVANCED)] = None,
    max_queue_delay_us: Annotated[int | None, typer.Option(
        help=f"Dynamic batcher queue delay in µs ({config_default('serve.max_queue_delay_us')}).",
        rich_help_panel=ADVANCED)] = None,
    max_length: Annotated[int | None, typer.Option(
        help="Tokens per text before truncation (default: what the model was fine-tuned on, else its position limit, at most 512).",
        rich_help_panel=ADVANCED)] = None,
    max_request_bytes: Annotated[int | None, typer.Option(
        help=f"TEXT bytes one request may carry; larger requests are refused ({config_default('serve.max_request_bytes')}).",
        rich_help_panel=ADVANCED)] = None,
    config: ConfigFile = None,
):
    """Write the model NAME (single: one python model; ensemble: + NAME_tokenizer, NAME_encoder, NAME_postprocess)."""
    from bertops.config import load_config
    from bertops.triton.builder import build_repository

    cfg = load_config(config).serve
    flavor = pick(value(flavor), cfg.flavor)
    pipeline = pick(value(pipeline), cfg.pipeline)
    path = build_repository(export, name, repo, flavor=flavor, max_batch_size=pick(max_batch_size, cfg.max_batch_size),
                            instances=pick(instances, cfg.instances), preferred_batch_sizes=cfg.preferred_batch_sizes,
                            max_queue_delay_us=pick(max_queue_delay_us, cfg.max_queue_delay_us), max_length=max_length,
                            max_request_bytes=pick(max_request_bytes, cfg.max_request_bytes), pipeline=pipeline)
    if pipeline == "ensemble":
        extra = f" (+ {name}_tokenizer, {name}_encoder, {name}_postprocess)"
    else:
        extra = f" (+ {name}_encoder)" if flavor == "gpu" else ""
    out.print(f"wrote {path}{extra}; pipeline {pipeline}, flavor {flavor}; "
              f"serve with `bertops serve --repo {repo}`", highlight=False)


@command(app, "validate")
def validate(repo: Repo = Path("triton_models")):
    """Parse every config.pbtxt with Triton's ModelConfig and check the wiring and ONNX graphs."""
    from bertops.triton.validate import validate_repository

    problems = validate_repository(repo)
    if problems:
        for problem in problems:
            console.print(f"[bold red]problem:[/] {problem}", highlight=False, soft_wrap=True)
        raise BertopsError(f"{repo} has {len(problems)} problem(s); fix them or rebuild with `bertops triton build`")
    out.print(f"{repo}: valid", highlight=False)
