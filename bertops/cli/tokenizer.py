"""``bertops tokenizer``: train or inspect WordPiece tokenizers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from bertops.cli._common import command, group, out
from bertops.errors import BertopsError

app = group("Train or inspect WordPiece tokenizers.")
ADVANCED = "Advanced"


@command(app, "train")
def train(
    input: Annotated[list[Path], typer.Option("--input", "-i", help="Text files to learn from (repeatable).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for tokenizer.json, vocab.txt, configs.")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size, special tokens included.")] = 30522,
    lowercase: Annotated[bool, typer.Option(help="Lowercase text first (uncased model).")] = True,
    strip_accents: Annotated[
        bool | None,
        typer.Option(help="Strip accents; default: strip when lowercasing, as BERT does.", rich_help_panel=ADVANCED),
    ] = None,
    min_frequency: Annotated[int, typer.Option(help="Drop merges seen fewer times.", rich_help_panel=ADVANCED)] = 2,
):
    """Train a BERT WordPiece tokenizer (CJK characters split, BERT's accent handling)."""
    from bertops.tokenizer import load_tokenizer, train_tokenizer

    path = train_tokenizer(input, out_dir, vocab_size, lowercase, strip_accents, min_frequency)
    tok = load_tokenizer(path)
    out.print(f"wrote {path} (vocab {tok.get_vocab_size()})")


@command(app, "encode")
def encode(
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
