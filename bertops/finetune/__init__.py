"""Fine-tuning on the pretraining engine: task slots (objectives), starting heads, the loop, the run.

objectives (collate / loss / metrics of the built-in tasks), heads (checkpoint + task head + label
checks), loop (example order over ranks, steps, evaluation), run (``finetune()``: checkpoints, best,
final/). The user-facing object is :class:`bertops.Estimator` (bertops/estimator.py).
"""
