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
from bisect import bisect_left
from dataclasses import dataclass

import numpy as np

# Pairings per training document by default. One fixed pairing is memorised within a few passes
# (held-out NSP falls back to chance while train NSP climbs: docs/BENCHMARKS.md, "Learning"), so each
# pass of a run should meet new pairs. Google's script uses 10 for ~40 passes over its corpus; the
# shards grow linearly with it (prepare's time much less: tokenization is done once), and 5 covers
# the few passes a run over a corpus of this size makes. Runs of more passes: raise it.
DUPE_FACTOR = 5


# A pair's fields, in the order create_pairs collects them.
FIELDS = ("a_lo", "a_hi", "b_lo", "b_hi", "random_next", "doc", "sentence_a", "doc_b", "sentence_b")


@dataclass
class Pairs:
    """Pairs as parallel (n,) int64 arrays of :data:`FIELDS`: token spans of A and B, the label, and sources.

    ``random_next`` is 1 where B is from another document (the NSP label); ``sentence_a`` is A's
    first sentence in document ``doc``, ``sentence_b`` B's in ``doc_b``.
    """

    a_lo: np.ndarray
    a_hi: np.ndarray
    b_lo: np.ndarray
    b_hi: np.ndarray
    random_next: np.ndarray
    doc: np.ndarray
    sentence_a: np.ndarray
    doc_b: np.ndarray
    sentence_b: np.ndarray

    def __len__(self) -> int:
        return len(self.a_lo)

    @classmethod
    def from_flat(cls, flat: list[int]) -> Pairs:
        """Columns from the pairs' :data:`FIELDS` one pair after another in one flat list."""
        rows = np.fromiter(flat, dtype=np.int64, count=len(flat)).reshape(-1, len(FIELDS))
        return cls(*rows.T)


def truncate_pair(a_lo: int, a_hi: int, b_lo: int, b_hi: int, max_tokens: int, rng: random.Random):
    """BERT's truncate_seq_pair on spans: trim the longer segment (B on a tie), from the front or the back at random.

    The longer-first rule alone fixes how many tokens each segment loses (the longer one down to the
    shorter, then one each, B first); each of a segment's ``k`` trims is a fair coin between its front
    and its back, so the front's share is the number of set bits in ``k`` random bits: the same
    Binomial(k, 1/2) as BERT's token-by-token loop, in one draw per segment instead of one per token.
    """
    la, lb = a_hi - a_lo, b_hi - b_lo
    excess = la + lb - max_tokens
    if excess <= 0:
        return a_lo, a_hi, b_lo, b_hi
    gap = abs(la - lb)
    first = min(excess, gap)  # from the longer segment, until both are as long
    rest = excess - first  # then alternately, B first
    ka = (first if la > lb else 0) + rest // 2
    kb = excess - ka
    fa = rng.getrandbits(ka).bit_count() if ka else 0
    fb = rng.getrandbits(kb).bit_count() if kb else 0
    return a_lo + fa, a_hi - (ka - fa), b_lo + fb, b_hi - (kb - fb)


def create_pairs(bounds: list[list[int]], pool: list[int], seq_len: int, short_seq_prob: float,
                 rng: random.Random, dupe_factor: int = 1, random_pool: list[int] | None = None) -> Pairs:
    """Pairs from documents ``pool`` (indices into ``bounds``; each with 2+ non-empty sentences).

    Random B segments come from other documents of ``random_pool`` (default ``pool``). The pool is
    walked ``dupe_factor`` times on one ``rng`` stream: each pass draws new target lengths, split
    points and random-next partners (BERT's ``dupe_factor``), and the first pass is the pairing that
    ``dupe_factor=1`` gives. A uniform integer in [lo, hi] is ``lo + int(draw() * (hi - lo + 1))``
    (one draw, unlike ``random.randint``).
    """
    random_pool = pool if random_pool is None else random_pool
    n_random = len(random_pool)
    max_tokens = seq_len - 3
    draw = rng.random
    # The pairs' fields go one after another into one list of ints. A list of one tuple per pair
    # (~17,000 per 2,000-document chunk at dupe factor 5) set off the garbage collector's full passes
    # over every live object: about a third of the pairing time.
    flat: list[int] = []
    add = flat.extend
    for _ in range(dupe_factor):
        for di in pool:
            bd = bounds[di]
            n = len(bd) - 1
            target = max_tokens if draw() >= short_seq_prob else 2 + int(draw() * (max_tokens - 1))
            first = 0  # first sentence of the chunk being gathered
            while first < n:
                # The chunk ends at the sentence that brings it to target tokens, or the document's last.
                i = bisect_left(bd, bd[first] + target, first + 1, n) - 1
                size = i - first + 1
                a_end = first + 1 if size < 2 else first + 1 + int(draw() * (size - 1))
                random_next = draw() < 0.5
                if size == 1 and not random_next:
                    # A lone sentence: its actual next is the following sentence, or at the
                    # document's end it is the actual next of the sentence before it.
                    s = i if i + 1 < n else i - 1
                    span = (bd[s], bd[s + 1], bd[s + 1], bd[s + 2])
                    if span[3] - span[0] > max_tokens:
                        span = truncate_pair(*span, max_tokens, rng)
                    add((*span, 0, di, s, di, s + 1))
                    first = max(i, s + 1) + 1
                    continue
                a_lo, a_hi = bd[first], bd[a_end]
                if random_next:
                    other = di
                    for _try in range(10):
                        other = random_pool[int(draw() * n_random)]
                        if other != di:
                            break
                    rb = bounds[other]
                    sb = int(draw() * (len(rb) - 1))
                    # B: sentences from sb on until target - len(A) tokens are gathered, or the document ends
                    b_lo, b_hi = rb[sb], rb[bisect_left(rb, rb[sb] + target - (a_hi - a_lo), sb + 1, len(rb) - 1)]
                    doc_b, next_first = other, a_end  # the unused sentences go back
                else:
                    b_lo, b_hi, doc_b, sb, next_first = bd[a_end], bd[i + 1], di, a_end, i + 1
                if (a_hi - a_lo) + (b_hi - b_lo) > max_tokens:  # (truncate_pair draws nothing when it fits)
                    a_lo, a_hi, b_lo, b_hi = truncate_pair(a_lo, a_hi, b_lo, b_hi, max_tokens, rng)
                add((a_lo, a_hi, b_lo, b_hi, int(random_next), di, first, doc_b, sb))
                first = next_first
    return Pairs.from_flat(flat)


def assemble(tokens: np.ndarray, pairs: Pairs, cls_id: int, sep_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[CLS] A [SEP] B [SEP]`` for every pair: (flat int32 ids, (n+1) row offsets, (n,) a_length).

    One gather: a row is five runs of positions into ``tokens`` with [CLS] and [SEP] appended (the
    [CLS], A's span, the [SEP], B's span, the [SEP]), and run r's positions are ``arange`` shifted
    by ``start[r] - (where r begins in the output)``, repeated over the run.
    """
    n = len(pairs)
    idx = np.int32 if len(tokens) + 2 < 1 << 31 else np.int64  # half the memory traffic of int64 positions
    starts = np.empty((n, 5), dtype=idx)
    starts[:, 0], starts[:, 1], starts[:, 2], starts[:, 3], starts[:, 4] = (
        len(tokens), pairs.a_lo, len(tokens) + 1, pairs.b_lo, len(tokens) + 1)
    lengths = np.ones((n, 5), dtype=idx)
    lengths[:, 1], lengths[:, 3] = pairs.a_hi - pairs.a_lo, pairs.b_hi - pairs.b_lo
    ends = np.cumsum(lengths.ravel(), dtype=np.int64)  # where each run ends in the output
    offsets = np.concatenate([[0], ends[4::5]])
    shift = np.repeat(starts.ravel() - (ends - lengths.ravel()).astype(idx), lengths.ravel())
    positions = shift + np.arange(len(shift), dtype=idx)
    ids = np.append(tokens, np.array([cls_id, sep_id], dtype=np.int32))[positions]
    return ids, offsets, (lengths[:, 1] + 2).astype(np.int64)
