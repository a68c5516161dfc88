"""``bertops demo``: the serving path on the bundled all-MiniLM-L6-v2; ``bertops demo pretrain``: the training path."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bertops.cli._common import command, out

app = typer.Typer()


@command(app, "demo")
def demo(
    path: Annotated[str | None, typer.Argument(
        help="'pretrain': prepare -> pretrain -> final/ -> masked-word export -> served answer, on the bundled corpus."
    )] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the export and answers.")] = None,
    repo: Annotated[Path, typer.Option(help="Triton model repository to build.")] = Path("triton_models"),
    serve: Annotated[bool, typer.Option(help="Start tritonserver and query it over HTTP and gRPC.")] = True,
):
    """End to end: all-MiniLM-L6-v2 export -> predict -> Triton -> live queries; `demo pretrain`: the training path."""
    if path == "pretrain":
        from bertops.pretrain_demo import run_pretrain_demo

        run_pretrain_demo(out_dir or Path("runs/demo-pretrain"), say=lambda msg: out.print(msg, highlight=False,
                          soft_wrap=True), serve=serve)
        return
    if path is not None:
        from bertops.errors import BertopsError

        raise BertopsError(f"unknown demo {path!r}; run `bertops demo` or `bertops demo pretrain`")
    from bertops.demo import run_demo

    say = lambda msg: out.print(msg, highlight=False, soft_wrap=True)  # noqa: E731
    run_demo(out_dir or Path("runs/demo"), repo, say=say, serve=serve)
