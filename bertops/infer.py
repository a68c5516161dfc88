"""In-process inference on an exported model with onnxruntime (OpenVINO for bf16 exports), length-aware.

A batch of real texts is mostly padding when padded to its longest member (59% on the bundled
sentences at batch 32), and fused attention kernels still compute the padding. So a batch is
tokenized once, its rows are **grouped by length** (:func:`length_buckets`), each group is padded
only to its own longest and run separately, and the answers are put back in input order.
The Triton model of a task calls :meth:`Predictor.answer` (``single`` pipeline) or groups its rows with
the same function before calling the encoder (``ensemble``), so serving gets the same savings and answers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertops.artifacts import MODEL_FILE, Export, read_export
from bertops.errors import BertopsError
from bertops.runtimes import OPENVINO, OpenVINOSession, Runtime, export_runtime
from bertops.tasks import Task, TaskInfo
from bertops.tokenizer import Batch, encode, load_tokenizer

DEFAULT_MAX_LENGTH = 512  # tokens per text, [CLS] and [SEP] included; longer texts are truncated

# Cost of one extra onnxruntime call, in padded-token equivalents. On a 2-core CPU with MiniLM and
# batches of 32 real sentences, 8..48 all gave the best time (about 1.2x better than 0, which splits
# into many tiny runs, and than 256+, which pads more); 32 sits in the middle of that plateau.
CALL_OVERHEAD_TOKENS = 32


def length_buckets(
    lengths: Sequence[int], max_batch: int = 64, call_overhead: int = CALL_OVERHEAD_TOKENS
) -> list[list[int]]:
    """Group row indices so padding costs least: returns index groups, each sorted by length.

    Rows are sorted by length and cut into contiguous runs that minimise
    ``sum(len(group) * longest(group)) + call_overhead * n_groups`` (exact dynamic programme,
    O(n * max_batch); n is a batch, so this is microseconds). Groups never exceed ``max_batch``.
    """
    n = len(lengths)
    if n == 0:
        return []
    order = np.argsort(np.asarray(lengths), kind="stable")
    sorted_len = np.asarray(lengths)[order]
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):  # group = sorted[start:end], its longest is sorted_len[end-1]
        for start in range(max(0, end - max_batch), end):
            cost = best[start] + call_overhead + (end - start) * int(sorted_len[end - 1])
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], n
    while end > 0:
        groups.append(order[cut[end] : end].tolist())
        end = cut[end]
    return groups[::-1]


def physical_cores() -> int:
    """Physical CPU cores this process may use (hyper-threads do not help GEMM-bound inference)."""
    allowed = len(os.sched_getaffinity(0))
    cores: set[tuple[str, str]] = set()
    try:
        phys = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                phys = value.strip()
            elif key.strip() == "core id":
                cores.add((phys, value.strip()))
    except OSError:
        pass
    return max(1, min(allowed, len(cores) or allowed))


def ort_session(onnx_path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None):
    """An onnxruntime session tuned for latency: all graph optimisations, sequential execution,
    one intra-op thread per physical core, errors-only logging.

    ``providers`` defaults to the CPU provider, so a GPU build never picks CUDA by surprise;
    pass ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` to use the GPU.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise BertopsError("onnxruntime is not installed; pip install 'bertops[cpu]' (or 'bertops[gpu]' on CUDA)") from None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or physical_cores()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # no "nodes not assigned to preferred provider" chatter
    providers = list(providers or ["CPUExecutionProvider"])
    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown:
        fix = "; install onnxruntime-gpu in place of onnxruntime" if unknown[0] == "CUDAExecutionProvider" else ""
        raise BertopsError(f"onnxruntime has no {unknown[0]} here (available: {', '.join(available)}){fix}")
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / NoSuchFile types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BertopsError(f"onnxruntime cannot load {onnx_path}: {first}; re-export it with `bertops export onnx`") from None
    if providers[0] not in session.get_providers():  # onnxruntime-gpu falls back to the CPU when CUDA fails to load
        raise BertopsError(
            f"onnxruntime could not start {providers[0]} for {onnx_path} (it fell back to "
            f"{', '.join(session.get_providers())}): its CUDA / cuDNN libraries did not load; put them on "
            f"LD_LIBRARY_PATH or install the nvidia-* wheels onnxruntime-gpu names"
        )
    return session


@dataclass
class Predictor:
    """Text in, task answers out, through one onnxruntime session. Build with :func:`load_predictor`."""

    session: object  # onnxruntime.InferenceSession
    tokenizer: object  # tokenizers.Tokenizer
    task: Task
    info: TaskInfo
    max_length: int = DEFAULT_MAX_LENGTH
    group_by_length: bool = True  # False: one padded run per batch (for comparisons)
    reads: tuple[str, ...] = ()  # outputs to fetch: () = task.reads; a remote encoder may offer others (graph_top_k)

    def run(self, batch: Batch) -> dict[str, np.ndarray]:
        """One padded batch through the graph -> the outputs the task's post-processing reads."""
        names = list(self.reads or self.task.reads)
        return dict(zip(names, self.session.run(names, batch.arrays())))

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> Batch:
        if pairs is not None and not self.task.pairs:
            raise BertopsError(f"task {self.task.name} takes one text per example, not pairs")
        return encode(self.tokenizer, texts, pairs, max_length=self.max_length)

    def predict(
        self, texts: Sequence[str], pairs: Sequence[str] | None = None, batch_size: int = 64, top_k: int | None = None
    ) -> list[dict]:
        """Answers in input order: one dict per text (e.g. ``{"embedding": [...]}``, ``{"label": ...}``,
        ``{"entities": [...]}``, ``{"masks": [...]}``), each with ``"truncated"`` when the text was cut
        to ``max_length`` tokens."""
        texts = list(texts)
        if not texts:
            return []
        info = self.info if top_k is None else TaskInfo(self.info.labels, self.info.vocab, self.info.mask_token_id, top_k)
        results: list[dict | None] = [None] * len(texts)
        for lo in range(0, len(texts), 1024):  # bounds tokenizer memory on huge inputs
            chunk = texts[lo : lo + 1024]
            batch = self.encode(chunk, None if pairs is None else list(pairs)[lo : lo + 1024])
            results[lo : lo + len(chunk)] = self.answer(batch, chunk, batch_size, info)
        return results  # type: ignore[return-value]

    def answer(self, batch: Batch, texts: Sequence[str], batch_size: int = 64, info: TaskInfo | None = None) -> list[dict]:
        """Answers for the rows of a tokenized ``batch`` (``texts``: its first texts, which token-level
        answers slice): rows grouped by length, each group run and post-processed. The Triton model of the
        ``single`` pipeline calls this too, so served and in-process answers come from one code path."""
        info = info or self.info
        groups = (
            length_buckets(batch.lengths, max_batch=batch_size)
            if self.group_by_length
            else [list(range(i, min(i + batch_size, len(texts)))) for i in range(0, len(texts), batch_size)]
        )
        results: list[dict | None] = [None] * len(texts)
        for rows in groups:
            sub = batch.select(rows)
            answers = self.task.postprocess(
                self.run(sub), sub.input_ids, sub.offsets, sub.word_ids, [texts[i] for i in rows], info
            )
            for i, answer in zip(rows, answers):
                results[i] = {**answer, "truncated": batch.truncated[i]}
        return results  # type: ignore[return-value]


def groups_by_length(providers: Sequence[str] | None) -> bool:
    """Whether to run a batch as groups of similar length (True) or as one padded run (False).

    On the CPU compute grows with the tokens run, so grouping pays (2-3x at batch 32 of real
    sentences). On a GPU a small encoder is bound by kernel launches, not by padded tokens: on an
    H200 one padded run per batch was 1.9x faster than the groups at 32 real sentences and 2.0x at
    256 (docs/BENCHMARKS.md "Inference on GPU"), so CUDA runs one padded batch."""
    return not providers or providers[0] == "CPUExecutionProvider"


def load_predictor(
    export_dir: str | Path,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    max_length: int | None = None,
    group_by_length: bool | None = None,
) -> Predictor:
    """An export folder (``bertops export onnx --out DIR``) -> a ready :class:`Predictor`.

    ``group_by_length`` None: :func:`groups_by_length` of the providers.

    A task defined outside bertops is loaded from the folder's task plugin when it is not registered
    yet (:func:`bertops.artifacts.load_task`: that runs the plugin's code).
    """
    export = read_export(export_dir)
    session = open_session(export, providers, threads)
    max_length = max_length or export.trained_length or DEFAULT_MAX_LENGTH
    grouped = groups_by_length(providers) if group_by_length is None else group_by_length
    return Predictor(session, load_tokenizer(export_dir), export.task, export.info, max_length, grouped)


def open_session(export: str | Path | Export, providers: Sequence[str] | None = None, threads: int | None = None):
    """The session that runs an export folder's graph, whatever its runtime: onnxruntime
    (:func:`ort_session`), or OpenVINO's CPU plugin for a bf16 export (:mod:`bertops.runtimes`).
    Returns an object with onnxruntime's ``run(names, feeds) -> [arrays]``, ``get_inputs``, ``get_outputs``.
    """
    export = export if isinstance(export, Export) else read_export(export)
    return open_model(export.folder / MODEL_FILE, export_runtime(export.report), providers, threads)


def open_model(
    onnx_path: str | Path,
    runtime: Runtime | Mapping[str, str] | None = None,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
):
    """A graph file under the runtime an export names (``export_report.json`` -> ``"runtime"``, or
    :func:`bertops.runtimes.export_runtime`'s ``as_dict()``; None: onnxruntime). In-process prediction
    (:func:`open_session`) and the Triton models both open graphs here, so they cannot drift apart."""
    if runtime is not None and not isinstance(runtime, Runtime):
        runtime = export_runtime({"runtime": runtime})
    if runtime is not None and runtime.name == OPENVINO:
        if providers and list(providers) != ["CPUExecutionProvider"]:
            raise BertopsError(
                f"{onnx_path} is a {runtime.precision} export that runs on OpenVINO's CPU plugin, not on "
                f"{providers[0]}; export with --precision fp16 for the GPU"
            )
        return OpenVINOSession(onnx_path, runtime.precision, threads or physical_cores())
    return ort_session(onnx_path, providers, threads)


def predict_file(
    predictor: Predictor, input_file: str | Path, output_file: str | Path, batch_size: int = 64, progress=None
) -> int:
    """JSONL in (``{"text": ..., "text_pair": ...}`` or plain lines) -> JSONL out, one answer per line.

    Each output line repeats the input fields and adds the answer. Returns the number of lines.
    """
    src = Path(input_file)
    if not src.is_file():
        raise BertopsError(f"input file {src} does not exist; pass a JSONL file with one {{\"text\": ...}} per line")
    records = []
    raw = src.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise BertopsError(
            f"{src} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); "
            f"re-encode it, e.g. `iconv -f latin1 -t utf-8 {src} > utf8.jsonl`"
        ) from None
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BertopsError(f"{src}:{n} is not valid JSON ({exc.msg}); fix that line") from None
            if not isinstance(rec.get("text"), str):
                raise BertopsError(f"{src}:{n} has no string field \"text\"; every line needs one")
        else:
            rec = {"text": line}
        records.append(rec)
    has_pairs = any("text_pair" in r for r in records)
    dst = Path(output_file)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(dst.suffix + ".partial")
    step = max(batch_size * 16, 1)
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for lo in range(0, len(records), step):
                part = records[lo : lo + step]
                pairs = [r.get("text_pair", "") for r in part] if has_pairs else None
                for rec, ans in zip(part, predictor.predict([r["text"] for r in part], pairs, batch_size)):
                    fh.write(json.dumps({**rec, **ans}, ensure_ascii=False) + "\n")
                if progress:
                    progress(min(lo + step, len(records)), len(records))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(dst)  # never leave a half-written answer file under the real name
    return len(records)
