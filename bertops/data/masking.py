"""Dynamic masked-LM masking of one example at load time (BERT's 15% with 80/10/10, optional whole words).

As BERT's ``create_masked_lm_predictions``: ``max(1, round(p * n))`` of the ``n`` maskable tokens are
predicted, chosen by shuffling candidate groups (single tokens, or whole words with whole-word
masking: a word-start token and the ``##`` continuations after it) and taking groups in that order,
skipping a group that would overshoot the count. Each chosen token becomes ``[MASK]`` with
probability 0.8, a random non-special token with 0.1, and stays itself with 0.1. Special tokens
([CLS], [SEP], [PAD], ...) are never candidates.

The random generator is seeded by ``(seed, example index in the global stream)``, so an example's
masks do not depend on the world size, the rank or the batch it lands in, and an example seen again
in a later epoch (a new stream index) gets new masks — dynamic masking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100
_MASK_STREAM = 0x6D61736B  # separates masking draws from the shuffle's, which share the user's seed


@dataclass(frozen=True)
class MaskSpec:
    """What masking needs to know about the vocabulary."""

    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]  # never masked, never drawn as random replacements
    probability: float = 0.15
    whole_word: bool = False

    def special_table(self) -> np.ndarray:
        """(vocab_size,) bool: True for the special ids."""
        table = np.zeros(self.vocab_size, dtype=bool)
        table[[i for i in self.special_ids if 0 <= i < self.vocab_size]] = True
        return table

    def replacement_pool(self) -> np.ndarray:
        return np.flatnonzero(~self.special_table()).astype(np.int64)


def example_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for the example at global stream position ``index``."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, _MASK_STREAM, int(index)])


def mask_tokens(
    ids: np.ndarray,
    word_start: np.ndarray | None,
    spec: MaskSpec,
    rng: np.random.Generator,
    pool: np.ndarray | None = None,
    special: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(masked input_ids, labels) for one unpadded example; labels are -100 where nothing is predicted.

    ``pool`` (:meth:`MaskSpec.replacement_pool`) and ``special`` (:meth:`MaskSpec.special_table`)
    may be passed precomputed.
    """
    ids = np.asarray(ids, dtype=np.int64)
    n = ids.shape[0]
    labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
    candidate = ~(spec.special_table() if special is None else special)[ids]
    n_cand = int(candidate.sum())
    if n_cand == 0 or spec.probability <= 0:
        return ids.copy(), labels
    want = max(1, int(round(n_cand * spec.probability)))
    positions = np.flatnonzero(candidate)
    if spec.whole_word and word_start is not None:
        # A group starts at a word start, or where the previous position cannot extend it.
        ws = np.asarray(word_start, dtype=bool)
        prev_cand = np.concatenate([[False], candidate[:-1]])
        starts = candidate & (ws | ~prev_cand)
        group_of = np.cumsum(starts)[positions] - 1  # group index per candidate position
        n_groups = int(group_of[-1]) + 1
        bounds = np.searchsorted(group_of, np.arange(n_groups + 1))
        chosen: list[int] = []
        total = 0
        for g in rng.permutation(n_groups):
            size = int(bounds[g + 1] - bounds[g])
            if total + size > want:
                continue
            chosen.extend(positions[bounds[g] : bounds[g + 1]].tolist())
            total += size
            if total >= want:
                break
        picked = np.asarray(sorted(chosen), dtype=np.int64)
    else:
        picked = np.sort(rng.permutation(positions)[:want])
    out = ids.copy()
    labels[picked] = ids[picked]
    action = rng.random(picked.shape[0])
    to_mask = picked[action < 0.8]
    to_random = picked[action >= 0.9]
    out[to_mask] = spec.mask_id
    if to_random.size:
        pool = spec.replacement_pool() if pool is None else pool
        out[to_random] = pool[rng.integers(0, pool.shape[0], size=to_random.shape[0])]
    return out, labels
