"""The ``bertops`` command line: one module per command group, joined here; each parses options and calls the library.

Every command is wrapped by :func:`bertops.cli._common.one_line_errors`: a BertopsError becomes one
line on stderr and exit code 1 (a training run stopped by a signal: 128 + the signal). Heavy modules
(torch, onnxruntime, deepspeed) are imported inside the commands, so ``bertops --help`` stays fast.
"""

from __future__ import annotations

import sys

import typer

from bertops.cli import checkpoint, client, config, demo, export, info, predict, pretrain, serve, tokenizer, triton
from bertops.cli import finetune as finetune_group
from bertops.cli import data as data_group
from bertops.cli.info import runtime_info

__all__ = ["app", "main", "runtime_info"]

app = typer.Typer(
    help="bertops: BERT from raw text to a production inference endpoint.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
app.add_typer(info.app)  # top-level command: bertops info
app.add_typer(tokenizer.app, name="tokenizer")
app.add_typer(config.app, name="config")
app.add_typer(checkpoint.app, name="checkpoint")
app.add_typer(export.app, name="export")
app.add_typer(predict.app)  # bertops predict
app.add_typer(demo.app)  # bertops demo
app.add_typer(triton.app, name="triton")
app.add_typer(serve.app)  # bertops serve
app.add_typer(client.app, name="client")
app.add_typer(pretrain.app)  # bertops pretrain, bertops plot
app.add_typer(data_group.app, name="data")
app.add_typer(finetune_group.app)  # bertops finetune, bertops evaluate


def main() -> None:  # console-script entry point
    # The deepspeed launcher puts --local_rank=N before the command; the rank reads LOCAL_RANK instead.
    sys.argv[1:] = [a for a in sys.argv[1:] if not a.startswith(("--local_rank=", "--local-rank="))]
    sys.exit(app())
