"""``bertops config``: show and validate configs (YAML + key=value overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bertops.cli._common import ConfigFile, command, group, out

app = group("Show and validate configs (YAML + key=value overrides).")

Overrides = Annotated[list[str] | None, typer.Argument(help="Overrides such as model.hidden_size=256.")]


@command(app, "show")
def show(config: ConfigFile = None, overrides: Overrides = None):
    """Print the resolved config (defaults + YAML + overrides) as YAML, after validation."""
    import yaml

    from bertops.config import load_config

    cfg = load_config(config, overrides or [])
    out.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="", highlight=False)


@command(app, "validate")
def validate(config: Annotated[Path, typer.Argument(help="YAML file to check.")], overrides: Overrides = None):
    """Check a config file; exit code 0 when valid."""
    from bertops.config import load_config

    load_config(config, overrides or [])
    out.print(f"{config}: valid")
