"""Pretraining with DeepSpeed: ``pretrain()`` runs it; the modules hold one concern each.

dsconfig (DeepSpeed config + precision), dist (process group, launcher watch), optim (AdamW/LAMB,
LR schedule), engine (deepspeed.initialize), objectives (the pretraining task's loss and metrics),
loop (micro-steps, logging, eval), metrics (metrics.jsonl, TensorBoard, curves.png), checkpoints
(save, verify, resume), convert (checkpoint -> HF folder), run (``pretrain`` itself).
"""

from __future__ import annotations


def pretrain(*args, **kwargs):
    """See :func:`bertops.train.run.pretrain` (imported on call: torch and DeepSpeed load only then)."""
    from bertops.train.run import pretrain as run

    return run(*args, **kwargs)
