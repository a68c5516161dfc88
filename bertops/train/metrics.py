"""A run's metrics: ``metrics.jsonl`` rows, TensorBoard events and ``curves.png`` (``bertops plot RUN_DIR``).

Training rows carry ``step loss mlm_loss nsp_loss mlm_accuracy nsp_accuracy lr grad_norm
tokens_per_s`` (means over the steps since the previous row; tokens are real, unpadded tokens
over all ranks); evaluation rows carry ``step eval_mlm_loss eval_nsp_loss eval_mlm_accuracy
eval_nsp_accuracy``. Only rank 0 writes. A resumed run first drops the rows after its checkpoint,
so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from bertops.errors import BertopsError

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TB_DIR = "tensorboard"
TRAIN_KEYS = ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "lr", "grad_norm", "tokens_per_s")
EVAL_KEYS = ("eval_mlm_loss", "eval_nsp_loss", "eval_mlm_accuracy", "eval_nsp_accuracy")


class Pace:
    """Time left at this process's own pace (evaluations and checkpoints included), for the run log's step lines."""

    def __init__(self, step: int, max_steps: int):
        self.began, self.first, self.max_steps = time.perf_counter(), step, max_steps

    def eta(self, step: int) -> str:
        """``"  eta 2h05m"`` (``""`` before the first step or after the last)."""
        done, left = step - self.first, self.max_steps - step
        if done <= 0 or left <= 0:
            return ""
        seconds = round((time.perf_counter() - self.began) / done * left)
        h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
        return f"  eta {h}h{m:02d}m" if h else f"  eta {m}m{s:02d}s" if m else f"  eta {s}s"


class MetricsLog:
    """Append-only rows in RUN_DIR/metrics.jsonl mirrored to TensorBoard; a no-op on ranks other than 0."""

    def __init__(self, run_dir: str | Path, enabled: bool, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run wrote after the checkpoint it resumes from
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(Path(run_dir) / TB_DIR), purge_step=purge)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        step = row["step"]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                group, _, name = key.partition("_") if key.startswith(("eval_", "test_")) else ("train", "", key)
                self.writer.add_scalar(f"{group}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_rows(path: str | Path) -> list[dict]:
    rows = []
    path = Path(path)
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill; the rows before it stand
    return rows


def truncate_after(path: Path, step: int) -> None:
    """Keep only rows up to ``step`` (rewritten atomically)."""
    if not path.exists():
        return
    kept = [r for r in read_rows(path) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(path)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``curves.png`` from ``metrics.jsonl``: losses, accuracies, learning rate and throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_rows(run_dir / METRICS_FILE)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_mlm_loss" in r]
    if not train and not evals:
        raise BertopsError(
            f"{run_dir / METRICS_FILE} has no metrics rows; pass a RUN_DIR that `bertops pretrain` wrote"
        )
    panels = [
        ("loss", [("loss", train, "train total"), ("mlm_loss", train, "train MLM"), ("nsp_loss", train, "train NSP"),
                  ("eval_mlm_loss", evals, "eval MLM"), ("eval_nsp_loss", evals, "eval NSP")]),
        ("accuracy", [("mlm_accuracy", train, "train MLM"), ("nsp_accuracy", train, "train NSP"),
                      ("eval_mlm_accuracy", evals, "eval MLM"), ("eval_nsp_accuracy", evals, "eval NSP")]),
        ("learning rate", [("lr", train, "lr")]),
        ("tokens / s", [("tokens_per_s", train, "tokens/s")]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, series) in zip(axes.flat, panels):
        for key, source, label in series:
            points = [(r["step"], r[key]) for r in source if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if key.startswith("eval_") else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out else run_dir / CURVES_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
