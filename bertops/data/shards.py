"""The pretraining shard format: Parquet files of NSP segment pairs, manifest.json, and a row-group reader.

A prepared folder holds ``manifest.json``, ``tokenizer/`` (a copy of the tokenizer the shards were
made with) and Parquet files ``train-NNNNN.parquet`` / ``eval-NNNNN.parquet`` (zstd, row groups of
:data:`ROW_GROUP` rows), one row per example::

    input_ids             list<int32>  [CLS] A [SEP] B [SEP], unpadded, at most seq_len tokens
    a_length              int32        tokens of "[CLS] A [SEP]" (token_type_ids are 0 there, 1 after)
    word_start            binary       one byte per token of input_ids: 1 where the token starts a
                                       word (whole-word masking; special tokens are 1), else 0
    next_sentence_label   int8         0: B is A's actual next segment, 1: B is from another document
    doc, sentence_a       int32        the source document (in input order) and A's first sentence
    doc_b, sentence_b     int32        the same for B

Parquet through pyarrow is a columnar format every data tool reads (pandas, DuckDB, HF datasets),
with per-row-group random access, which is all the input pipeline needs; MosaicML's MDS would add a
dependency that pins its own torch/numpy ranges for a streaming-from-object-store feature we do not use.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertops.errors import BertopsError

MANIFEST = "manifest.json"
# /2: word_start is one byte per token in a binary value per row instead of list<bool>, which Parquet
# writes with a repetition and definition level per token: ~30% of the writing time in /1.
FORMAT = "bertops-pretraining-parquet/2"
TOKENIZER_SUBDIR = "tokenizer"
ROW_GROUP = 1024
SPLITS = ("train", "eval")


def schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("input_ids", pa.list_(pa.int32())),
            ("a_length", pa.int32()),
            ("word_start", pa.binary()),
            ("next_sentence_label", pa.int8()),
            ("doc", pa.int32()),
            ("sentence_a", pa.int32()),
            ("doc_b", pa.int32()),
            ("sentence_b", pa.int32()),
        ]
    )


def write_shard(path: Path, columns: dict[str, np.ndarray | list]) -> int:
    """Write one shard from flat columns; returns its row count.

    ``columns``: ``ids`` (flat int32 tokens), ``word_start`` (flat bool), ``offsets`` (n+1 row starts
    into them), and per-row ``a_length``, ``next_sentence_label``, ``doc``, ``sentence_a``, ``doc_b``,
    ``sentence_b``. The Arrow arrays are made from these buffers, with no Python object per row or token.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    offsets = pa.array(np.asarray(columns["offsets"], dtype=np.int32))
    word_start = pa.py_buffer(np.ascontiguousarray(columns["word_start"], dtype=bool).view(np.uint8))
    table = pa.Table.from_arrays(
        [
            pa.ListArray.from_arrays(offsets, pa.array(np.asarray(columns["ids"], dtype=np.int32))),
            pa.array(np.asarray(columns["a_length"], dtype=np.int32)),
            pa.BinaryArray.from_buffers(pa.binary(), len(offsets) - 1, [None, offsets.buffers()[1], word_start]),
            pa.array(np.asarray(columns["next_sentence_label"], dtype=np.int8)),
            *(pa.array(np.asarray(columns[k], dtype=np.int32)) for k in ("doc", "sentence_a", "doc_b", "sentence_b")),
        ],
        schema=schema(),
    )
    pq.write_table(table, path, row_group_size=ROW_GROUP, compression="zstd", use_dictionary=["a_length"])
    return table.num_rows


def tokenizer_hash(tok) -> str:
    """sha256 of a tokenizer's full definition (vocabulary, normaliser, pre-tokeniser, post-processor).

    Taken from the loaded ``tokenizers.Tokenizer`` (canonical JSON), so a copied folder, or one with
    only vocab.txt that loads to the same tokenizer, hashes the same. Truncation and padding, which
    are per-call settings, are left out.
    """
    spec = json.loads(tok.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared folder; a one-line error when the folder is not one."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not data_dir.is_dir():
        raise BertopsError(f"data folder {data_dir} not found; create it with `bertops data prepare`")
    if not path.is_file():
        raise BertopsError(f"{data_dir} has no {MANIFEST}; it is not a prepared data folder (run `bertops data prepare`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BertopsError(f"{path} is not valid JSON ({exc}); re-run `bertops data prepare`") from None
    if manifest.get("format") != FORMAT:
        raise BertopsError(f"{path} has format {manifest.get('format')!r}, not {FORMAT!r}; re-run `bertops data prepare`")
    return manifest


@dataclass
class RowGroup:
    """One decoded row group: flat tokens with row offsets, and per-row columns."""

    ids: np.ndarray  # (tokens,) int32
    word_start: np.ndarray  # (tokens,) bool
    offsets: np.ndarray  # (rows + 1,) int64
    a_length: np.ndarray  # (rows,) int32
    nsp: np.ndarray  # (rows,) int8


class ShardReader:
    """Rows of one split by index (0 .. ``len(reader)``), across its shards in manifest order.

    Row groups are decoded on demand and kept in an LRU cache of ``cache_groups`` entries, so a
    shuffle buffer's sliding window over the stream reads each row group about once.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", cache_groups: int = 64):
        import pyarrow.parquet as pq

        if split not in SPLITS:
            raise BertopsError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        shards = self.manifest["splits"][split]["shards"]
        if not shards:
            raise BertopsError(f"{self.data_dir} has no {split} examples; prepare more text (or a larger --eval-fraction)")
        self.files: list = []
        self.group_starts: list[int] = []  # global row index of each (file, group)
        self.group_where: list[tuple[int, int]] = []
        start = 0
        for i, shard in enumerate(shards):
            path = self.data_dir / shard["file"]
            if not path.is_file():
                raise BertopsError(f"shard {path} listed in the manifest is missing; re-run `bertops data prepare`")
            pf = pq.ParquetFile(path)
            if pf.metadata.num_rows != shard["examples"]:
                raise BertopsError(
                    f"shard {path} has {pf.metadata.num_rows} rows, the manifest says {shard['examples']}; re-run `bertops data prepare`"
                )
            self.files.append(pf)
            for g in range(pf.metadata.num_row_groups):
                self.group_starts.append(start)
                self.group_where.append((i, g))
                start += pf.metadata.row_group(g).num_rows
        self.num_rows = start
        self.group_starts_np = np.asarray(self.group_starts + [start], dtype=np.int64)
        self.cache: OrderedDict[int, RowGroup] = OrderedDict()
        self.cache_groups = cache_groups

    def __len__(self) -> int:
        return self.num_rows

    def _group(self, g: int) -> RowGroup:
        hit = self.cache.get(g)
        if hit is not None:
            self.cache.move_to_end(g)
            return hit
        f, rg = self.group_where[g]
        table = self.files[f].read_row_group(rg, columns=["input_ids", "a_length", "word_start", "next_sentence_label"])
        ids_col = table.column("input_ids").combine_chunks()
        ws_col = table.column("word_start").combine_chunks()
        ws_offsets = np.frombuffer(ws_col.buffers()[1], np.int32, count=len(ws_col) + 1, offset=4 * ws_col.offset)
        group = RowGroup(
            ids=ids_col.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
            word_start=np.frombuffer(ws_col.buffers()[2], dtype=bool)[ws_offsets[0]:ws_offsets[-1]],
            offsets=(ids_col.offsets.to_numpy() - ids_col.offsets[0].as_py()).astype(np.int64),
            a_length=table.column("a_length").to_numpy(),
            nsp=table.column("next_sentence_label").to_numpy(),
        )
        self.cache[g] = group
        if len(self.cache) > self.cache_groups:
            self.cache.popitem(last=False)
        return group

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(input_ids int32, word_start bool, a_length, next_sentence_label) of one row."""
        if not 0 <= index < self.num_rows:
            raise IndexError(index)
        g = int(np.searchsorted(self.group_starts_np, index, side="right")) - 1
        group = self._group(g)
        r = index - self.group_starts[g]
        lo, hi = group.offsets[r], group.offsets[r + 1]
        return group.ids[lo:hi], group.word_start[lo:hi], int(group.a_length[r]), int(group.nsp[r])
