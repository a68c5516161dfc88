"""``bertops.Estimator``: one object that trains, evaluates, predicts and exports a task's model (TensorFlow's design).

>>> est = bertops.Estimator(task=bertops.tasks.TOKEN_CLASSIFICATION.name, model="all-MiniLM-L6-v2", config=cfg,
...                         out_dir="runs/pos")                                   # doctest: +SKIP
>>> est.train("train.conll", eval_input="dev.conll", epochs=2)  # dev picks final/  # doctest: +SKIP
>>> est.evaluate("test.conll")          # {"loss": ..., "accuracy": ..., "f1": ...} # doctest: +SKIP
>>> est.predict(["John lives in Paris."])  # [{"entities": [...], "truncated": False}] # doctest: +SKIP
>>> est.export("exports/pos")           # ONNX + parity gate                       # doctest: +SKIP

The user passes things in; nothing is subclassed. ``task`` is a registered task name (a new task is a
:class:`bertops.tasks.Task` built from functions -- head, loss, metrics, collate, post-processing --
and registered with :func:`bertops.tasks.register_task`). Inputs are a data file (CSV / TSV / JSONL
with :class:`~bertops.data.labeled.Columns`, CoNLL or JSONL tokens/tags) or an input function (a
callable returning an iterable of example dicts). Hardware is not the caller's concern: ``train``
runs the DeepSpeed engine in this process, or on every rank when the script runs under the
``deepspeed`` launcher.

``predict`` runs the PyTorch model and then the task's own ``postprocess``, the function
``bertops.infer`` and the Triton ensemble call, so its answers (label names, entity spans with
character offsets) are the served ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bertops.config import Config, apply_overrides, config_from_dict, load_config
from bertops.data.labeled import Columns, example_kind, examples_from
from bertops.errors import BertopsError
from bertops.tasks import Task, get_task

Input = str | Path | Callable[[], Iterable[dict]] | Sequence[dict]


class TorchSession:
    """The ``session.run(names, feeds)`` call of onnxruntime, answered by a PyTorch model (fp32, eval)."""

    def __init__(self, model):
        self.model = model.eval()

    def run(self, names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            out = self.model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return [out[n].float().numpy() for n in names]


def load_torch_predictor(model_dir: str | Path, task: str | None = None, max_length: int | None = None):
    """A fine-tuned (HF-layout) folder -> a :class:`bertops.infer.Predictor` running PyTorch.

    ``task`` defaults to the one recorded in the folder's config.json (``finetuning_task``).
    """
    from bertops.artifacts import task_info, trained_length
    from bertops.checkpoint import load_model, resolve_model_dir
    from bertops.finetune.heads import trained_task
    from bertops.infer import DEFAULT_MAX_LENGTH, Predictor
    from bertops.tokenizer import load_tokenizer

    folder = resolve_model_dir(model_dir)
    name = task or trained_task(folder)
    if not name:
        raise BertopsError(f"{folder} does not say which task it was fine-tuned for; pass --task")
    spec = get_task(name)
    model, cfg = load_model(folder, spec.name)
    info = task_info(folder, cfg.labels() if spec.needs_labels else ())
    max_length = max_length or trained_length(folder) or DEFAULT_MAX_LENGTH
    return Predictor(TorchSession(model), load_tokenizer(folder), spec, info, max_length)


class Estimator:
    """Train / evaluate / predict / export one task's model. See the module docstring."""

    def __init__(
        self,
        task: str | Task,
        model: str | Path,
        config: Config | str | Path | None = None,
        *,
        out_dir: str | Path | None = None,
        columns: Columns | None = None,
        new_head: bool = False,
        deepspeed: str | None = None,
        overrides: Sequence[str] = (),
        pooling: str = "auto",
    ):
        from bertops.checkpoint import resolve_model_dir

        name = task.name if isinstance(task, Task) else task
        self.task = get_task(name)
        if isinstance(task, Task) and task.build_model is not self.task.build_model:
            raise BertopsError(f"task {name!r} is not the registered one; register it with bertops.tasks.register_task")
        self.model_dir = resolve_model_dir(model)
        if isinstance(config, Config):
            self.config = config_from_dict(apply_overrides(config.to_dict(), overrides)) if overrides else config
        else:
            self.config = load_config(config, overrides)
        self.out_dir = Path(out_dir or self.config.train.output_dir)
        self.columns, self.new_head, self.deepspeed = columns or Columns(), new_head, deepspeed
        self.pooling = pooling  # a new sequence-classification head: "auto" (the encoder's own), "cls" or "mean"
        self.kind = example_kind(self.task)
        self.result = None  # the last train() result
        self._predictor = None

    # --- inputs -----------------------------------------------------------------------------------

    def examples(self, source: Input) -> list[dict]:
        """A file, an input function or a list of dicts -> checked example dicts for this task."""
        return examples_from(source, self.kind, self.columns)

    # --- the four verbs ---------------------------------------------------------------------------

    def train(self, input: Input, eval_input: Input | None = None, *, test_input: Input | None = None,
              epochs: float | None = None, resume: str | None = None):
        """Fine-tune from ``model`` into ``out_dir``; afterwards this estimator predicts with ``out_dir/final``.

        ``eval_input`` is validation data: scored at every checkpoint, it picks ``final/``. ``test_input``
        is scored once, on ``final/`` after training, and picks nothing (``result.test``, a ``test_*``
        row in metrics.jsonl). Returns :class:`bertops.finetune.run.FinetuneResult` (steps, evals, best,
        test, timings).
        """
        from bertops.finetune.run import finetune

        train_examples = self.examples(input)
        eval_examples = self.examples(eval_input) if eval_input is not None else None
        test_examples = self.examples(test_input) if test_input is not None else None
        result = finetune(self.config, self.task.name, self.model_dir, train_examples, eval_examples, self.out_dir,
                          ds_config_path=self.deepspeed, resume=resume, new_head=self.new_head, epochs=epochs,
                          test_examples=test_examples, pooling=self.pooling)
        self.result, self.model_dir, self._predictor = result, result.final_dir, None
        return result

    def evaluate(self, input: Input, batch_size: int | None = None, max_length: int | None = None) -> dict[str, float]:
        """The task's metrics (and mean loss) of the current model on ``input``, in this process (fp32).

        Texts are cut at ``max_length`` tokens (default ``data.max_seq_len`` of the config)."""
        from bertops.finetune.loop import eval_batch_size, evaluate_folder

        if self.task.metrics is None or self.task.collate is None:
            raise BertopsError(f"task {self.task.name} has no metrics / collate; it cannot be evaluated")
        size = batch_size or eval_batch_size(self.config)
        length = max_length or self.config.data.max_seq_len
        return evaluate_folder(self.model_dir, self.task, self.examples(input), length, size)

    def predict(self, texts: Sequence[str], pairs: Sequence[str] | None = None, batch_size: int = 32) -> list[dict]:
        """Answers of the task's post-processing, one dict per text (the same as bertops.infer and Triton)."""
        if self._predictor is None:
            self._predictor = load_torch_predictor(self.model_dir, self.task.name)
        return self._predictor.predict(list(texts), None if pairs is None else list(pairs), batch_size)

    def export(self, out_dir: str | Path, **options: Any) -> dict:
        """ONNX export of the current model through the parity gate (:func:`bertops.export.export_onnx`)."""
        from bertops.export import export_onnx

        return export_onnx(self.model_dir, self.task.name, out_dir, **options)
