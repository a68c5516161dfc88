"""Engine checkpoint -> HF-layout folder (config.json, model.safetensors, tokenizer files), any ZeRO stage.

ZeRO 1/2/3 checkpoints keep the fp32 master weights in per-rank partitions; DeepSpeed's own
``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` stitches them back
together, called in-process (its generated ``zero_to_fp32.py`` script would pull in huggingface_hub).
A stage-0 checkpoint holds the whole module in DeepSpeed's model-states file (in the training
precision: bf16/fp16 weights there are widened to fp32, not the optimiser's fp32 masters).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from bertops.errors import BertopsError


def fp32_state_dict(tag_dir: Path, zero_stage: int) -> dict:
    """Full fp32 weights of the checkpoint in ``tag_dir`` (HF parameter names), on the CPU."""
    import torch

    if zero_stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        quiet = io.StringIO()  # it prints progress lines and bars; the caller reports
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        file = tag_dir / "mp_rank_00_model_states.pt"
        if not file.is_file():
            raise BertopsError(f"{tag_dir} has no {file.name}; it is not a DeepSpeed checkpoint")
        state = torch.load(file, map_location="cpu", weights_only=False)["module"]  # written by this run's engine
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def model_from_checkpoint(tag_dir: Path, meta: dict):
    """The pretraining model with the checkpoint's weights loaded (eval mode, fp32, CPU)."""
    from bertops.checkpoint import TIED_KEYS
    from bertops.config import config_from_dict
    from bertops.tasks import PRETRAINING, get_task

    cfg = config_from_dict({"model": meta["model"]}).model
    model = get_task(meta.get("task", PRETRAINING.name)).build_model(cfg)  # fine-tuning checkpoints name their task
    state = fp32_state_dict(tag_dir, int(meta["zero_stage"]))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in TIED_KEYS]
    if missing:
        raise BertopsError(f"checkpoint {tag_dir} lacks weights (first: {missing[0]}); it is incomplete")
    return model.eval()


def convert_checkpoint(src: str | Path, out: str | Path) -> Path:
    """``bertops checkpoint convert RUN_DIR/checkpoints[/TAG] OUT``: write the HF folder ``out``."""
    from bertops.checkpoint import save_model
    from bertops.train.checkpoints import TOKENIZER_DIR, resolve_checkpoint

    tag_dir, _, meta = resolve_checkpoint(src)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BertopsError(f"{out} exists and is not empty; pass a new folder for the converted checkpoint")
    model = model_from_checkpoint(tag_dir, meta)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    save_model(model, tmp, tokenizer_dir=tag_dir / TOKENIZER_DIR)
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    return out
