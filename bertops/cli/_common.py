"""Pieces every command module shares: the one-line error wrapper, consoles, common option types."""

from __future__ import annotations

import enum
import functools
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from bertops.errors import BertopsError

console = Console(stderr=True)  # progress, status and errors
out = Console()  # results


def one_line_errors(fn):
    """Turn a BertopsError into one line on stderr and its exit code (1; a run stopped by a signal: 128 + the
    signal); anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BertopsError as exc:
            colour = "red" if exc.exit_code == 1 else "yellow"
            console.print(f"[bold {colour}]{exc.label}:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def command(group: typer.Typer, *args, **kwargs):
    """``group.command`` with :func:`one_line_errors` applied."""

    def deco(fn):
        return group.command(*args, **kwargs)(one_line_errors(fn))

    return deco


def group(help: str) -> typer.Typer:
    """A command group (``bertops GROUP ...``); shows its help when called bare."""
    return typer.Typer(help=help, no_args_is_help=True)


def pick(value, default):
    """A flag the user gave wins; otherwise the config's value (whose default lives in bertops.config)."""
    return default if value is None else value


def config_default(key: str) -> str:
    """``"config export.opset: 17"``: where a flag's default comes from, read off the config dataclasses."""
    from bertops.config import Config

    section, name = key.split(".")
    value = getattr(getattr(Config(), section), name)
    return f"config {key}: {value}"


def task_names() -> list[str]:
    """Every registered task, in registration order (the registry is the only place task names are spelled)."""
    from bertops.tasks import task_names as registered

    return list(registered())


def choices(name: str, values) -> type[enum.Enum]:
    """An Enum typer shows as ``[a|b|c]`` and checks; ``.value`` is the plain string."""
    return enum.Enum(name, {v: v for v in values}, type=str)


def value(choice):
    """The string behind a :func:`choices` member (``None`` stays ``None``)."""
    return None if choice is None else choice.value


ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (see bertops/configs/).")]
ModelDir = Annotated[
    str, typer.Option("--model", "-m", help="Checkpoint folder (bertops or HF layout), or a bundled model name.")
]
