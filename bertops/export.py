"""Checkpoint -> fused, parity-checked ONNX graph (``bertops export onnx``).

Two exporter paths, picked by opset:

* **14-17 (17 is the default): TorchScript + onnxruntime's BERT fusion.** The eager model is traced
  with ``torch.onnx.export(..., dynamo=False)`` and ``onnxruntime.transformers.optimizer`` rewrites
  it into one ``com.microsoft`` Attention per layer plus SkipLayerNormalization,
  EmbedLayerNormalization and BiasGelu. These are the kernels onnxruntime (and Triton's
  onnxruntime backend) is fastest with.
* **23-25: torch.export (dynamo) exporter.** With the sdpa implementation it emits the standard
  ONNX ``Attention`` op (opset 23) per layer natively; no python fusion pass is needed.

Other opsets are refused: the dynamo exporter at 18-22 leaves attention unfused, and opset 26
produced an invalid file with the toolchain this was built against.

Every export must fuse exactly one attention node per layer, keep the input/output names
``input_ids, attention_mask, token_type_ids -> <task outputs>``, and match PyTorch within
``atol`` (1e-4 fp32) on real padded sentences; otherwise a one-line :class:`BertopsError` is raised
and no ``model.onnx`` is left in ``out_dir`` (``bertops.artifacts.write_export`` moves it in last).

Gotchas handled here (they cost silent unfused or wrong graphs otherwise):

* ``torch.onnx.export`` restores the *wrapper's* training flag after tracing, and a freshly built
  ``nn.Module`` wrapper is in training mode: that switches the wrapped model into training mode
  (dropout on) for everything that runs afterwards. The wrapper is put in eval mode and the model
  is put back into eval mode after every export.
* onnxruntime's attention fusion looks for the *first* ``Mul`` feeding the score ``Add`` as the
  mask multiply. ``bertops.model.eager_attention`` scales scores with ``* scale`` (a Mul), which the
  fuser then takes for the mask and gives up: zero Attention nodes. For export the scores are
  divided by ``sqrt(head_size)`` instead (HF's classic BERT form, matched as a Div); same maths.
* onnxruntime's CPU kernel for the standard ``Attention`` op does not broadcast an attention mask of
  shape (B, 1, 1, T) over the query axis ("inconsistent q_sequence_length"), although the ONNX spec
  allows it. For the dynamo path the additive mask is expanded to (B, 1, T, T) before sdpa.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bertops.artifacts import check_exportable, path_under, task_info, trained_length, writable_out_dir, write_export
from bertops.checkpoint import check_checkpoint_dir, load_model
from bertops.config import ExportConfig
from bertops.data.corpus import bundled_sentences as sentences
from bertops.errors import BertopsError
from bertops.infer import ort_session, physical_cores
from bertops.model import ATTENTION_FUNCTIONS, BertSelfAttention
from bertops.numerics import compare, io_signature, median_ms, node_counts, worst
from bertops.precision import INPUT_NAMES, Candidate, check_structure, get_precision
from bertops.tasks import Task, get_task
from bertops.tokenizer import encode, load_tokenizer

TORCHSCRIPT_OPSETS = range(14, 18)  # TorchScript exporter + onnxruntime.transformers fusion
DYNAMO_OPSETS = range(23, 26)  # torch.export-based exporter, standard ONNX Attention op
DEFAULT_OPSET = ExportConfig.opset
FP32_ATOL = ExportConfig.parity_atol

Progress = Callable[[str], None] | None


# --- export-time attention variants (see the module docstring) --------------------------------------


def _fusable_eager_attention(q, k, v, bias, dropout_p: float, scale: float) -> torch.Tensor:
    """Eager attention with the scores *divided* by sqrt(head size): onnxruntime's fuser pattern."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    return torch.matmul(torch.softmax(scores + bias, dim=-1), v)


def _ort_sdpa_attention(q, k, v, bias, dropout_p: float, scale: float) -> torch.Tensor:
    """sdpa with the (B, 1, 1, T) mask expanded to (B, 1, T, T): onnxruntime's CPU Attention kernel
    does not broadcast the query axis of the mask."""
    mask = bias.to(q.dtype).expand(-1, -1, q.size(2), -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@contextlib.contextmanager
def _attention(model: nn.Module, fn: Callable) -> Iterator[None]:
    """Swap every layer's attention function for the duration of the block."""
    layers = [m for m in model.modules() if isinstance(m, BertSelfAttention)]
    saved = [m.attend for m in layers]
    for m in layers:
        m.attend = fn
    try:
        yield
    finally:
        for m, f in zip(layers, saved):
            m.attend = f


class _Named(nn.Module):
    """Tensor-positional wrapper: the exporters get a plain tuple in ONNX output order."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids, attention_mask, token_type_ids)
        return tuple(out[n] for n in self.names)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter / fuser noise (deprecation notices, tracer warnings, INFO fusion logs)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _say(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


# --- checks -----------------------------------------------------------------------------------------


def check_opset(opset: int) -> str:
    """-> "torchscript" or "dynamo"; a BertopsError naming the supported ranges otherwise."""
    if opset in TORCHSCRIPT_OPSETS:
        return "torchscript"
    if opset in DYNAMO_OPSETS:
        return "dynamo"
    ranges = f"use {DEFAULT_OPSET} (default; 14-17 work) or 23-25"
    if opset < TORCHSCRIPT_OPSETS.start:
        raise BertopsError(f"opset {opset} is too old for fused attention; {ranges}")
    if opset < DYNAMO_OPSETS.start:
        raise BertopsError(f"opset {opset} exports without fused attention (onnxruntime does not fuse it); {ranges}")
    raise BertopsError(f"opset {opset} is newer than this toolchain exports correctly; {ranges}")


# --- export paths -----------------------------------------------------------------------------------


def _dynamic_axes(task: Task) -> dict[str, dict[int, str]]:
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    for name in task.outputs:
        axes[name] = {0: "batch", 1: "sequence"} if name in task.per_token else {0: "batch"}
    return axes


def _example(tok, max_seq_len: int) -> tuple[torch.Tensor, ...]:
    """Two real, differently long sentences: batch and sequence are >1 so neither gets specialised."""
    arrays = encode(tok, sentences(2), max_length=max_seq_len).arrays()
    return tuple(torch.from_numpy(arrays[n]) for n in INPUT_NAMES)


def _export_torchscript(model, cfg, task, tok, opset, max_seq_len, raw_path: Path, out_path: Path):
    """Trace (eager, Div-scaled scores) -> ONNX -> onnxruntime BERT fusion. Returns the fused OnnxModel."""
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    wrapper = _Named(model, task.outputs).eval()
    try:
        with _quiet(), _attention(model, _fusable_eager_attention), torch.no_grad():
            torch.onnx.export(
                wrapper,
                _example(tok, max_seq_len),
                str(raw_path),
                input_names=list(INPUT_NAMES),
                output_names=list(task.outputs),
                dynamic_axes=_dynamic_axes(task),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        model.eval()
    options = FusionOptions("bert")
    # The raw 0/1 mask (int32) goes into each Attention node. The default for "bert", MaskIndexEnd,
    # turns the mask into one length per row and is only right for right-padded input; the raw mask
    # is exact for any padding (right, left, holes) and measured no slower on CPU.
    options.attention_mask_format = AttentionMaskFormat.AttentionMask
    with _quiet():
        fused = optimize_model(
            str(raw_path),
            model_type="bert",
            num_heads=cfg.num_attention_heads,
            hidden_size=cfg.hidden_size,
            optimization_options=options,
        )
        fused.save_model_to_file(str(out_path))
    return fused


def _export_dynamo(model, cfg, task, tok, opset, max_seq_len, out_path: Path):
    """torch.export -> ONNX with the standard Attention op. Returns an OnnxModel around the file."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapper = _Named(model, task.outputs).eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    seq = torch.export.Dim("sequence", min=1, max=cfg.max_position_embeddings)
    try:
        with _quiet(), _attention(model, _ort_sdpa_attention), torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                _example(tok, max_seq_len),
                input_names=list(INPUT_NAMES),
                output_names=list(task.outputs),
                dynamic_shapes={name: {0: batch, 1: seq} for name in INPUT_NAMES},
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
            program.save(str(out_path))
    except BertopsError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BertopsError(
            f"the dynamo exporter failed at opset {opset} ({first[:200]}); use --opset {DEFAULT_OPSET}"
        ) from None
    finally:
        model.eval()
    return OnnxModel(onnx.load(str(out_path)))


# --- parity and latency -----------------------------------------------------------------------------


def parity_batches(tok, task: Task, max_seq_len: int) -> list[dict[str, np.ndarray]]:
    """3 right-padded batches of 16 real sentences of mixed length; the last is sentence pairs for
    tasks that take pairs (``Task.pairs``: token_type_ids 1 exercised)."""
    texts = sentences(64)
    batches = [encode(tok, texts[0:16], max_length=max_seq_len), encode(tok, texts[16:32], max_length=max_seq_len)]
    if task.pairs:
        batches.append(encode(tok, texts[32:48], pairs=texts[48:64], max_length=max_seq_len))
    else:
        batches.append(encode(tok, texts[32:48], max_length=max_seq_len))
    return [b.arrays() for b in batches]


def gate_parity(figures: dict[str, dict[str, float]], atol: float, what: str) -> None:
    name, value = worst(figures)
    if not value <= atol:  # also catches NaN
        raise BertopsError(
            f"{what} parity failed: {name} differs from PyTorch by {value:.3g} (max abs, real "
            f"tokens) > {atol:g}; nothing was written; retry with --opset {DEFAULT_OPSET} --precision fp32"
        )


def latency_inputs(tok, max_seq_len: int) -> dict[str, dict[str, np.ndarray]]:
    """``b1xT``: one row of real text exactly T=max_seq_len tokens long (no padding);
    ``b8``: 8 real sentences, right-padded to the longest."""
    long_text = " ".join(sentences(40))
    one = encode(tok, [long_text], max_length=max_seq_len, pad_to=max_seq_len).arrays()
    eight = encode(tok, sentences(72)[64:72], max_length=max_seq_len).arrays()
    return {f"b1x{max_seq_len}": one, "b8": eight}


def measure_latency(model, session, tok, max_seq_len: int, runs: int = 5) -> dict[str, Any]:
    """Median ms of PyTorch eager / sdpa (fp32) vs onnxruntime on this machine. A few seconds."""
    out: dict[str, Any] = {"runs": runs, "torch_threads": torch.get_num_threads()}
    for label, batch in latency_inputs(tok, max_seq_len).items():
        tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
        row: dict[str, Any] = {"shape": list(batch["input_ids"].shape)}
        for impl in ("eager", "sdpa"):
            with _attention(model, ATTENTION_FUNCTIONS[impl]), torch.inference_mode():
                row[f"torch_{impl}_ms"] = median_ms(lambda: model(**tensors), runs)
        row["onnxruntime_ms"] = median_ms(lambda: session.run(None, batch), runs, warmup=2)
        row["speedup_vs_torch_eager"] = round(row["torch_eager_ms"] / row["onnxruntime_ms"], 2)
        out[label] = row
    return out


# --- the library entry point ------------------------------------------------------------------------


def export_onnx(
    model_dir: str | Path,
    task: str,
    out_dir: str | Path,
    precision: str = ExportConfig.precision,
    opset: int = DEFAULT_OPSET,
    max_seq_len: int = ExportConfig.max_seq_len,
    progress: Progress = None,
    *,
    atol: float = FP32_ATOL,
    config: ExportConfig | None = None,
) -> dict[str, Any]:
    """Export the checkpoint in ``model_dir`` as ``task`` to ``out_dir``; return the report.

    ``out_dir`` receives the export folder (:mod:`bertops.artifacts`: model.onnx, tokenizer files,
    config.json, labels.json, task_plugin.py, export_report.json) only once every check passed.
    ``task`` is any registered task's name. ``progress`` gets step messages. ``config`` carries the
    accuracy-gate limits and int8 options of reduced precisions (:mod:`bertops.precision`).
    """
    import onnx
    import onnxruntime as ort

    task_name, task = task, get_task(task)
    check_exportable(task)
    to_precision = get_precision(precision)
    path = check_opset(int(opset))
    model_dir = check_checkpoint_dir(model_dir)
    out_dir = writable_out_dir(out_dir)

    started = time.perf_counter()
    _say(progress, f"loading {model_dir} as {task_name}")
    impl = "eager" if path == "torchscript" else "sdpa"
    model, cfg = load_model(model_dir, task_name, attn_implementation=impl)
    if not 8 <= max_seq_len <= cfg.max_position_embeddings:
        raise BertopsError(
            f"max_seq_len={max_seq_len} is out of range for this model; use 8..{cfg.max_position_embeddings}"
        )
    tok = load_tokenizer(model_dir)

    created = next((p for p in reversed((out_dir, *out_dir.parents)) if not p.exists()), None)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BertopsError(f"cannot write to {out_dir} ({exc.strerror}); pass an output folder you can write to") from None
    partial = out_dir / f".model.onnx.partial-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="bertops-export-") as tmp:
        tmp = Path(tmp)
        try:
            fp32_path = tmp / "model.fp32.onnx"
            if path == "torchscript":
                _say(progress, f"exporting with the TorchScript exporter (opset {opset})")
                raw_path = tmp / "raw.onnx"
                om = _export_torchscript(model, cfg, task, tok, opset, max_seq_len, raw_path, fp32_path)
                raw_nodes = len(onnx.load(str(raw_path), load_external_data=False).graph.node)
                exporter = f"torch.onnx.export(dynamo=False) + onnxruntime.transformers.optimizer (opset {opset})"
            else:
                _say(progress, f"exporting with the dynamo exporter (opset {opset}, standard Attention op)")
                om = _export_dynamo(model, cfg, task, tok, opset, max_seq_len, fp32_path)
                raw_nodes = len(om.model.graph.node)
                exporter = f"torch.onnx.export(dynamo=True) with sdpa (opset {opset})"

            _say(progress, "checking the graph")
            fp32_model = onnx.load(str(fp32_path))
            onnx.checker.check_model(fp32_model, full_check=True)
            fused = check_structure(fp32_model, task, cfg, path, "fp32")
            counts = node_counts(fp32_model)

            batches = parity_batches(tok, task, max_seq_len)
            n_seq = sum(len(b["input_ids"]) for b in batches)
            _say(progress, f"parity: PyTorch vs onnxruntime CPU on {n_seq} real sentences")
            session = ort_session(fp32_path)
            figures = compare(model, session, task, batches)
            gate_parity(figures, atol, "fp32")

            parity: dict[str, Any] = {
                "atol": atol,
                "sequences": n_seq,
                "batches": [list(b["input_ids"].shape) for b in batches],
                "pairs": task.pairs,
                "reference": f"bertops PyTorch model ({impl} attention, fp32, eval)",
                "compared_on": "real tokens for per-token outputs (max_abs); padded positions in max_abs_all_positions",
                "outputs": figures,
            }

            candidate = Candidate(fp32_path, partial, om, model, task, cfg, tok, task_info(model_dir, cfg.labels()), path,
                                  batches, max_seq_len, config or ExportConfig(), progress,
                                  eval_length=trained_length(model_dir) or 0)
            extra = to_precision(candidate)
            parity.update(extra.pop("parity", {}))
            final_model = fp32_model if precision == "fp32" else onnx.load(str(partial), load_external_data=False)

            _say(progress, "measuring latency (PyTorch eager / sdpa vs onnxruntime)")
            # The fp32 graph is timed (fp16 is for CUDA; bench/inference.py times int8 beside fp32).
            latency = measure_latency(model, session, tok, max_seq_len)
            latency["onnxruntime_graph"] = "fp32"
            latency["onnxruntime_threads"] = physical_cores()
            latency["device"] = "cpu"

            report: dict[str, Any] = {
                "task": task.name,
                "model_dir": str(model_dir),
                "opset": opset,
                "precision": precision,
                "exporter": exporter,
                "exporter_path": path,
                "attention_mask_format": (
                    "raw 0/1 mask (any padding)" if path == "torchscript" else "additive, (B,1,T,T)"
                ),
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_attention_heads": cfg.num_attention_heads,
                "hidden_size": cfg.hidden_size,
                "raw_node_count": raw_nodes,
                "node_counts": node_counts(final_model),
                "fp32_node_counts": counts,
                "fused": fused,
                "io": io_signature(final_model),
                "parity": parity,
                "latency": latency,
                "versions": {
                    "torch": torch.__version__,
                    "onnx": onnx.__version__,
                    "onnxruntime": ort.__version__,
                },
                "model_bytes": partial.stat().st_size,
            }
            if path == "dynamo":
                import onnxscript

                report["versions"]["onnxscript"] = onnxscript.__version__
            report.update(extra)

            _say(progress, f"writing {out_dir}")
            report["seconds"] = round(time.perf_counter() - started, 2)
            write_export(out_dir, partial, task=task, model_dir=model_dir, labels=cfg.labels(), report=report)
        except BaseException as exc:
            if created is not None:  # nothing half-written: drop the folder this call created
                shutil.rmtree(created, ignore_errors=True)
            if isinstance(exc, OSError) and path_under(exc.filename, out_dir):
                raise BertopsError(
                    f"cannot write to {out_dir} ({exc.strerror}); pass an output folder you can write to"
                ) from None
            raise
        finally:
            partial.unlink(missing_ok=True)
    return report
