"""The CLI's shape: every command's --help is fast (no torch, onnxruntime or deepspeed imported) and task choices come from the registry."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from bertops.cli import app

runner = CliRunner()
HEAVY = ("torch", "onnxruntime", "openvino", "deepspeed", "onnx", "tritonclient", "bertops.export", "bertops.infer")

# Run `bertops ARGS --help` for each command path given in argv[1] (JSON), then report what got imported.
PROBE = """
import json, sys
from bertops.cli import app
paths, heavy, codes = json.loads(sys.argv[1]), json.loads(sys.argv[2]), []
for path in paths:
    try:
        app(args=[*path, "--help"], prog_name="bertops")
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps({"codes": codes, "imported": [m for m in heavy if m in sys.modules]}), file=sys.stderr)
"""


def _command_paths() -> dict[str, list[list[str]]]:
    """Top-level entry -> every command path under it, read off the assembled app."""
    root = typer.main.get_command(app)
    paths = {}
    for name, cmd in root.commands.items():
        paths[name] = [[name]] + [[name, sub] for sub in getattr(cmd, "commands", {})]
    return paths


def test_every_group_is_registered():
    assert set(_command_paths()) >= {"info", "tokenizer", "config", "checkpoint", "export", "predict", "demo",
                                     "triton", "serve", "client"}


@pytest.mark.parametrize("entry", sorted(_command_paths()))
def test_help_imports_no_heavy_module(entry):
    """`bertops ENTRY [SUB] --help` in a fresh interpreter exits 0 with none of torch/onnxruntime/deepspeed loaded."""
    paths = _command_paths()[entry]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(paths), json.dumps(HEAVY)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["codes"] == [0] * len(paths), proc.stdout
    assert report["imported"] == [], f"`bertops {entry} --help` imported {report['imported']}"
    assert "Usage: bertops" in proc.stdout


def test_console_script_help_is_fast_and_clean():
    exe = shutil.which("bertops")
    assert exe, "the bertops console script is installed with the package"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Commands" in proc.stdout and proc.stderr == ""
    bare = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert "Usage: bertops" in bare.stdout + bare.stderr  # no_args_is_help


def test_task_choices_come_from_the_registry():
    from bertops.cli.export import TaskName
    from bertops.tasks import task_names

    assert [m.value for m in TaskName] == list(task_names())
    result = runner.invoke(app, ["export", "onnx", "--model", "x", "--out", "y", "--task", "no-such-task"])
    assert result.exit_code == 2 and "no-such-task" in result.output
    assert "Traceback" not in result.output


def test_flag_defaults_are_read_from_the_config_dataclasses():
    from bertops.config import ExportConfig, ServeConfig

    def flat(args):  # help text without rich's wrapping and table borders
        return re.sub(r"[\s│]+", " ", runner.invoke(app, args).output)

    assert f"config export.opset: {ExportConfig().opset}" in flat(["export", "onnx", "--help"])
    assert f"config serve.http_port: {ServeConfig().http_port}" in flat(["serve", "--help"])
