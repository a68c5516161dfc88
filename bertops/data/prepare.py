"""``bertops data prepare``: raw text -> tokenized NSP segment pairs in Parquet shards, with a manifest.

Pairs are built as BERT's ``create_pretraining_data.py`` builds them (50% actual next segment, 50%
from another document, ``short_seq_prob``, ``truncate_seq_pair``): see :mod:`bertops.data.pairs`.

Documents are processed in fixed chunks of ``documents_per_shard`` documents (one train and one eval
shard each); a chunk's random draws are seeded by ``(seed, chunk, purpose)``, so the output does not depend on
``workers``. Held-out eval documents are drawn per chunk (``eval_fraction``), and their pairs take
random segments only from other eval documents. Each training document is segmented and paired
``dupe_factor`` times over, each time anew (BERT's ``dupe_factor``: one fixed pairing is memorised
within a few passes); held-out documents are paired once. Whole documents are tokenized in batches with the
fast tokenizer (no special tokens), sentence boundaries are mapped from characters to tokens, and
the reader derives word starts from the ids.

Everything is written into a temporary sibling folder that is renamed to ``out_dir`` at the end, so
an interrupted or failed run leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from itertools import chain
from pathlib import Path

import numpy as np

from bertops.data.corpus import Document, Skips, expand_inputs, read_documents, sentence_starts
from bertops.data.pairs import DUPE_FACTOR, assemble, create_pairs
from bertops.data.shards import FORMAT, MANIFEST, TOKENIZER_SUBDIR, ids_dtype, tokenizer_hash, write_shard
from bertops.errors import BertopsError

SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
MIN_SEQ_LEN = 5  # [CLS] A [SEP] B [SEP] with one token each

_worker: dict = {}  # per-process tokenizer and settings


def _vocab_info(tok) -> dict:
    ids = {}
    for key, token in SPECIALS.items():
        i = tok.token_to_id(token)
        if i is None:
            raise BertopsError(f"the tokenizer has no {token} token; pretraining needs a BERT WordPiece vocabulary")
        ids[key] = i
    prefix = getattr(tok.model, "continuing_subword_prefix", None)
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True), "special_ids": ids, "continuation_prefix": prefix}


def _init_worker(settings: dict, tok=None) -> None:
    """Set up this process's tokenizer; a worker process gets it from its parent when forked."""
    from bertops.tokenizer import load_tokenizer

    if tok is None:  # a worker process: one per core already, so the tokenizer runs single-threaded
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        if _worker.get("settings") == settings:
            return
        tok = load_tokenizer(settings["tokenizer_dir"])
    info = _vocab_info(tok)
    _worker.update(settings=settings, tok=tok, info=info, dtype=ids_dtype(info["vocab_size"]))


def default_workers(cores: int | None = None) -> int:
    """Worker processes for ``cores`` CPUs (default: this machine's): 1 up to 2 cores, else one per core but one.

    One process already tokenizes on every core (the Rust thread pool of ``encode_batch``); only its
    sentence splitting, pairing and writing are serial. Worker processes make those parallel too but
    tokenize single-threaded and pay for shipping documents and results between processes: on a
    2-core machine 2 workers used more CPU for about the same wall time as 1, and were slower while
    other jobs loaded it (docs/BENCHMARKS.md, "Data preparation"). The main
    process reads the input and feeds the workers, hence one core fewer than the machine has.
    """
    cores = cores or os.cpu_count() or 1
    return 1 if cores <= 2 else cores - 1


def _eval_pick(n: int, fraction: float, rng: random.Random) -> set[int]:
    if fraction <= 0 or n < 4:
        return set()
    k = round(n * fraction)
    k = max(k, 2) if n >= 10 else k  # a small chunk still gives eval pairs that draw from 2+ documents
    return set(rng.sample(range(n), min(k, n - 2)))


def _process_chunk(job: tuple[int, int, list[tuple[str, str]]]) -> dict:
    """Split, tokenize, pair and write one chunk of documents (every one of :data:`STAGES`); its counts and shards."""
    for stage in STAGES:
        job = stage(job)
    return job


def _split_chunk(job: tuple[int, int, list[tuple[str, str]]]) -> dict:
    """A chunk's first stage: its documents' sentences; those with fewer than 2 are skipped."""
    chunk, first_doc, docs = job
    skips = Skips()
    texts: list[str] = []
    spans: list[list[tuple[int, int]]] = []
    kept: list[int] = []  # index into docs of each document with 2+ sentences
    language = _worker["settings"]["language"]
    for k, (text, source) in enumerate(docs):
        sentences = sentence_starts(text, language)
        if len(sentences) < 2:
            skips.add("one_sentence_document" if sentences else "empty_document", source)
            continue
        texts.append(text)
        spans.append(sentences)
        kept.append(k)
    return {"chunk": chunk, "first_doc": first_doc, "sources": [source for _, source in docs], "skips": skips,
            "input_chars": sum(len(t) for t, _ in docs), "kept": kept, "spans": spans, "texts": texts}


def _tokenize_chunk(job: dict) -> dict:
    """A chunk's second stage: ``encs``, the kept documents tokenized whole (as a plain batch encode would)."""
    texts = job.pop("texts")
    job["encs"] = _worker["tok"].encode_batch(texts, add_special_tokens=False) if texts else []
    return job


def _pair_chunk(job: dict) -> dict:
    """A chunk's last stage: sentence boundaries in tokens, NSP pairs, Parquet shards; its counts and shards."""
    st, info = _worker["settings"], _worker["info"]
    chunk, skips, encs = job["chunk"], job["skips"], job["encs"]
    tokens = np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=np.int32, count=sum(map(len, encs)))
    bounds: list[list[int]] = []
    doc_ids: list[int] = []
    base = 0
    # WordPiece never joins across the whitespace between sentences, so a sentence starts at the
    # token of its first character (or of the first one the normaliser keeps).
    for k, e, n, sentences in zip(job["kept"], encs, map(len, encs), job["spans"]):
        bd = [base]
        for lo, hi in sentences[1:]:
            t = e.char_to_token(lo)
            if t is None:
                t = next((t for c in range(lo + 1, hi) if (t := e.char_to_token(c)) is not None), None)
            if t is not None and 0 < t < n and base + t > bd[-1]:
                bd.append(base + t)
        if n > 0:
            bd.append(base + n)
        base += n
        if len(bd) < 3:
            skips.add("one_sentence_document", job["sources"][k])
            continue
        bounds.append(bd)
        doc_ids.append(job["first_doc"] + k)
    del encs, job["encs"]
    seed = st["seed"]
    picked = _eval_pick(len(bounds), st["eval_fraction"], random.Random(f"{seed}:{chunk}:eval-documents"))
    pools = {"train": [d for d in range(len(bounds)) if d not in picked], "eval": sorted(picked)}
    result = {"chunk": chunk, "documents": len(bounds), "sentences": sum(len(b) - 1 for b in bounds),
              "skips": skips, "splits": {}, "input_chars": job["input_chars"]}
    doc_map = np.asarray(doc_ids, dtype=np.int64)
    for split, pool in pools.items():
        if not pool:
            continue
        rng = random.Random(f"{seed}:{chunk}:{split}-pairs")
        # Training documents are segmented and paired dupe_factor times over (one rng stream, so each
        # pass draws new target lengths, split points and random-next partners); held-out documents
        # once, so the eval split's size and pairs do not depend on it.
        # A lone document (a tiny chunk's split) borrows random segments from the whole chunk.
        pairs = create_pairs(bounds, pool, st["seq_len"], st["short_seq_prob"], rng,
                             st["dupe_factor"] if split == "train" else 1,
                             random_pool=pool if len(pool) >= 2 else list(range(len(bounds))))
        if not len(pairs):
            continue
        ids_flat, offsets, a_length = assemble(tokens, pairs, info["special_ids"]["cls"], info["special_ids"]["sep"])
        cols = {"ids": ids_flat, "offsets": offsets,
                "a_length": a_length, "next_sentence_label": pairs.random_next, "doc": doc_map[pairs.doc],
                "sentence_a": pairs.sentence_a, "doc_b": doc_map[pairs.doc_b], "sentence_b": pairs.sentence_b}
        name = f"{split}-{chunk:05d}.parquet"
        try:
            rows = write_shard(Path(st["tmp_dir"]) / name, cols, _worker["dtype"])
        except OSError as exc:
            raise BertopsError(f"writing shard {name} failed ({exc.strerror or exc}); free disk space or pick another --out") from None
        result["splits"][split] = {"file": name, "examples": rows, "tokens": int(len(ids_flat)),
                                   "random_next": int(pairs.random_next.sum()), "documents": len(pool)}
    return result


def _chunks(docs, size: int):
    batch: list[tuple[str, str]] = []
    chunk = first = 0
    for n, d in enumerate(docs):
        if not batch:
            first = n
        batch.append((d.text, d.source))
        if len(batch) == size:
            yield chunk, first, batch
            chunk, batch = chunk + 1, []
    if batch:
        yield chunk, first, batch


def _check_args(inputs, tokenizer_dir, out_dir: Path, seq_len, workers, short_seq_prob, eval_fraction,
                documents_per_shard, dupe_factor, overwrite) -> list[Path]:
    if seq_len < MIN_SEQ_LEN:
        raise BertopsError(f"--seq-len {seq_len} is too small: [CLS] A [SEP] B [SEP] needs at least {MIN_SEQ_LEN} tokens")
    if workers < 1:
        raise BertopsError(f"--workers {workers} must be at least 1")
    if not 0 <= short_seq_prob <= 1 or not 0 <= eval_fraction < 1:
        raise BertopsError(f"--short-seq-prob {short_seq_prob} must be in [0, 1] and --eval-fraction {eval_fraction} in [0, 1)")
    if dupe_factor < 1:
        raise BertopsError(f"--dupe-factor {dupe_factor} must be at least 1 (1 = one pairing per document)")
    if documents_per_shard < 2:
        raise BertopsError(f"--documents-per-shard {documents_per_shard} must be at least 2")
    if not Path(tokenizer_dir).is_dir():
        raise BertopsError(f"tokenizer folder {tokenizer_dir} not found; pass a folder with tokenizer.json or vocab.txt")
    files = expand_inputs(inputs)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise BertopsError(f"--out {out_dir} exists and is not empty; pass a new folder (or --overwrite)")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BertopsError(f"cannot create {out_dir.parent} ({exc.strerror}); pick a writable --out") from None
    if not os.access(out_dir.parent, os.W_OK):
        raise BertopsError(f"{out_dir.parent} is not writable; pick a writable --out")
    return files


def prepare(
    inputs,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    seq_len: int = 128,
    *,
    workers: int = 1,
    text_field: str = "text",
    short_seq_prob: float = 0.1,
    seed: int = 12345,
    eval_fraction: float = 0.01,
    documents_per_shard: int = 2000,
    dupe_factor: int = DUPE_FACTOR,
    language: str = "en",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Prepare pretraining shards in ``out_dir`` from text/JSONL ``inputs``; returns the manifest written there."""
    from bertops.tokenizer import TOKENIZER_FILES, load_tokenizer

    out_dir = Path(out_dir)
    files = _check_args(inputs, tokenizer_dir, out_dir, seq_len, workers, short_seq_prob, eval_fraction,
                        documents_per_shard, dupe_factor, overwrite)
    tok = load_tokenizer(tokenizer_dir)
    info = _vocab_info(tok)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    settings = {"tokenizer_dir": str(tokenizer_dir), "seq_len": seq_len, "short_seq_prob": short_seq_prob,
                "seed": seed, "eval_fraction": eval_fraction, "dupe_factor": dupe_factor, "language": language,
                "tmp_dir": str(tmp)}
    skips = Skips()
    started = time.perf_counter()
    try:
        tmp.mkdir()
        results = _run(read_documents(files, text_field, skips), settings, tok, workers, documents_per_shard,
                       sum(f.stat().st_size for f in files), progress)
        manifest = _manifest(results, skips, files, info, tokenizer_hash(tok), settings, documents_per_shard,
                             text_field, time.perf_counter() - started)
        if 0 < manifest["counts"]["documents"] < 2:
            raise BertopsError("only one usable document: random-next segments need at least two documents of two or more sentences")
        if manifest["counts"]["examples"] == 0:
            skipped = ", ".join(f"{r} {v['count']}" for r, v in manifest["skipped"].items()) or "none"
            raise BertopsError(
                f"no pretraining pairs could be made: the inputs need documents of two or more sentences (skipped: {skipped})"
            )
        (tmp / TOKENIZER_SUBDIR).mkdir()
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / TOKENIZER_SUBDIR / name)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        tmp.rename(out_dir)
    except OSError as exc:
        where = exc.filename or out_dir
        raise BertopsError(f"{where}: {exc.strerror or exc}; check the inputs are readable and --out has free space") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


STAGES = (_split_chunk, _tokenize_chunk, _pair_chunk)
"""A chunk's stages in order: a worker process runs them one after another, one worker pipelines them."""


def _run(docs, settings: dict, tok, workers: int, per_shard: int, total_bytes: int, show: bool) -> list[dict]:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    results: list[dict] = []
    columns = [TextColumn("prepare"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[examples]} pairs"),
               TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), disable=not show, transient=False) as bar:
        task = bar.add_task("prepare", total=max(total_bytes, 1), examples=0)

        def done(r: dict) -> None:
            results.append(r)
            n = sum(s["examples"] for s in r["splits"].values())
            bar.update(task, advance=r["input_chars"], examples=bar.tasks[0].fields["examples"] + n)

        _init_worker(settings, tok)  # forked workers inherit it
        if workers == 1:
            # A pipeline of one thread per stage: chunk k is tokenized (encode_batch releases the GIL
            # and runs on every core) while chunk k - 1 is paired and written and chunk k + 1 split
            # into sentences (Python, one core). Whole chunks in two threads fell into step (both
            # tokenizing, then both in Python, a core idle ~20% of the time). Each chunk seeds its
            # own RNG streams, so the shards are the same as one chunk after the other.
            stages = STAGES
            threads = [ThreadPoolExecutor(1) for _ in stages]
            try:
                pending = []
                for job in _chunks(docs, per_shard):
                    fut = threads[0].submit(stages[0], job)
                    for thread, stage in zip(threads[1:], stages[1:]):
                        fut = thread.submit(lambda stage=stage, prev=fut: stage(prev.result()))
                    pending.append(fut)
                    while len(pending) > len(stages):  # bounded: the corpus is never all in memory
                        done(pending.pop(0).result())
                for fut in pending:
                    done(fut.result())
            finally:
                for thread in threads:
                    thread.shutdown(cancel_futures=True)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(settings,)) as pool:
                pending = []
                for job in _chunks(docs, per_shard):
                    pending.append(pool.submit(_process_chunk, job))
                    while len(pending) >= 2 * workers:  # bounded: the corpus is never all in memory
                        done(pending.pop(0).result())
                for fut in pending:
                    done(fut.result())
        bar.update(task, completed=max(total_bytes, 1))
    _worker.clear()
    return sorted(results, key=lambda r: r["chunk"])


def _manifest(results, skips: Skips, files, info, tok_hash, settings, per_shard, text_field, seconds) -> dict:
    for r in results:
        skips.merge(r["skips"])
    splits = {}
    for split in ("train", "eval"):
        shards = [r["splits"][split] for r in results if split in r["splits"]]
        splits[split] = {"documents": sum(s["documents"] for s in shards),
                         "pairings_per_document": settings["dupe_factor"] if split == "train" else 1,
                         "examples": sum(s["examples"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                         "random_next": sum(s["random_next"] for s in shards),
                         "shards": [{"file": s["file"], "examples": s["examples"]} for s in shards]}
    examples = sum(s["examples"] for s in splits.values())
    random_next = sum(s["random_next"] for s in splits.values())
    return {
        "format": FORMAT,
        "seq_len": settings["seq_len"],
        "ids_dtype": ids_dtype(info["vocab_size"]),
        "tokenizer": {"hash": tok_hash, **info, "files": TOKENIZER_SUBDIR},
        "counts": {
            "documents": sum(r["documents"] for r in results),
            "sentences": sum(r["sentences"] for r in results),
            "examples": examples,
            "tokens": sum(s["tokens"] for s in splits.values()),
            "is_next": examples - random_next,
            "random_next": random_next,
            "skipped": sum(skips.counts.values()),
        },
        "skipped": skips.as_dict(),
        "splits": splits,
        "settings": {k: settings[k] for k in ("seed", "short_seq_prob", "eval_fraction", "dupe_factor", "language")}
        | {"documents_per_shard": per_shard, "text_field": text_field},
        "inputs": [{"path": str(f), "bytes": f.stat().st_size} for f in files],
        "seconds": round(seconds, 3),
    }


def iter_documents(inputs, text_field: str = "text") -> tuple[list[Document], Skips]:
    """All documents of ``inputs`` with the skips met while reading (for tests and benchmarks)."""
    skips = Skips()
    return list(read_documents(inputs, text_field, skips)), skips
