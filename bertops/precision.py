"""Export precisions: one function per precision, turning the checked fp32 graph into the graph that ships.

``bertops.export`` exports and checks the fp32 graph first (fusion + PyTorch parity), then calls
``PRECISIONS[precision](candidate)``. A precision function writes ``candidate.out_path`` and returns
entries for ``export_report.json`` (a ``"parity"`` entry is merged into the report's parity section),
or raises a one-line :class:`BertopsError` (then nothing is written). A reduced precision that changes
numbers beyond float rounding gates itself with :func:`accuracy_gate` (the task's ``Task.gate``
against the fp32 graph on real text, :mod:`bertops.accuracy`).

Adding a precision is one function and one :func:`register_precision` call::

    def bf16(c: Candidate) -> dict:
        ...write c.out_path...
        reference = gate_reference(c, ort_session(c.fp32_path))     # fp32 answers on the gate text
        result, _ = accuracy_gate(c, reference, candidate_session)   # anything with .run(names, feeds)
        if not result.passed: raise BertopsError(...)                # one line: figures + the --gate-* option
        return {"bf16": {...}, "accuracy_gate": {"figures": result.figures, ...}}

    register_precision("bf16", bf16)
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bertops.accuracy import GateLimits, GateResult, Run
from bertops.config import ExportConfig, ModelConfig
from bertops.data.corpus import bundled_sentences
from bertops.errors import BertopsError
from bertops.numerics import compare, fused_counts, io_signature, node_counts
from bertops.tasks import Task, TaskInfo

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_OPSET = ExportConfig.opset
FP16_ATOL = 2e-2
# The gate's real text: the first GATE_ROWS bundled sentences, and for pair tasks also each of them
# paired with the one GATE_ROWS // 2 further on (256 rows: a 99% agreement gate then allows 2 flips,
# not 0 of 64). Rows from GATE_ROWS on are never seen at export (held out for tests and docs).
GATE_ROWS = 128
EVAL_GATE_ROWS = 512  # --eval-data texts the gate compares answers on (the metric uses the whole file)
GATE_BATCH = 16

Progress = Callable[[str], None] | None


@dataclass
class Candidate:
    """What a precision function gets: the checked fp32 graph and everything needed to gate against it."""

    fp32_path: Path  # the fused, parity-checked fp32 graph
    out_path: Path  # where the precision function writes the graph that ships
    fused: Any  # onnxruntime.transformers OnnxModel of the fp32 graph (fp16 converts it in place)
    model: Any  # the PyTorch model (eval mode), the parity reference
    task: Task
    cfg: ModelConfig
    tok: Any  # tokenizers.Tokenizer
    info: TaskInfo  # labels (and vocab) for the task's post-processing
    exporter_path: str  # "torchscript" or "dynamo"
    parity_batches: list[dict[str, np.ndarray]]
    max_seq_len: int
    config: ExportConfig = field(default_factory=ExportConfig)
    progress: Progress = None
    eval_length: int = 0  # tokens per text for --eval-data: the length the model was fine-tuned at (0: max_seq_len)
    # Read once per export, not once per gate attempt (the int8 fallback gates many candidates).
    _eval_examples: list | None = field(default=None, init=False, repr=False, compare=False)
    _gate_inputs: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress(msg)

    @property
    def limits(self) -> GateLimits:
        c = self.config
        return GateLimits(c.gate_min_mean_cosine, c.gate_min_cosine, c.gate_min_agreement, c.gate_max_drop)


PrecisionFn = Callable[[Candidate], dict[str, Any]]
PRECISIONS: dict[str, PrecisionFn] = {}
PRECHECKS: dict[str, Callable[[], None]] = {}  # run by get_precision: refuse before any export work


def register_precision(name: str, fn: PrecisionFn, precheck: Callable[[], None] | None = None) -> PrecisionFn:
    """``precheck`` (optional) raises a one-line BertopsError when this machine cannot produce the precision."""
    PRECISIONS[name] = fn
    if precheck is not None:
        PRECHECKS[name] = precheck
    return fn


def get_precision(name: str) -> PrecisionFn:
    """The precision function of ``name``, once its precheck (if any) passed on this machine."""
    if name not in PRECISIONS:
        raise BertopsError(f"precision {name!r} is unknown; use one of {', '.join(PRECISIONS)}")
    if name in PRECHECKS:
        PRECHECKS[name]()
    return PRECISIONS[name]


# --- structure --------------------------------------------------------------------------------------


def check_structure(model, task: Task, cfg: ModelConfig, path: str, where: str) -> dict[str, int]:
    """Names exactly as promised, int64 inputs, and one fused attention node per layer (plain or int8)."""
    got_in = [v.name for v in model.graph.input]
    got_out = [v.name for v in model.graph.output]
    if got_in != list(INPUT_NAMES) or got_out != list(task.outputs):
        raise BertopsError(
            f"the {where} graph has inputs {got_in} and outputs {got_out}, expected {list(INPUT_NAMES)} -> "
            f"{list(task.outputs)}; this is an exporter bug, retry with --opset {DEFAULT_OPSET}"
        )
    fused = fused_counts(model)
    if fused["attention"] != cfg.num_hidden_layers:
        raise BertopsError(
            f"the {path} export has {fused['attention']} fused attention nodes for {cfg.num_hidden_layers} layers "
            f"({where} graph); onnxruntime would run unfused attention, so it is refused; use --opset "
            f"{DEFAULT_OPSET} (TorchScript + onnxruntime fusion) or 23-25"
        )
    return fused


# --- the accuracy gate ------------------------------------------------------------------------------


def gate_texts(task: Task, rows: slice = slice(0, GATE_ROWS)) -> list[tuple[list[str], list[str] | None]]:
    """Real text for the gate, as (texts, pairs or None) groups: bundled sentences ``rows``, and for pair
    tasks the same sentences each paired with the one half the rows further on."""
    texts = bundled_sentences()[rows]
    groups: list[tuple[list[str], list[str] | None]] = [(texts, None)]
    if task.pairs:
        half = len(texts) // 2
        groups.append((texts, texts[half:] + texts[:half]))
    return groups


def gate_rows(task: Task) -> int:
    return sum(len(texts) for texts, _ in gate_texts(task))


def run_graph(session, task: Task, info: TaskInfo, tok, groups, max_length: int) -> Run:
    """A session's read outputs and post-processed answers on the ``gate_texts`` groups, GATE_BATCH rows a run."""
    from bertops.tokenizer import encode

    outputs, answers, masks = [], [], []
    for texts, pairs in groups:
        for lo in range(0, len(texts), GATE_BATCH):
            chunk = texts[lo : lo + GATE_BATCH]
            batch = encode(tok, chunk, None if pairs is None else pairs[lo : lo + GATE_BATCH], max_length=max_length)
            out = dict(zip(task.reads, session.run(list(task.reads), batch.arrays())))
            outputs.append(out)
            masks.append(batch.attention_mask)
            answers.extend(task.postprocess(out, batch.input_ids, batch.offsets, batch.word_ids, chunk, info))
    return Run(outputs, answers, masks)


def eval_texts(c: Candidate) -> list[tuple[list[str], list[str] | None]]:
    """The texts of ``--eval-data`` (up to EVAL_GATE_ROWS) as gate groups: a head fine-tuned on news is
    gated on news, not on general sentences it was never meant to read (where near-ties flip)."""
    from bertops.data.labeled import example_kind

    examples = eval_examples(c)[:EVAL_GATE_ROWS]
    if example_kind(c.task) == "tokens":
        return [([" ".join(ex["tokens"]) for ex in examples], None)]
    pairs = [ex.get("text_pair") for ex in examples]
    return [([ex["text"] for ex in examples], pairs if all(p is not None for p in pairs) else None)]


def eval_examples(c: Candidate) -> list[dict]:
    """The checked examples of ``config.eval_data`` (the fine-tuning formats), read on first use."""
    from bertops.data.labeled import example_kind, examples_from

    if c._eval_examples is None:
        c._eval_examples = examples_from(Path(c.config.eval_data), example_kind(c.task))
    return c._eval_examples


def gate_inputs(c: Candidate) -> tuple[list[tuple[list[str], list[str] | None]], int, str]:
    """(groups, tokens per text, description) the gate compares answers on: the ``--eval-data`` texts for
    heads with labels (classification, token classification) when it is given, else the bundled sentences."""
    if c._gate_inputs is None:
        c._gate_inputs = _gate_inputs(c)
    return c._gate_inputs


def _gate_inputs(c: Candidate) -> tuple[list[tuple[list[str], list[str] | None]], int, str]:
    if c.config.eval_data and c.task.needs_labels:
        groups = eval_texts(c)
        rows = sum(len(t) for t, _ in groups)
        length = c.eval_length or c.max_seq_len
        return groups, length, f"the first {rows} texts of {Path(c.config.eval_data).name} (--eval-data; max {length} tokens)"
    described = (f"bundled sentences 0-{GATE_ROWS - 1}{' alone and as pairs' if c.task.pairs else ''} "
                 f"({gate_rows(c.task)} rows, max {c.max_seq_len} tokens); the rest are never seen at export")
    return gate_texts(c.task), c.max_seq_len, described


def gate_reference(c: Candidate, session) -> Run:
    groups, length, _ = gate_inputs(c)
    return run_graph(session, c.task, c.info, c.tok, groups, length)


def accuracy_gate(c: Candidate, reference: Run, session) -> tuple[GateResult, Run]:
    """``Task.gate`` of the candidate ``session`` against the fp32 ``reference`` run on the gate inputs."""
    if c.task.gate is None:
        raise BertopsError(f"task {c.task.name} has no accuracy gate (Task.gate), so it cannot be exported below fp32; "
                           "export --precision fp32")
    got = gate_reference(c, session)
    return c.task.gate(reference, got, c.limits), got


def eval_scores(c: Candidate, session) -> dict[str, float]:
    """The task's metrics on ``config.eval_data`` (labelled file, the fine-tuning formats) through ``session``."""
    import torch

    from bertops.finetune.loop import evaluate
    from bertops.finetune.objectives import Collation

    task = c.task
    if task.metrics is None or task.collate is None or not task.main_metric:
        raise BertopsError(f"task {task.name} has no metrics, so --eval-data cannot be scored; drop --eval-data")
    examples = eval_examples(c)
    ctx = Collation(c.tok, tuple(c.info.labels), c.eval_length or c.max_seq_len)
    names = list(task.outputs)

    def forward(input_ids, attention_mask, token_type_ids) -> dict:
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
                 "token_type_ids": token_type_ids.numpy()}
        return {n: torch.from_numpy(v) for n, v in zip(names, session.run(names, feeds))}

    return evaluate(forward, task, examples, ctx, GATE_BATCH)


# --- fp32 and fp16 ----------------------------------------------------------------------------------


def fp32(c: Candidate) -> dict[str, Any]:
    shutil.copyfile(c.fp32_path, c.out_path)
    return {}


def fp16(c: Candidate) -> dict[str, Any]:
    """Weights and activations fp16; inputs/outputs keep their types (int64 in, fp32 out).

    The fused graph (com.microsoft ops) needs onnxruntime's symbolic shape inference for the type
    information; the dynamo graph needs ONNX's own (the symbolic one does not know the opset-23
    Attention op and would print "failed in shape inference").
    """
    import onnx
    import onnxruntime as ort

    from bertops.export import _quiet, gate_parity
    from bertops.infer import ort_session

    c.say("converting to fp16")
    with _quiet(), contextlib.redirect_stdout(io.StringIO()):
        c.fused.convert_float_to_float16(keep_io_types=True, use_symbolic_shape_infer=c.exporter_path == "torchscript")
        c.fused.save_model_to_file(str(c.out_path))
    final = onnx.load(str(c.out_path))
    onnx.checker.check_model(final, full_check=True)
    check_structure(final, c.task, c.cfg, c.exporter_path, "fp16")
    if any(v["dtype"] != "float32" for v in io_signature(final)["outputs"]):
        raise BertopsError("the fp16 graph's outputs are not float32; this is a bug, export fp32 instead")
    parity: dict[str, Any] = {}
    # Structural smoke test: onnxruntime's CPU provider loads the fp16 graph (type-checking every node)
    # and runs one batch. Its numbers are informational only: CPU fp16 kernels are not what the fp16
    # graph is for, so the 2e-2 gate needs CUDA.
    batches = c.parity_batches
    cpu16 = compare(c.model, ort_session(c.out_path), c.task, batches[:1])
    if not all(np.isfinite(v["max_abs"]) for v in cpu16.values()):
        raise BertopsError("the fp16 graph gives non-finite outputs on onnxruntime CPU; export fp32 instead")
    parity["fp16_cpu_smoke"] = {"ran": True, "sequences": len(batches[0]["input_ids"]), "outputs": cpu16}
    if "CUDAExecutionProvider" in ort.get_available_providers():
        c.say("fp16 parity on the CUDA execution provider")
        cuda = ort_session(c.out_path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        figures = compare(c.model, cuda, c.task, batches)
        gate_parity(figures, FP16_ATOL, "fp16 (CUDA)")
        parity["fp16_parity"] = {"atol": FP16_ATOL, "provider": "CUDAExecutionProvider", "outputs": figures}
    else:
        parity["fp16_parity"] = "not run: no CUDA execution provider"
    return {"parity": parity, "fp16_node_counts": node_counts(final)}


def _int8(c: Candidate) -> dict[str, Any]:
    from bertops.quantize import int8

    return int8(c)


register_precision("fp32", fp32)
register_precision("fp16", fp16)
register_precision("int8", _int8)


def _bf16(c: Candidate) -> dict[str, Any]:
    from bertops.bf16 import bf16

    return bf16(c)


def _bf16_precheck() -> None:
    from bertops.bf16 import precheck

    precheck()


register_precision("bf16", _bf16, _bf16_precheck)
