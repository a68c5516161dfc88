"""``bertops finetune`` and ``bertops evaluate``: thin layers over :class:`bertops.Estimator`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from bertops.cli._common import ConfigFile, ModelDir, choices, command, out, task_names, value

app = typer.Typer()
DATA = "Data columns"
TaskName = choices("TaskName", task_names())

TextColumn = Annotated[str, typer.Option("--text-column", help="Column / JSON key of the text.", rich_help_panel=DATA)]
PairColumn = Annotated[str | None, typer.Option(
    "--text-pair-column", help="Column of the second text (pair classification; embeddings: text_pair).",
    rich_help_panel=DATA)]
LabelColumn = Annotated[str, typer.Option("--label-column", help="Column of the label.", rich_help_panel=DATA)]
TokensColumn = Annotated[str, typer.Option("--tokens-column", help="JSONL key of the token list (token tasks).",
                                           rich_help_panel=DATA)]
TagsColumn = Annotated[str, typer.Option("--tags-column", help="JSONL key of the tag list (token tasks).",
                                         rich_help_panel=DATA)]


def _columns(text, pair, label, tokens, tags):
    from bertops.data.labeled import Columns

    return Columns(text=text, text_pair=pair, label=label, tokens=tokens, tags=tags)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


@command(app, "finetune")
def finetune(
    task: Annotated[TaskName, typer.Option(help="The task to fine-tune for.")],
    model: ModelDir,
    train: Annotated[Path, typer.Option("--train", help="Training data: CSV / TSV / JSONL, or CoNLL for token tasks.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="OUT: metrics.jsonl, checkpoints/, best/, final/.")],
    eval_file: Annotated[Path | None, typer.Option(
        "--eval", help="Validation data (not the test split): evaluated at every checkpoint; the best one "
                       "becomes OUT/final.")] = None,
    test_file: Annotated[Path | None, typer.Option(
        "--test", help="Test data: scored once on OUT/final after training (a test_* row in metrics.jsonl); "
                       "chooses nothing.")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides such as train.learning_rate=5e-5.")] = None,
    config: ConfigFile = None,
    deepspeed: Annotated[str | None, typer.Option(
        "--deepspeed", help="DeepSpeed JSON: ZeRO stage, offload (default: config train.ds_config).")] = None,
    new_head: Annotated[bool, typer.Option(
        "--new-head", help="Replace a head that does not fit the task or the labels with a fresh one.")] = False,
    pooling: Annotated[str, typer.Option(
        help="What a new sequence-classification head reads: auto (the encoder's own: mean for sentence-transformers "
             "models, else [CLS]), cls or mean.")] = "auto",
    epochs: Annotated[float | None, typer.Option(help="Passes over --train (sets the step count; default: train.max_steps).")] = None,
    resume: Annotated[str | None, typer.Option(
        help="'auto': continue from the newest intact checkpoint in OUT; or a tag, global_stepN.")] = None,
    text_column: TextColumn = "text",
    text_pair_column: PairColumn = None,
    label_column: LabelColumn = "label",
    tokens_column: TokensColumn = "tokens",
    tags_column: TagsColumn = "tags",
    local_rank: Annotated[int | None, typer.Option("--local_rank", "--local-rank", hidden=True)] = None,
):
    """Fine-tune a checkpoint for a task with DeepSpeed. Same command alone or under `deepspeed --num_gpus N`."""
    from bertops.estimator import Estimator

    est = Estimator(value(task), model, config, out_dir=out_dir, new_head=new_head, deepspeed=deepspeed,
                    overrides=overrides or [], pooling=pooling,
                    columns=_columns(text_column, text_pair_column, label_column, tokens_column, tags_column))
    result = est.train(train, eval_file, test_input=test_file, epochs=epochs, resume=resume)
    if _rank() == 0:
        summary = {"final": str(result.final_dir), "steps": result.steps, "train_seconds": round(result.train_seconds, 1),
                   "seconds": round(result.seconds, 1), "best": result.best, "test": result.test}
        out.print(json.dumps(summary), highlight=False, soft_wrap=True)


@command(app, "evaluate")
def evaluate(
    model: ModelDir,
    data: Annotated[Path, typer.Option("--data", "-d", help="Labelled data in the format finetune reads.")],
    task: Annotated[TaskName | None, typer.Option(
        help="The model's task (default: finetuning_task in its config.json).")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides such as data.max_seq_len=256.")] = None,
    config: ConfigFile = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per forward pass.")] = None,
    text_column: TextColumn = "text",
    text_pair_column: PairColumn = None,
    label_column: LabelColumn = "label",
    tokens_column: TokensColumn = "tokens",
    tags_column: TagsColumn = "tags",
    max_length: Annotated[int | None, typer.Option(
        help="Tokens per text (default: the length the model was fine-tuned at, else data.max_seq_len).")] = None,
):
    """Print a model's metrics on labelled data as one JSON object."""
    from bertops.artifacts import trained_length
    from bertops.checkpoint import resolve_model_dir
    from bertops.errors import BertopsError
    from bertops.estimator import Estimator
    from bertops.finetune.heads import trained_task

    folder = resolve_model_dir(model)
    name = value(task) or trained_task(folder)
    if not name:
        raise BertopsError(f"{folder} does not say which task it was fine-tuned for; pass --task")
    est = Estimator(name, folder, config, overrides=overrides or [],
                    columns=_columns(text_column, text_pair_column, label_column, tokens_column, tags_column))
    if max_length is None and not _sets_max_seq_len(config, overrides or []):
        max_length = trained_length(folder)  # read texts as the model was trained, unless told otherwise
    out.print(json.dumps(est.evaluate(data, batch_size, max_length=max_length)), highlight=False, soft_wrap=True)


def _sets_max_seq_len(config: Path | None, overrides: list[str]) -> bool:
    """Whether the user chose data.max_seq_len (an override or the -c YAML)."""
    import yaml

    if any(o.replace(" ", "").startswith("data.max_seq_len=") for o in overrides):
        return True
    if config is None or not Path(config).is_file():
        return False
    raw = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    return isinstance(raw, dict) and "max_seq_len" in (raw.get("data") or {})
