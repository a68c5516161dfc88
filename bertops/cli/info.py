"""``bertops info``: versions and hardware the runtime sees."""

from __future__ import annotations

import json
import platform
from typing import Annotated

import typer

from bertops.cli._common import command, out

app = typer.Typer()


def runtime_info() -> dict:
    """Versions and hardware the runtime sees (what a bug report needs)."""
    import onnx
    import torch

    from bertops import __version__
    from bertops.runtimes import bf16_unsupported, cpu_flags

    try:
        import onnxruntime as ort

        ort_version, providers = ort.__version__, ort.get_available_providers()
    except ImportError:
        ort_version, providers = "not installed (pip install 'bertops[cpu]' or 'bertops[gpu]')", []
    try:
        import openvino

        ov_version = openvino.__version__.split("-")[0]
    except ImportError:
        ov_version = "not installed (pip install 'bertops[cpu]'; runs bf16 exports)"
    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except Exception as exc:  # deepspeed's import can fail on odd machines; info must still print
        ds_version = f"unavailable ({type(exc).__name__})"
    return {
        "bertops": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "bf16_cpu": bf16_unsupported(cpu_flags()) is None,  # AVX512-BF16 / AMX: `export onnx --precision bf16` works
        "onnx": onnx.__version__,
        "onnxruntime": ort_version,
        "onnxruntime_providers": providers,
        "openvino": ov_version,
        "deepspeed": ds_version,
    }


@command(app, "info")
def info(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False):
    """Print versions, whether CUDA is present, and onnxruntime's execution providers."""
    data = runtime_info()
    if as_json:
        out.print_json(json.dumps(data))
        return
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in data.items():
        table.add_row(f"[bold]{key}[/]", ", ".join(value) if isinstance(value, list) else str(value))
    out.print(table)
