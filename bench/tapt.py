"""Task-adaptive pretraining, then fine-tuning, against the TF-IDF baseline: the BBC figures of docs/BENCHMARKS.md.

Gururangan et al. (2020) continue an encoder's masked-LM training on the task's own *training* texts
(labels unused) before fine-tuning. This runs that recipe with bertops' own commands and picks the
model the way BERT's authors did on small data sets -- several fine-tuning restarts, the best on
validation -- so the one test figure it reports is chosen by nothing but validation:

  1. ``bertops data prepare`` on the training split (512 tokens, dupe factor 10, seed --data-seed);
  2. ``bertops pretrain --init-from MODEL`` for --steps steps (batch 64, lr 1e-4, 6% warm-up, seed
     --pretrain-seed); --steps 0 skips 1-2 and fine-tunes MODEL itself (the baseline rows);
  3. one ``bertops finetune`` per --seeds value (512 tokens, 6 epochs, lr 5e-5, batch 16), --parallel
     of them side by side (a GPU holds several);
  4. the run with the best validation accuracy (ties: the lower validation loss) -- its ``final/``
     is the finetune's own best checkpoint -- is the pick; every run's test figure is shown, the
     pick's is compared with the TF-IDF + logistic regression baseline (bench/tfidf_baseline.py,
     whole articles, its settings chosen on the same validation split).

    python bench/tapt.py                       # BBC, 1,800 steps, [CLS] heads, seeds 0-3 (a GPU: ~5 min)
    python bench/tapt.py --steps 0 --out runs/tapt-none       # the same fine-tunes from the shipped weights
    python bench/tapt.py --quick               # a few steps of everything, to check the pipeline on a CPU

Every step resumes (``--resume auto``), so an interrupted run goes on where it stopped; SIGTERM or
Ctrl-C lets the running pretraining or fine-tune save its current step first. Writes
OUT/summary.json and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def bertops() -> list[str]:
    return [shutil.which("bertops") or str(Path(sys.executable).parent / "bertops")]


CHILDREN: list[subprocess.Popen] = []
LOCK = threading.RLock()  # CHILDREN and STOPPING: fine-tune threads vs the signal handler (main thread, re-entrant)
STOPPING = False


def _running(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # reaped already
        return False


def stop_children(signum, _frame) -> None:
    """SIGTERM / SIGINT: no new bertops process starts; the running ones save their step and stop (at most 5 min).

    They get SIGTERM: after Ctrl-C, which reaches them as SIGINT too, another kind of signal (bertops.train.stop
    lets the same kind twice stop at once, as a second Ctrl-C or a second SIGTERM to this does)."""
    global STOPPING
    import time

    with LOCK:
        STOPPING = True
        alive = [p.pid for p in CHILDREN if _running(p.pid)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 300
    while alive and time.time() < deadline:  # os.waitpid, not Popen.wait: the interrupted wait holds Popen's lock
        alive = [pid for pid in alive if _running(pid)]
        time.sleep(0.2)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    os._exit(128 + signum)


def run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    with LOCK:
        if STOPPING:
            sys.exit("stopping")
        with log.open("ab") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        CHILDREN.append(proc)
    rc = proc.wait()
    if rc:
        sys.exit(f"{' '.join(cmd[:3])} ... failed (exit {rc}); see {log}")


def best_row(metrics: Path) -> dict:
    """The finetune's own pick (the first best validation accuracy) and the run's test row."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval_accuracy" in r]
    best = max(evals, key=lambda r: r["eval_accuracy"])  # max() keeps the first of equal ones
    test = [r for r in rows if "test_accuracy" in r][-1]
    return {"step": best["step"], "validation_accuracy": best["eval_accuracy"], "validation_loss": best["eval_loss"],
            "test_accuracy": test["test_accuracy"], "test_macro_f1": test["test_macro_f1"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="bbc-news", help="a `bertops data fetch` name, or a folder with "
                    "train.jsonl / validation.jsonl / test.jsonl")
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--out", type=Path, default=Path("runs/tapt"))
    ap.add_argument("--steps", type=int, default=1800, help="pretraining steps (0: no TAPT)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="fine-tuning restarts")
    ap.add_argument("--data-seed", type=int, default=1, help="`data prepare --seed` (the pairings)")
    ap.add_argument("--pretrain-seed", type=int, default=1)
    ap.add_argument("--pooling", default="cls", choices=("auto", "cls", "mean"))
    ap.add_argument("--parallel", type=int, default=1, help="fine-tunes side by side")
    ap.add_argument("--workers", type=int, default=None, help="`data prepare --workers`")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check the pipeline, not the figures")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, stop_children)
    signal.signal(signal.SIGINT, stop_children)

    from tfidf_baseline import baseline, read, split_paths

    from bertops.checkpoint import resolve_model_dir
    from bertops.data.prepare import prepare

    paths = split_paths(args.data)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    length, epochs, batch, steps = (64, 1, 4, min(args.steps, 4)) if args.quick else (512, 6, 16, args.steps)
    if args.quick:  # the first rows of each split
        for split, path in paths.items():
            small = out / f"quick-{split}.jsonl"
            small.write_text("".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:24]))
            paths[split] = small
    model = resolve_model_dir(args.model)

    start = str(model)
    if steps:
        shards = out / "shards"
        if not (shards / "manifest.json").is_file():
            prepare([paths["train"]], model, shards, seq_len=length, seed=args.data_seed, eval_fraction=0.02,
                    dupe_factor=2 if args.quick else 10, workers=args.workers or max(1, (os.cpu_count() or 2) - 1),
                    progress=False)
        pb = 4 if args.quick else 64
        if not (out / "tapt" / "final" / "model.safetensors").is_file():
            run([*bertops(), "pretrain", "-c", str(ROOT / "bertops/configs/pretrain-small.yaml"), "--init-from", start,
                 "--data", str(shards), "--out", str(out / "tapt"), "--resume", "auto", f"train.max_steps={steps}",
                 f"train.global_batch_size={pb}", f"train.micro_batch_size={pb}", "train.learning_rate=1e-4",
                 f"train.warmup_steps={steps * 6 // 100 + 1}", f"train.eval_every={max(1, steps // 3)}",
                 "train.eval_batches=2", f"train.save_every={max(1, steps // 6)}", "train.keep_checkpoints=2",
                 f"train.log_every={steps // 15 + 1}", f"train.seed={args.pretrain_seed}"], out / "tapt.log")
        start = str(out / "tapt" / "final")

    def finetune(seed: int) -> dict:
        run_dir = out / f"ft-{args.pooling}-{seed}"
        if not (run_dir / "final" / "model.safetensors").is_file() or not (run_dir / "metrics.jsonl").is_file():
            env = {**os.environ, "MASTER_PORT": str(29700 + seed)}
            run([*bertops(), "finetune", "--task", "sequence-classification", "--model", start, "--new-head",
                 "--pooling", args.pooling, "--train", str(paths["train"]), "--eval", str(paths["validation"]),
                 "--test", str(paths["test"]), "--out", str(run_dir), "--epochs", str(epochs), "--resume", "auto",
                 f"data.max_seq_len={length}", f"train.global_batch_size={batch}",
                 f"train.micro_batch_size={batch}", "train.learning_rate=5e-5",
                 f"train.warmup_steps={2 if args.quick else 30}", f"train.save_every={3 if args.quick else 49}",
                 f"train.seed={seed}"], out / f"ft-{args.pooling}-{seed}.log", env)
        return {"seed": seed, "run": str(run_dir), **best_row(run_dir / "metrics.jsonl")}

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        runs = list(pool.map(finetune, args.seeds))
    pick = max(runs, key=lambda r: (r["validation_accuracy"], -r["validation_loss"]))

    tfidf = baseline({s: read(p, "text", "label") for s, p in paths.items()})
    summary = {
        "data": args.data, "model": args.model, "pretraining_steps": steps, "pooling": args.pooling,
        "runs": runs, "pick": pick,
        "tfidf": {"chosen": tfidf["chosen"], "validation_accuracy": tfidf["validation"]["accuracy"],
                  "test_accuracy": tfidf["test"]["accuracy"]},
        "pick_above_tfidf": pick["test_accuracy"] > tfidf["test"]["accuracy"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for r in runs:
        print(f"seed {r['seed']}: final/ step {r['step']}  validation {r['validation_accuracy']:.4f} "
              f"(loss {r['validation_loss']:.4f})  test {r['test_accuracy']:.4f}"
              + ("   <- pick" if r is pick else ""))
    print(f"TF-IDF (whole texts, {tfidf['chosen']}): validation {tfidf['validation']['accuracy']:.4f}  "
          f"test {tfidf['test']['accuracy']:.4f}")
    print(json.dumps({k: summary[k] for k in ("pretraining_steps", "pick", "pick_above_tfidf")}))


if __name__ == "__main__":
    main()
