"""Engine checkpoints in RUN_DIR/checkpoints: save with a manifest, find the newest intact one, resume.

A checkpoint is DeepSpeed's own tag folder (``global_stepN``: model states, ZeRO partitions, the
optimiser and LR-scheduler state) plus, written by rank 0 once every rank has finished:

* ``bertops_checkpoint.json`` — step, data position, phase, world size, ZeRO stage, precision, the
  model config, and the size and SHA-256 of every file in the folder;
* ``tokenizer/`` — the tokenizer the shards were made with, so a tag folder converts on its own.

Only then is ``latest`` rewritten (atomically). A folder without its manifest (killed while
saving) or whose files no longer match it (truncated, overwritten, bit rot) is named and skipped,
and the previous intact checkpoint is used. The client state inside DeepSpeed's model-states file
carries every rank's RNG states (python, numpy, torch, CUDA), gathered at save time.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertops.errors import BertopsError

MANIFEST = "bertops_checkpoint.json"
LATEST = "latest"
TOKENIZER_DIR = "tokenizer"
TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


@dataclass(frozen=True)
class Found:
    """An intact checkpoint and the bad ones newer than it (named in the run log)."""

    tag: str | None
    meta: dict[str, Any]
    skipped: tuple[str, ...]  # "global_step30: file ... is 1234 bytes, manifest says 5678"
    broken: tuple[str, ...] = ()  # the tags of those


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(tag_dir: Path) -> dict[str, dict]:
    out = {}
    for p in sorted(tag_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(tag_dir).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    return out


def write_manifest(ckpt_dir: Path, tag: str, meta: dict[str, Any], tokenizer_dir: Path, keep: int) -> None:
    """Rank 0, after every rank's save returned: tokenizer copy, manifest, ``latest``, pruning."""
    from bertops.checkpoint import copy_tokenizer_files

    tag_dir = ckpt_dir / tag
    (tag_dir / TOKENIZER_DIR).mkdir(exist_ok=True)
    copy_tokenizer_files(tokenizer_dir, tag_dir / TOKENIZER_DIR)
    body = dict(meta, tag=tag, files=_files(tag_dir))
    tmp = tag_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    tmp.replace(tag_dir / MANIFEST)
    tmp = ckpt_dir / (LATEST + ".tmp")
    tmp.write_text(tag, encoding="utf-8")
    tmp.replace(ckpt_dir / LATEST)
    for old in tags(ckpt_dir)[:-keep]:
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def tags(ckpt_dir: Path) -> list[str]:
    """Tag folders, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))]
    return [name for _, name in sorted(found)]


def verify(tag_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """(manifest, "") for an intact checkpoint folder, else (None, what is wrong)."""
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return None, f"{tag_dir.name}: no {MANIFEST} (the run stopped while saving it)"
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, f"{tag_dir.name}: {MANIFEST} is not valid JSON"
    for name, want in meta.get("files", {}).items():
        p = tag_dir / name
        if not p.is_file():
            return None, f"{tag_dir.name}: {name} is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return None, f"{tag_dir.name}: {name} is {size} bytes, the manifest says {want['size']} (truncated)"
        if _sha256(p) != want["sha256"]:
            return None, f"{tag_dir.name}: {name} does not match its SHA-256 in the manifest (corrupt)"
    return meta, ""


def find_resumable(ckpt_dir: Path, tag: str | None = None) -> Found:
    """The newest intact checkpoint (or exactly ``tag``), with the names of broken newer ones."""
    candidates = [tag] if tag else list(reversed(tags(ckpt_dir)))
    skipped, broken = [], []
    for name in candidates:
        if not (ckpt_dir / name).is_dir():
            raise BertopsError(f"{ckpt_dir} has no checkpoint {name}; it has {', '.join(tags(ckpt_dir)) or 'none'}")
        meta, problem = verify(ckpt_dir / name)
        if meta is not None:
            return Found(name, meta, tuple(skipped), tuple(broken))
        skipped.append(problem)
        broken.append(name)
    return Found(None, {}, tuple(skipped), tuple(broken))


def set_aside(ckpt_dir: Path, broken: tuple[str, ...]) -> list[str]:
    """Rename broken tag folders to ``TAG.broken-N`` so the resumed run's saves never mix with their files."""
    moved = []
    for name in broken:
        n = 1
        while (ckpt_dir / f"{name}.broken-{n}").exists():
            n += 1
        (ckpt_dir / name).rename(ckpt_dir / f"{name}.broken-{n}")
        moved.append(f"{name}.broken-{n}")
    return moved


def resume_point(ckpt_dir: Path, resume: str | None, is_main: bool, say) -> Found:
    """Where a run resumes (every rank gets rank 0's answer): ``resume`` is "auto", a tag, or empty.

    Broken newer checkpoints are named in the run log and set aside, so later saves never mix with them.
    """
    from bertops.train.dist import barrier, broadcast_object

    if not resume:
        return Found(None, {}, ())
    found = broadcast_object(find_resumable(ckpt_dir, None if resume == "auto" else resume) if is_main else None)
    for problem in found.skipped:
        say(f"checkpoint {problem}; skipping it")
    if found.broken and is_main:
        say(f"set aside as {', '.join(set_aside(ckpt_dir, found.broken))}")
    barrier()
    return found


def check_same_model(meta: dict[str, Any], model: dict[str, Any], tag: str) -> None:
    """A checkpoint resumes only into the architecture that wrote it."""
    free = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "attn_implementation")
    for key, saved in meta.get("model", {}).items():
        if key not in free and model.get(key) != saved:
            raise BertopsError(
                f"checkpoint {tag} was trained with model.{key}={saved!r}, this config says {model.get(key)!r}; "
                f"resume with the same model section or pass another --out"
            )


def resolve_checkpoint(path: str | Path) -> tuple[Path, str, dict[str, Any]]:
    """RUN_DIR/checkpoints or RUN_DIR/checkpoints/TAG (or RUN_DIR) -> (tag folder, tag, manifest)."""
    path = Path(path)
    if (path / "checkpoints").is_dir() and not tags(path):
        path = path / "checkpoints"
    if TAG_RE.match(path.name) and path.is_dir():
        meta, problem = verify(path)
        if meta is None:
            raise BertopsError(f"checkpoint {problem}; pick another tag folder")
        return path, path.name, meta
    if not path.is_dir():
        raise BertopsError(f"{path} does not exist; pass RUN_DIR/checkpoints or RUN_DIR/checkpoints/global_stepN")
    found = find_resumable(path)
    if found.tag is None:
        why = "; ".join(found.skipped) or "no global_stepN folders"
        raise BertopsError(f"{path} holds no intact checkpoint ({why})")
    return path / found.tag, found.tag, found.meta


# --- RNG state ------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
