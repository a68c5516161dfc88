"""Next-sentence-prediction pairs as BERT's ``create_pretraining_data.py`` builds them, on token spans.

Documents are given as sentence boundaries into one flat token array (``bounds[d][k]`` is where
sentence ``k`` of document ``d`` starts, ``bounds[d][-1]`` where the document ends), so a segment is a
span ``[lo, hi)`` and no token is touched in Python until :func:`assemble` gathers them with numpy.

Per document a target length of ``seq_len - 3`` tokens (with probability ``short_seq_prob`` a random
one in [2, seq_len - 3]); sentences are gathered until the target is reached, a random split point
makes segment A, and B is the rest of the gathered sentences (actual next) or, half the time, a run
of sentences from another document (random next; the unused sentences are put back).
``truncate_seq_pair`` then trims the longer segment from a random end until the pair fits.

One deliberate difference: Google's script forces a random B whenever a single sentence was
gathered, which on short documents (Wikipedia leads average 3.8 sentences) makes ~62% of the pairs
random. Here the 50/50 coin is always fair: a lone sentence that draws "actual next" is paired with
the sentence after it (or, at the document's end, is the B of the sentence before it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

# Pairings per training document by default. One fixed pairing is memorised within a few passes
# (held-out NSP falls back to chance while train NSP climbs: docs/BENCHMARKS.md, "Learning"), so each
# pass of a run should meet new pairs. Google's script uses 10 for ~40 passes over its corpus; the
# shards grow linearly with it (prepare's time much less: tokenization is done once), and 5 covers
# the few passes a run over a corpus of this size makes. Runs of more passes: raise it.
DUPE_FACTOR = 5


@dataclass
class Pairs:
    """Pairs as parallel lists: token spans of A and B, the label, and where each segment came from."""

    a_lo: list[int] = field(default_factory=list)
    a_hi: list[int] = field(default_factory=list)
    b_lo: list[int] = field(default_factory=list)
    b_hi: list[int] = field(default_factory=list)
    random_next: list[int] = field(default_factory=list)  # 1: B from another document (the NSP label)
    doc: list[int] = field(default_factory=list)
    sentence_a: list[int] = field(default_factory=list)  # A's first sentence in its document
    doc_b: list[int] = field(default_factory=list)
    sentence_b: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.a_lo)

    @classmethod
    def from_rows(cls, rows: list[tuple]) -> "Pairs":
        """Columns from rows ``(a_lo, a_hi, b_lo, b_hi, random_next, doc, sentence_a, doc_b, sentence_b)``."""
        return cls(*map(list, zip(*rows))) if rows else cls()


def _randint(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] (inclusive, like ``random.randint``, but one draw)."""
    return lo + int(rng.random() * (hi - lo + 1))


def truncate_pair(a_lo: int, a_hi: int, b_lo: int, b_hi: int, max_tokens: int, rng: random.Random):
    """BERT's truncate_seq_pair on spans: trim the longer segment, from the front or the back at random."""
    while (a_hi - a_lo) + (b_hi - b_lo) > max_tokens:
        if a_hi - a_lo > b_hi - b_lo:
            if rng.random() < 0.5:
                a_lo += 1
            else:
                a_hi -= 1
        elif rng.random() < 0.5:
            b_lo += 1
        else:
            b_hi -= 1
    return a_lo, a_hi, b_lo, b_hi


def create_pairs(bounds: list[list[int]], pool: list[int], seq_len: int, short_seq_prob: float,
                 rng: random.Random, dupe_factor: int = 1, random_pool: list[int] | None = None) -> Pairs:
    """Pairs from documents ``pool`` (indices into ``bounds``; each with 2+ non-empty sentences).

    Random B segments come from other documents of ``random_pool`` (default ``pool``). The pool is
    walked ``dupe_factor`` times on one ``rng`` stream: each pass draws new target lengths, split
    points and random-next partners (BERT's ``dupe_factor``), and the first pass is the pairing that
    ``dupe_factor=1`` gives.
    """
    random_pool = pool if random_pool is None else random_pool
    max_tokens = seq_len - 3
    rows: list[tuple] = []
    add = rows.append
    for _ in range(dupe_factor):
        for di in pool:
            bd = bounds[di]
            n = len(bd) - 1
            target = max_tokens if rng.random() >= short_seq_prob else _randint(rng, 2, max_tokens)
            first = 0  # first sentence of the chunk being gathered
            i = 0
            while i < n:
                if i == n - 1 or bd[i + 1] - bd[first] >= target:
                    size = i - first + 1
                    a_end = first + (1 if size < 2 else _randint(rng, 1, size - 1))
                    random_next = rng.random() < 0.5
                    if size == 1 and not random_next:
                        # A lone sentence: its actual next is the following sentence, or at the
                        # document's end it is the actual next of the sentence before it.
                        s = i if i + 1 < n else i - 1
                        span = (bd[s], bd[s + 1], bd[s + 1], bd[s + 2])
                        if span[3] - span[0] > max_tokens:
                            span = truncate_pair(*span, max_tokens, rng)
                        add((*span, 0, di, s, di, s + 1))
                        i = max(i, s + 1) + 1
                        first = i
                        continue
                    a = (bd[first], bd[a_end])
                    if random_next:
                        other = di
                        for _try in range(10):
                            other = random_pool[int(rng.random() * len(random_pool))]
                            if other != di:
                                break
                        rb = bounds[other]
                        sb = int(rng.random() * (len(rb) - 1))
                        want = target - (a[1] - a[0])
                        j = sb + 1
                        while j < len(rb) - 1 and rb[j] - rb[sb] < want:
                            j += 1
                        b, doc_b = (rb[sb], rb[j]), other
                        i = a_end - 1  # the unused sentences go back
                    else:
                        b, doc_b, sb = (bd[a_end], bd[i + 1]), di, a_end
                    span = (a[0], a[1], b[0], b[1])
                    if (a[1] - a[0]) + (b[1] - b[0]) > max_tokens:  # (truncate_pair draws nothing when it fits)
                        span = truncate_pair(*span, max_tokens, rng)
                    add((*span, int(random_next), di, first, doc_b, sb))
                    first = i + 1
                i += 1
    return Pairs.from_rows(rows)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each (s, n), vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(total)


def assemble(tokens: np.ndarray, pairs: Pairs, cls_id: int, sep_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[CLS] A [SEP] B [SEP]`` for every pair: (flat int32 ids, (n+1) row offsets, (n,) a_length)."""
    a_lo, a_hi = np.asarray(pairs.a_lo, np.int64), np.asarray(pairs.a_hi, np.int64)
    b_lo, b_hi = np.asarray(pairs.b_lo, np.int64), np.asarray(pairs.b_hi, np.int64)
    la, lb = a_hi - a_lo, b_hi - b_lo
    lengths = la + lb + 3
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = np.empty(int(offsets[-1]), dtype=np.int32)
    row = offsets[:-1]
    out[row] = cls_id
    out[row + 1 + la] = sep_id
    out[offsets[1:] - 1] = sep_id
    out[_ranges(row + 1, la)] = tokens[_ranges(a_lo, la)]
    out[_ranges(row + 2 + la, lb)] = tokens[_ranges(b_lo, lb)]
    return out, offsets, la + 2
