"""``bertops client``: query models served by ``bertops serve`` and print the answers as JSON."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from bertops.cli._common import command, group, out

app = group("Query models served by `bertops serve` (prints JSON).")

Url = Annotated[str | None, typer.Option("--url", "-u", help="HOST:PORT (default 127.0.0.1:8000 http, :8001 grpc).")]
Protocol = Annotated[str, typer.Option("--protocol", "-p", help="http or grpc.")]
Model = Annotated[str, typer.Option("--model", "-m", help="Served model name (bertops triton build --name).")]
Texts = Annotated[list[str], typer.Argument(help="Texts to send.")]


def _predict(url, protocol, model, texts, pairs=None) -> None:
    from bertops.client import Client

    with Client(url, protocol) as client:
        answers = client.predict(model, texts, pairs)
    out.print_json(json.dumps([{"text": t, **a} for t, a in zip(texts, answers)], ensure_ascii=False))


# Command names come from the function names (typer spells fill_mask as fill-mask).
@command(app)
def classify(texts: Texts, model: Model, url: Url = None, protocol: Protocol = "http",
             pair: Annotated[list[str] | None, typer.Option("--pair", help="Second text per text (repeat).")] = None):
    """Label each text, or each text pair (a classification model)."""
    _predict(url, protocol, model, texts, pair or None)


@command(app)
def ner(texts: Texts, model: Model, url: Url = None, protocol: Protocol = "http"):
    """Entity spans with character offsets (a token-tagging model)."""
    _predict(url, protocol, model, texts)


@command(app)
def embed(texts: Texts, model: Model, url: Url = None, protocol: Protocol = "http"):
    """Sentence embeddings (an embedding model)."""
    _predict(url, protocol, model, texts)


@command(app)
def fill_mask(texts: Texts, model: Model, url: Url = None, protocol: Protocol = "http"):
    """Top-k tokens for every [MASK] (a masked-language model)."""
    _predict(url, protocol, model, texts)
