"""The pretraining input pipeline: one seeded global stream of masked examples, split across ranks; eval batches.

Semantics of an Estimator ``input_fn`` (``repeat -> shuffle(buffer) -> batch``), made exact and
cheap to resume:

- source: the split's rows, epoch after epoch (repeat); each epoch visits the shards in an order
  permuted by ``(seed, epoch)``, ``interleave`` shards side by side (a row of each in turn, tf.data's
  ``interleave`` with ``cycle_length``), each shard's rows in order. A shard holds the pairs of one
  group of documents, ``dupe_factor`` times over, so reading shards one after another would feed
  the same few thousand documents for hundreds of steps (the loss falls on them and jumps at the
  next shard); side by side, a buffer's worth of stream spans all of them;
- shuffle buffer of ``shuffle_buffer`` slots: each output draws a uniform slot (seeded by ``seed``),
  emits its row and refills the slot with the next source row (tf.data's algorithm);
- global step ``s`` takes stream positions ``[s*G, (s+1)*G)`` past ``start_example``; its micro-step
  ``a`` on rank ``r`` takes ``[s*G + (a*W + r)*M, ... + M)``. Ranks never overlap, their union is the
  global batch, and every rank computes the same stream, so the examples a position holds do not
  depend on the world size;
- masking happens here, per example, seeded by ``(seed, stream position)`` (:mod:`bertops.data.masking`).

The stream is a function of ``(seed, shuffle_buffer, shard_interleave, shards)`` only: resuming from ``position``
replays the buffer over row indices (no data read, ~2-3 M positions/s) and goes on identically.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bertops.data.masking import MaskSpec, example_rng, mask_tokens
from bertops.data.shards import TOKENIZER_SUBDIR, ShardReader, read_manifest, tokenizer_hash
from bertops.errors import BertopsError

_SHARD_ORDER_STREAM = 0x7368617264  # keeps the shard-order draws apart from the buffer's
_DRAWS = 8192


class ShuffledStream:
    """Row indices of the global stream: repeat over shards (per-epoch shard order, ``interleave`` side by
    side), then a shuffle buffer."""

    def __init__(self, shard_rows: list[int], seed: int, buffer: int, interleave: int = 1):
        if buffer < 1:
            raise BertopsError(f"shuffle buffer {buffer} must be at least 1 (1 = no shuffling)")
        if interleave < 1:
            raise BertopsError(f"shard interleave {interleave} must be at least 1 (1 = one shard after another)")
        self.interleave = int(interleave)
        self.shard_rows = list(shard_rows)
        self.starts = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64).tolist()
        self.seed = int(seed) & 0xFFFFFFFF
        self.rng = np.random.default_rng([self.seed])
        self.buffer_size = buffer
        self._source = self._rows()
        self._block: list[int] = []
        self._at = 0
        self.buffer = [self._next_source() for _ in range(buffer)]
        self._draws: list[int] = []
        self._di = 0

    def _rows(self) -> Iterator[list[int]]:
        epoch = 0
        while True:
            order = np.random.default_rng([self.seed, _SHARD_ORDER_STREAM, epoch]).permutation(len(self.shard_rows))
            for g in range(0, len(order), self.interleave):
                group = order[g:g + self.interleave]
                starts = np.asarray(self.starts, dtype=np.int64)[group]
                lengths = np.asarray(self.shard_rows, dtype=np.int64)[group]
                # Proportional: row i of a shard of n rows sits at (i + 0.5) / n of the group's stream,
                # so a short shard is spread over the whole group, not spent at its start.
                chunks = -(-int(lengths.sum()) // 4096)
                bounds = [np.ceil(lengths * c / chunks - 0.5).astype(np.int64) for c in range(chunks + 1)]
                for c in range(chunks):
                    lo, hi = bounds[c], bounds[c + 1]
                    rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in zip(lo, hi)])
                    shard = np.repeat(np.arange(len(group)), hi - lo)
                    place = (rows + 0.5) / lengths[shard]
                    pick = np.lexsort((shard, place))
                    yield (starts[shard] + rows)[pick].tolist()
            epoch += 1

    def _next_source(self) -> int:
        if self._at >= len(self._block):
            self._block, self._at = next(self._source), 0
        self._at += 1
        return self._block[self._at - 1]

    def take(self, n: int) -> list[int]:
        """The next ``n`` row indices of the stream."""
        out = []
        buf, size = self.buffer, self.buffer_size
        for _ in range(n):
            if self._di >= len(self._draws):
                self._draws, self._di = self.rng.integers(0, size, size=_DRAWS).tolist(), 0
            j = self._draws[self._di]
            self._di += 1
            out.append(buf[j])
            buf[j] = self._next_source()
        return out

    def skip(self, n: int) -> None:
        """Advance ``n`` positions without keeping them (resume)."""
        while n > 0:
            k = min(n, 1 << 16)
            self.take(k)
            n -= k


def _mask_spec(manifest: dict, mlm_probability: float, whole_word_masking: bool) -> MaskSpec:
    if not 0.0 <= mlm_probability < 1.0:
        raise BertopsError(f"mlm probability {mlm_probability} must be in [0, 1)")
    tok = manifest["tokenizer"]
    return MaskSpec(
        vocab_size=int(tok["vocab_size"]),
        mask_id=int(tok["special_ids"]["mask"]),
        special_ids=tuple(int(i) for i in tok["special_ids"].values()),
        probability=mlm_probability,
        whole_word=whole_word_masking,
    )


def collate(rows: list[tuple[np.ndarray, np.ndarray, int, int]], seq_len: int, pad_id: int, pad_to_multiple_of: int = 8):
    """Masked rows (input_ids, labels, a_length, next_sentence_label) -> dict of int64 torch tensors, right-padded.

    Padded to the longest row, rounded up to ``pad_to_multiple_of`` and capped at ``seq_len``.
    """
    import torch

    longest = max(len(r[0]) for r in rows)
    width = min(seq_len, -(-longest // pad_to_multiple_of) * pad_to_multiple_of) if pad_to_multiple_of > 1 else longest
    width = max(width, longest)
    b = len(rows)
    ids = np.full((b, width), pad_id, dtype=np.int64)
    labels = np.full((b, width), -100, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    types = np.zeros((b, width), dtype=np.int64)
    nsp = np.empty(b, dtype=np.int64)
    for i, (x, y, a_len, label) in enumerate(rows):
        n = len(x)
        ids[i, :n], labels[i, :n], mask[i, :n] = x, y, 1
        types[i, a_len:n] = 1
        nsp[i] = label
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "token_type_ids": torch.from_numpy(types),
        "labels": torch.from_numpy(labels),
        "next_sentence_label": torch.from_numpy(nsp),
    }


class PretrainInput:
    """Per-micro-step batches for one rank of the global stream; iterate forever, checkpoint ``.position``.

    Yields dicts of int64 tensors: input_ids, attention_mask, token_type_ids, labels (B, T; -100
    where not predicted) and next_sentence_label (B,); B = ``micro_batch_size``. ``position`` counts
    the examples (globally, all ranks) of every global step whose last micro-batch has been yielded:
    save it with a checkpoint and pass it back as ``start_example``, on any world size. A new
    ``iter()`` continues from ``position``.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        micro_batch_size: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 10_000,
        shard_interleave: int = 16,
        mlm_probability: float = 0.15,
        whole_word_masking: bool = False,
        start_example: int = 0,
        split: str = "train",
        pad_to_multiple_of: int = 8,
    ):
        if micro_batch_size < 1 or world_size < 1 or global_batch_size < 1:
            raise BertopsError("micro batch size, global batch size and world size must be positive")
        per_step = micro_batch_size * world_size
        if global_batch_size % per_step:
            raise BertopsError(
                f"global batch size {global_batch_size} is not divisible by micro batch size {micro_batch_size} "
                f"x {world_size} ranks; pick a global batch that is a multiple of {per_step}"
            )
        if not 0 <= rank < world_size:
            raise BertopsError(f"rank {rank} is outside world size {world_size}")
        if start_example < 0:
            raise BertopsError(f"start example {start_example} must be >= 0")
        if shuffle_buffer < 1:
            raise BertopsError(f"shuffle buffer {shuffle_buffer} must be at least 1 (1 = no shuffling)")
        if shard_interleave < 1:
            raise BertopsError(f"shard interleave {shard_interleave} must be at least 1 (1 = one shard after another)")
        self.data_dir = Path(data_dir)
        self.reader = ShardReader(self.data_dir, split)
        # Keep the row groups of ~8 buffer-lengths of stream: a row outlives that in the buffer with
        # probability e^-8, so row groups are read about once.
        rows_per_group = max(1, len(self.reader) // max(1, len(self.reader.group_where)))
        self.reader.cache_groups = max(16, 8 * shuffle_buffer // rows_per_group + 2 + shard_interleave)
        self.manifest = self.reader.manifest
        self.seq_len = int(self.manifest["seq_len"])
        self.pad_id = int(self.manifest["tokenizer"]["special_ids"]["pad"])
        self.spec = _mask_spec(self.manifest, mlm_probability, whole_word_masking)
        self.pool, self.special = self.spec.replacement_pool(), self.spec.special_table()
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.rank, self.world_size = rank, world_size
        self.accumulation_steps = global_batch_size // per_step
        self.seed, self.shuffle_buffer, self.shard_interleave = seed, shuffle_buffer, shard_interleave
        self.pad_to_multiple_of = pad_to_multiple_of
        self.position = int(start_example)
        self.shard_rows = [s["examples"] for s in self.manifest["splits"][split]["shards"]]

    @property
    def num_examples(self) -> int:
        """Rows in the split (one epoch)."""
        return len(self.reader)

    def example(self, position: int, row: int):
        """The masked example at stream ``position`` holding split row ``row``."""
        ids, ws, a_len, nsp = self.reader.row(row)
        masked, labels = mask_tokens(ids, ws, self.spec, example_rng(self.seed, position), self.pool, self.special)
        return masked, labels, a_len, nsp

    def __iter__(self) -> Iterator[dict]:
        stream = ShuffledStream(self.shard_rows, self.seed, self.shuffle_buffer, self.shard_interleave)
        stream.skip(self.position)
        G, M, W = self.global_batch_size, self.micro_batch_size, self.world_size
        while True:
            start = self.position
            rows = stream.take(G)
            for a in range(self.accumulation_steps):
                lo = (a * W + self.rank) * M
                batch = [self.example(start + lo + k, rows[lo + k]) for k in range(M)]
                if a == self.accumulation_steps - 1:
                    self.position = start + G
                yield collate(batch, self.seq_len, self.pad_id, self.pad_to_multiple_of)

    def global_rows(self, start: int, count: int) -> list[int]:
        """Split rows at stream positions ``[start, start + count)`` (for tests and inspection)."""
        stream = ShuffledStream(self.shard_rows, self.seed, self.shuffle_buffer, self.shard_interleave)
        stream.skip(start)
        return stream.take(count)


def eval_batches(
    data_dir: str | Path,
    split: str = "eval",
    *,
    batch_size: int,
    seed: int = 0,
    mlm_probability: float = 0.15,
    whole_word_masking: bool = False,
    rank: int = 0,
    world_size: int = 1,
    max_examples: int | None = None,
    pad_to_multiple_of: int = 8,
) -> Iterator[dict]:
    """One pass over a split in file order, same dicts as :class:`PretrainInput`, masks fixed by ``(seed, row)``.

    Every call yields the same batches, so eval losses are comparable across a run. Batch ``k``
    holds rows ``[k*B, (k+1)*B)`` (the last may be short); rank ``r`` gets batches ``k % W == r``
    — sum losses and counts over ranks.
    """
    if batch_size < 1:
        raise BertopsError(f"eval batch size {batch_size} must be positive")
    reader = ShardReader(data_dir, split)
    manifest = reader.manifest
    spec = _mask_spec(manifest, mlm_probability, whole_word_masking)
    pool, special = spec.replacement_pool(), spec.special_table()
    seq_len, pad_id = int(manifest["seq_len"]), int(manifest["tokenizer"]["special_ids"]["pad"])
    total = len(reader) if max_examples is None else min(len(reader), max_examples)
    for k, lo in enumerate(range(0, total, batch_size)):
        if k % world_size != rank:
            continue
        rows = []
        for i in range(lo, min(lo + batch_size, total)):
            ids, ws, a_len, nsp = reader.row(i)
            masked, labels = mask_tokens(ids, ws, spec, example_rng(seed, i), pool, special)
            rows.append((masked, labels, a_len, nsp))
        yield collate(rows, seq_len, pad_id, pad_to_multiple_of)


def check_tokenizer(data_dir: str | Path, tokenizer_dir: str | Path) -> None:
    """A one-line error unless ``tokenizer_dir`` holds the tokenizer the shards in ``data_dir`` were made with."""
    from bertops.tokenizer import load_tokenizer

    manifest = read_manifest(data_dir)
    if not Path(tokenizer_dir).exists():
        raise BertopsError(f"tokenizer folder {tokenizer_dir} not found; pass the folder the data was prepared with")
    got = tokenizer_hash(load_tokenizer(tokenizer_dir))
    want = manifest["tokenizer"]["hash"]
    if got != want:
        raise BertopsError(
            f"tokenizer {tokenizer_dir} (hash {got[:12]}) does not match the shards in {data_dir} "
            f"(made with {want[:12]}); use {Path(data_dir) / TOKENIZER_SUBDIR} or re-run `bertops data prepare`"
        )
