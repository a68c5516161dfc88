"""Helpers the generated Triton python models import: decode TEXT, tokenize, (un)pack tensors, results.

Torch-free and Triton-free (numpy, tokenizers and bertops' torch-free modules only), so they run inside
Triton's python backend and are unit-testable without a server.

Text handling (documented behaviour, checked by tests/test_triton_e2e.py):

* ``TEXT`` is ``[batch, 1]`` (one text per row) or ``[batch, 2]`` (text pairs, for tasks that take pairs);
* invalid UTF-8 fails *that request* with an INVALID_ARG error naming the row and byte offset; other
  requests of the same dynamic batch are answered normally (one response per request, always);
* an empty string is a valid text: it is encoded as ``[CLS] [SEP]`` and answered like any other
  -- exactly what ``bertops.infer`` answers;
* text longer than ``max_length`` tokens is truncated and its RESULT carries ``"truncated": true``;
  only the first ``max_length * 20`` characters of a row are read (:func:`row_char_cap`), and a
  request whose TEXT exceeds the model's ``max_request_bytes`` is refused with INVALID_ARG.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bertops.artifacts import load_task, read_labels, task_info
from bertops.config import ServeConfig
from bertops.errors import BertopsError
from bertops.tasks import Task, TaskInfo
from bertops.tokenizer import Batch, encode

META_FILE = "bertops_model.json"
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TOKEN_LEVEL_INPUTS = ("OFFSETS", "WORD_IDS")
CHARS_PER_TOKEN_CAP = 20
"""Characters of a row read per token of ``max_length``: see :func:`row_char_cap`."""
DEFAULT_MAX_REQUEST_BYTES = ServeConfig.max_request_bytes
"""Largest TEXT (bytes, all rows of one request) the tokenizer model accepts when its repository says nothing."""



def decode_text_rows(
    array: np.ndarray, allow_pairs: bool, max_chars: int | None = None
) -> tuple[list[str], list[str] | None]:
    """A ``TEXT`` request tensor ``[batch, 1 | 2]`` of UTF-8 bytes -> (texts, second texts or None).

    With ``max_chars`` only the start of each row is decoded (and checked): at most ``max_chars + 1``
    characters come back, so :func:`cap_chars` can still tell which rows were longer than the cap.
    Raises :class:`BertopsError` naming the offending row for invalid UTF-8 or a bad shape.
    """
    if array.ndim != 2 or array.shape[1] not in (1, 2):
        raise BertopsError(
            f"TEXT has shape {list(array.shape)}; send [batch, 1] (one text per row)"
            + (" or [batch, 2] (text pairs)" if allow_pairs else "")
        )
    if array.shape[0] == 0:
        raise BertopsError("TEXT has no rows; send at least one text")
    if array.shape[1] == 2 and not allow_pairs:
        raise BertopsError("TEXT has 2 texts per row, but this model's task takes one text per row; send [batch, 1]")
    columns: list[list[str]] = [[], []]
    for row in range(array.shape[0]):
        for col in range(array.shape[1]):
            value = array[row, col]
            if max_chars is not None and len(value) > 4 * (max_chars + 1):  # UTF-8: at most 4 bytes a character
                value = value[: 4 * (max_chars + 1)]
                cut = True
            else:
                cut = False
            if isinstance(value, str):
                columns[col].append(value if max_chars is None else value[: max_chars + 1])
                continue
            try:
                text = _decode(bytes(value), cut)
                columns[col].append(text if max_chars is None else text[: max_chars + 1])
            except UnicodeDecodeError as exc:
                raise BertopsError(
                    f"TEXT row {row}{'' if array.shape[1] == 1 else f' column {col}'} is not valid UTF-8 "
                    f"(byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); send UTF-8 encoded text"
                ) from None
    return columns[0], (columns[1] if array.shape[1] == 2 else None)


def _decode(raw: bytes, cut: bool) -> str:
    """UTF-8 ``raw``; when ``raw`` is a cut-off prefix, a character split by the cut is dropped."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if cut and exc.reason == "unexpected end of data":
            return raw[: exc.start].decode("utf-8")
        raise


def row_char_cap(max_length: int) -> int:
    """How many characters of each text the tokenizer model reads: ``max_length * CHARS_PER_TOKEN_CAP``.

    The model sees at most ``max_length`` tokens, and WordPiece tokens of natural text span about 4.5
    characters with their space (the bundled English sentences: 4.5), so a row cut at 20 characters
    per token still yields more than ``max_length`` tokens -- the same tokens, the same answer -- unless
    its text averages over 20 characters per token (long runs of whitespace, or of 100+ character
    "words", which WordPiece maps to a single [UNK]).  What the cap buys: the fast tokenizer reads
    the whole text before truncating (about 1 s of CPU per MB), so one request of 8 x 1 MB rows held
    every other request for seconds; at 512 tokens a row now costs at most ~10k characters (~4 ms).
    """
    return max_length * CHARS_PER_TOKEN_CAP


def cap_chars(texts: Sequence[str], cap: int) -> tuple[list[str], list[bool]]:
    """``texts`` cut to ``cap`` characters each, and which were cut (their RESULT says ``"truncated": true``)."""
    return [t[:cap] for t in texts], [len(t) > cap for t in texts]


def check_request_bytes(array: np.ndarray, limit: int) -> None:
    """Refuse a TEXT tensor over ``limit`` bytes in all, with the fix (fewer texts per request, or a larger limit)."""
    size = sum(len(v) for v in array.reshape(-1))
    if size > limit:
        raise BertopsError(
            f"this request's TEXT holds {size} bytes, above the model's limit of {limit} bytes per request "
            f"(serve.max_request_bytes); send fewer or shorter texts per request, or rebuild the repository "
            f"with `bertops triton build --max-request-bytes N`"
        )


def read_text_requests(
    requests: Sequence[Any], get_input: Any, pairs: bool, max_chars: int, max_request_bytes: int
) -> tuple[list[list], list[int], dict[int, str]]:
    """Each request's TEXT rows, checked and decoded: (rows of the good requests, their indices, {index: error}).

    ``get_input`` is ``pb_utils.get_input_tensor_by_name`` (only the stub can import it). A request without
    TEXT, over ``max_request_bytes`` or with invalid UTF-8 gets its own one-line error; the rest are answered.
    """
    decoded, owners, errors = [], [], {}
    for i, request in enumerate(requests):
        try:
            tensor = get_input(request, "TEXT")
            if tensor is None:
                raise BertopsError("the request has no TEXT input")
            array = tensor.as_numpy()
            check_request_bytes(array, max_request_bytes)
            decoded.append(decode_text_rows(array, pairs, max_chars))
            owners.append(i)
        except BertopsError as exc:
            errors[i] = str(exc)
    return decoded, owners, errors


def tokenize_requests(
    tokenizer, requests: Sequence[tuple[list[str], list[str] | None]], max_length: int, token_level: bool
) -> list[dict[str, np.ndarray]]:
    """Tokenize the texts of many requests together (one fast-tokenizer call for single texts, one for
    pairs) and return, per request, its tensors padded only to that request's own longest row.

    Each text is first cut to :func:`row_char_cap` characters, so a huge row costs what a
    ``max_length``-token one does; a cut row counts as truncated."""
    results: list[dict[str, np.ndarray] | None] = [None] * len(requests)
    for paired in (False, True):
        members = [i for i, (_, pairs) in enumerate(requests) if (pairs is not None) == paired]
        if not members:
            continue
        cap = row_char_cap(max_length)
        texts, cut = cap_chars([t for i in members for t in requests[i][0]], cap)
        pairs = None
        if paired:
            pairs, cut_pairs = cap_chars([t for i in members for t in requests[i][1]], cap)  # type: ignore[union-attr]
            cut = [a or b for a, b in zip(cut, cut_pairs)]
        batch = encode(tokenizer, texts, pairs, max_length=max_length)
        batch.truncated = [t or c for t, c in zip(batch.truncated, cut)]
        start = 0
        for i in members:
            n = len(requests[i][0])
            results[i] = batch_to_tensors(batch.select(range(start, start + n)), token_level) if n else {}
            start += n
    return results  # type: ignore[return-value]


STAGES = ("decode", "tokenize", "encoder", "postprocess", "respond")
"""Where a ``single`` pipeline model spends a dynamic batch's time (its ``bertops_stage_seconds`` metric)."""


class TimedSession:
    """An onnxruntime session (or anything with ``run(names, feed)``) that adds the seconds of every run
    to ``clock["encoder"]``: composition, so :class:`bertops.infer.Predictor` runs it unchanged."""

    def __init__(self, session, clock: dict[str, float]):
        self.session, self.clock = session, clock

    def run(self, names, feed):
        start = time.perf_counter()
        try:
            return self.session.run(names, feed)
        finally:
            self.clock["encoder"] = self.clock.get("encoder", 0.0) + time.perf_counter() - start


class BlsEncoder:
    """``run(names, feed)`` like an onnxruntime session, answered by the Triton model ``name`` over BLS.

    ``pb`` is the python backend's ``triton_python_backend_utils`` (passed in: this module is imported
    outside Triton too). Outputs are asked for in CPU memory where the backend can say so (a GPU encoder).
    """

    def __init__(self, pb, name: str):
        self.pb, self.name = pb, name
        self.memory = pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0) if hasattr(pb, "PreferredMemory") else None

    def run(self, names, feed) -> list[np.ndarray]:
        pb = self.pb
        inputs = [pb.Tensor(n, np.ascontiguousarray(feed[n], dtype=np.int64)) for n in ENCODER_INPUTS]
        kwargs = {"model_name": self.name, "requested_output_names": list(names), "inputs": inputs}
        if self.memory is not None:
            kwargs["preferred_memory"] = self.memory
        response = pb.InferenceRequest(**kwargs).exec()
        if response.has_error():
            raise RuntimeError(f"{self.name} failed: {response.error().message()}")
        out = []
        for n in names:
            tensor = pb.get_output_tensor_by_name(response, n)
            if tensor is None:
                raise RuntimeError(f"{self.name} returned no {n}")
            out.append(tensor.as_numpy())
        return out


def answer_requests(
    predictor, requests: Sequence[tuple[list[str], list[str] | None]], max_batch: int,
    clock: dict[str, float] | None = None,
) -> list[list[dict]]:
    """The answers of many requests' texts (``decode_text_rows`` results), per request, in one pass:
    every single text of every request tokenized together (pairs together, apart), then
    :meth:`bertops.infer.Predictor.answer` -- the in-process code: length groups of at most
    ``max_batch`` rows, the encoder, the task's ``postprocess``.

    Each text is first cut to :func:`row_char_cap` characters (a cut row counts as truncated), as the
    ensemble's tokenizer model does. ``clock`` (stage -> seconds) gains ``tokenize`` and ``postprocess``
    (the answer time less what a :class:`TimedSession` counted as ``encoder``).
    """
    clock = {} if clock is None else clock
    results: list[list[dict]] = [[] for _ in requests]
    cap = row_char_cap(predictor.max_length)
    for paired in (False, True):
        members = [i for i, (_, pairs) in enumerate(requests) if (pairs is not None) == paired]
        if not members:
            continue
        start = time.perf_counter()
        texts, cut = cap_chars([t for i in members for t in requests[i][0]], cap)
        pairs = None
        if paired:
            pairs, cut_pairs = cap_chars([t for i in members for t in requests[i][1]], cap)  # type: ignore[union-attr]
            cut = [a or b for a, b in zip(cut, cut_pairs)]
        batch = predictor.encode(texts, pairs)
        batch.truncated = [t or c for t, c in zip(batch.truncated, cut)]
        encoder_before = clock.get("encoder", 0.0)
        tokenized = time.perf_counter()
        answers = predictor.answer(batch, texts, max_batch)
        done = time.perf_counter()
        clock["tokenize"] = clock.get("tokenize", 0.0) + tokenized - start
        clock["postprocess"] = clock.get("postprocess", 0.0) + (done - tokenized) - (clock.get("encoder", 0.0) - encoder_before)
        lo = 0
        for i in members:
            n = len(requests[i][0])
            results[i] = answers[lo : lo + n]
            lo += n
    return results


def batch_to_tensors(batch: Batch, token_level: bool) -> dict[str, np.ndarray]:
    """A tokenized :class:`Batch` -> the tokenizer model's output tensors."""
    rows, width = batch.input_ids.shape
    out = {
        "input_ids": np.ascontiguousarray(batch.input_ids, dtype=np.int64),
        "attention_mask": np.ascontiguousarray(batch.attention_mask, dtype=np.int64),
        "token_type_ids": np.ascontiguousarray(batch.token_type_ids, dtype=np.int64),
        "TRUNCATED": np.asarray(batch.truncated, dtype=np.bool_).reshape(rows, 1),
    }
    if token_level:
        offsets = np.zeros((rows, width, 2), dtype=np.int64)
        word_ids = np.full((rows, width), -1, dtype=np.int64)
        for r in range(rows):
            n = min(len(batch.offsets[r]), width)
            if n:
                offsets[r, :n] = np.asarray(batch.offsets[r][:n], dtype=np.int64).reshape(n, 2)
                word_ids[r, :n] = [-1 if w is None else w for w in batch.word_ids[r][:n]]
        out["OFFSETS"], out["WORD_IDS"] = offsets, word_ids
    return out


def tensors_to_batch(parts: Sequence[dict[str, np.ndarray]]) -> Batch:
    """The tokenizer tensors of several requests -> one :class:`Batch` (rows in request order, padded
    to the widest). Offsets and word ids are cut back to each row's real tokens, as ``encode`` gives."""
    width = max([int(p["input_ids"].shape[1]) for p in parts] + [1])
    rows = sum(int(p["input_ids"].shape[0]) for p in parts)
    arrays = {name: np.zeros((rows, width), dtype=np.int64) for name in ENCODER_INPUTS}
    offsets: list[list[tuple[int, int]]] = []
    word_ids: list[list[int | None]] = []
    truncated: list[bool] = []
    r = 0
    for p in parts:
        n, w = p["input_ids"].shape
        for name in ENCODER_INPUTS:
            arrays[name][r : r + n, :w] = p[name]
        lengths = p["attention_mask"].sum(axis=1) if n else []
        for i in range(n):
            length = int(lengths[i])
            if "OFFSETS" in p:
                offsets.append([(int(a), int(b)) for a, b in p["OFFSETS"][i, :length]])
                word_ids.append([None if x < 0 else int(x) for x in p["WORD_IDS"][i, :length]])
            else:
                offsets.append([])
                word_ids.append([])
        truncated.extend(bool(x) for x in np.asarray(p["TRUNCATED"]).reshape(-1))
        r += n
    return Batch(
        input_ids=arrays["input_ids"],
        attention_mask=arrays["attention_mask"],
        token_type_ids=arrays["token_type_ids"],
        offsets=offsets,
        word_ids=word_ids,
        truncated=truncated,
    )


def load_model_meta(folder: str | Path) -> dict[str, Any]:
    """A generated python model's ``bertops_model.json`` (task, limits, wiring)."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise BertopsError(f"{path} is missing; rebuild the repository with `bertops triton build`")
    return json.loads(path.read_text(encoding="utf-8"))


def load_postprocess(folder: str | Path) -> tuple[Task, TaskInfo, dict[str, Any]]:
    """Task, post-processing info and meta of a generated ``*_postprocess`` model folder (a task defined
    outside bertops is loaded from the folder's task plugin)."""
    meta = load_model_meta(folder)
    task = load_task(meta["task"], folder)
    return task, task_info(folder, read_labels(folder)), meta


def result_tensors(task: Task, answers: Sequence[dict], labels: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-row answers (``Predictor.predict`` dicts) -> the ensemble's output tensors: RESULT (the JSON
    of each answer) and the task's ``serve_outputs``."""
    rows = len(answers)
    out = {
        "RESULT": np.array(
            [[json.dumps(a, ensure_ascii=False, separators=(",", ":")).encode("utf-8")] for a in answers],
            dtype=np.object_,
        ).reshape(rows, 1)
    }
    for spec in task.serve_outputs:
        values = [list(spec.value(a, labels)) for a in answers]
        if spec.dtype == "TYPE_STRING":
            encoded = [[v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in row] for row in values]
            out[spec.name] = np.array(encoded, dtype=np.object_).reshape(rows, -1)
        else:
            out[spec.name] = np.asarray(values, dtype=_NUMPY[spec.dtype]).reshape(rows, -1)
    return out


_NUMPY = {"TYPE_FP32": np.float32, "TYPE_FP64": np.float64, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32,
          "TYPE_BOOL": np.bool_}


def string_tensor_bytes(values: Iterable[str | bytes]) -> bytes:
    """Triton's serialized TYPE_STRING layout (4-byte little-endian length, then the bytes), as
    ``model_warmup`` input_data_file expects for string inputs."""
    chunks = []
    for v in values:
        b = v.encode("utf-8") if isinstance(v, str) else bytes(v)
        chunks.append(struct.pack("<I", len(b)) + b)
    return b"".join(chunks)

