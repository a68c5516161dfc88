"""The DeepSpeed config a run uses: the user's ds_config JSON plus what bertops injects, and the precision choice.

``ds_configs/*.json`` hold DeepSpeed-only settings (ZeRO stage, offload, buckets). Everything that is
an optimisation decision — batch sizes, learning rate and schedule, clipping, precision — comes from
the bertops config and is injected here; a ds_config that sets one of those is refused, so the two
files can never disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertops.config import TrainConfig
from bertops.errors import BertopsError
from bertops.runtimes import bf16_unsupported, cpu_flags, cpu_name

# Keys whose value comes from the bertops config -> the bertops key that sets it.
REFUSED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (train.micro_batch_size x ranks)",
    "optimizer": "train.optimizer and train.learning_rate",
    "scheduler": "train.warmup_steps and train.lr_schedule",
    "gradient_clipping": "train.gradient_clipping",
    "amp": "train.precision",
}
PRECISION_SECTIONS = ("bf16", "bfloat16", "fp16")  # may tune loss scaling, never switch precision on/off


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32", "bf16" or "fp16"
    reason: str  # one line for the run log: why this precision



def resolve_precision(requested: str, device: str) -> Precision:
    """``auto`` -> bf16 where the hardware computes it natively, else fp32; explicit choices are checked."""
    import torch

    if device == "cuda":
        major, _ = torch.cuda.get_device_capability()
        native_bf16 = major >= 8
        where = f"{torch.cuda.get_device_name()} (sm_{major}x)"
    else:
        native_bf16 = bf16_unsupported(cpu_flags()) is None
        where = f"{cpu_name()} ({'AVX512-BF16/AMX' if native_bf16 else 'no AVX512-BF16 or AMX'})"
    if requested == "auto":
        if native_bf16:
            return Precision("bf16", f"precision auto -> bf16: {where} has native bf16")
        return Precision("fp32", f"precision auto -> fp32: {where} lacks native bf16 (it would run slower than fp32)")
    if requested == "fp16" and device == "cpu":
        if not torch.ops.mkldnn._is_mkldnn_fp16_supported():
            raise BertopsError(f"train.precision=fp16 needs a CPU with AVX512-FP16 or a GPU; {where} has neither; "
                               "use train.precision=auto")
    note = "" if requested != "bf16" or native_bf16 else " (emulated: slower than fp32 on this hardware)"
    return Precision(requested, f"precision {requested} (as configured) on {where}{note}")


AUTO = "auto"
# What ``auto`` (the default ``train.ds_config``) picks: ZeRO-2 shards optimizer state and gradients
# across ranks, which on one rank saves nothing and costs its bookkeeping (gradient hooks, partition
# copies, an fp64 gradient norm): 11-26% of a one-process CPU step (docs/BENCHMARKS.md).
AUTO_CONFIGS = {"one rank": ("ds_configs/zero0.json", 0), "several ranks": ("ds_configs/zero2.json", 2)}


def choose_ds_config(setting: str | Path | None, world_size: int) -> tuple[dict[str, Any], str]:
    """The ds_config for ``setting`` (a JSON path, ``auto``, or empty) and a line for the run log saying which.

    ``auto``: ZeRO-0 on one rank, ZeRO-2 on several (``ds_configs/`` beside the package, or the bare
    stage where the package is installed without it). Changing the rank count of a run therefore
    changes its stage too; resuming across rank counts already rebuilds the fp32 weights from any
    stage (``bertops.train.convert``), so nothing else changes.
    """
    if str(setting or "") != AUTO:
        return load_ds_config(setting), f"DeepSpeed config {setting or '(built in: ZeRO stage 0)'}"
    which = "one rank" if world_size == 1 else "several ranks"
    path, stage = AUTO_CONFIGS[which]
    try:
        raw = load_ds_config(path)
    except BertopsError:  # an installed package without the source tree's ds_configs/
        raw, path = {"zero_optimization": {"stage": stage}}, f"ZeRO stage {stage}, built in"
    return raw, f"DeepSpeed config auto -> {path} ({which}; pass --deepspeed to choose)"


def load_ds_config(path: str | Path | None) -> dict[str, Any]:
    """Read a ds_config JSON and refuse the keys bertops owns. ``None`` or "" -> ZeRO stage 0 defaults."""
    if not path:
        return {"zero_optimization": {"stage": 0}}
    path = Path(path)
    if not path.is_file():
        packaged = Path(__file__).resolve().parents[2] / path  # ds_configs/ beside the package (source checkouts)
        if path.is_absolute() or not packaged.is_file():
            raise BertopsError(f"DeepSpeed config {path} does not exist; pass one of ds_configs/*.json")
        path = packaged
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BertopsError(f"{path} is not valid JSON ({exc}); fix the file") from None
    if not isinstance(raw, dict):
        raise BertopsError(f"{path} must hold a JSON object of DeepSpeed settings")
    check_ds_config(raw, str(path))
    return raw


def check_ds_config(raw: dict[str, Any], where: str = "the DeepSpeed config") -> None:
    for key, owner in REFUSED_KEYS.items():
        if key in raw:
            raise BertopsError(
                f"{where} sets {key!r}, which comes from the bertops config ({owner}); delete it from the JSON"
            )
    for section in PRECISION_SECTIONS:
        if isinstance(raw.get(section), dict) and "enabled" in raw[section]:
            raise BertopsError(
                f"{where} sets {section}.enabled; precision comes from train.precision; delete 'enabled' from the JSON"
            )
    stage = zero_stage(raw)
    if stage not in (0, 1, 2, 3):
        raise BertopsError(f"{where}: zero_optimization.stage={stage!r} is not one of 0, 1, 2, 3")


def zero_stage(raw: dict[str, Any]) -> int:
    return (raw.get("zero_optimization") or {}).get("stage", 0)


def offloads_optimizer(raw: dict[str, Any]) -> bool:
    device = ((raw.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    return device not in (None, "none")


def build_ds_config(
    raw: dict[str, Any], train: TrainConfig, precision: Precision, world_size: int, micro_batch_size: int
) -> dict[str, Any]:
    """The dict handed to ``deepspeed.initialize``: user settings + injected batch, clipping, precision."""
    cfg = json.loads(json.dumps(raw))
    accum = train.global_batch_size // (micro_batch_size * world_size)
    cfg["train_batch_size"] = train.global_batch_size
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = accum
    cfg["gradient_clipping"] = train.gradient_clipping
    cfg.setdefault("steps_per_print", 10**9)  # bertops logs; DeepSpeed's own progress lines stay off
    for section in PRECISION_SECTIONS:
        cfg.setdefault(section, {})
    cfg.pop("bfloat16", None)
    cfg["bf16"]["enabled"] = precision.name == "bf16"
    cfg["fp16"]["enabled"] = precision.name == "fp16"
    if precision.name == "fp16":
        cfg["fp16"].setdefault("loss_scale", 0)  # 0 = dynamic loss scaling
        cfg["fp16"].setdefault("initial_scale_power", 16)
    if precision.name != "fp16":
        cfg.pop("fp16")
    if precision.name == "bf16":
        # bf16 has fp32's range, so DeepSpeed's per-parameter overflow scan (isfinite/amax/amin on every
        # gradient, every step) finds nothing loss scaling could fix; it made the ZeRO-2 step host-bound
        # and halved BERT-base throughput on an H200 (docs/BENCHMARKS.md). The loop checks the loss instead.
        cfg["bf16"].setdefault("check_grad_overflow", False)
    if precision.name != "bf16":
        cfg.pop("bf16")
    return cfg
