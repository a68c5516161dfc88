"""``bertops pretrain`` (one process, or each rank under the ``deepspeed`` launcher) and ``bertops plot``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bertops.cli._common import ConfigFile, command, out

app = typer.Typer()


@command(app, "pretrain")
def pretrain(
    data: Annotated[Path, typer.Option("--data", "-d", help="Shards folder from `bertops data prepare`.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides such as train.max_steps=100.")] = None,
    config: ConfigFile = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", "-o", help="RUN_DIR (default: config train.output_dir).")] = None,
    deepspeed: Annotated[str | None, typer.Option(
        "--deepspeed", help="DeepSpeed JSON: ZeRO stage, offload (default: config train.ds_config).")] = None,
    resume: Annotated[str | None, typer.Option(
        help="'auto': continue from the newest intact checkpoint in RUN_DIR (or start); or a tag, global_stepN."
    )] = None,
    init_from: Annotated[str | None, typer.Option(
        "--init-from", help="Continue pretraining a checkpoint folder (e.g. all-MiniLM-L6-v2's): its architecture "
        "and weights; prepare --data with its tokenizer (config train.init_from).")] = None,
):
    """Pretrain masked-LM + NSP with DeepSpeed ZeRO. Same command alone or under `deepspeed --num_gpus N`."""
    from bertops.config import load_config
    from bertops.train.run import pretrain as run

    cfg = load_config(config, [*(overrides or []), *([f"train.init_from={init_from}"] if init_from else [])])
    result = run(cfg, data, out_dir, deepspeed, resume)
    if result.world_size == 1 or _rank() == 0:
        out.print(f"{result.final_dir}", highlight=False)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


@command(app, "plot")
def plot(run_dir: Annotated[Path, typer.Argument(help="RUN_DIR written by `bertops pretrain`.")]):
    """Redraw RUN_DIR/curves.png from RUN_DIR/metrics.jsonl."""
    from bertops.train.metrics import plot_run

    out.print(str(plot_run(run_dir)), highlight=False)
