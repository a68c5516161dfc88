"""Pretraining data: corpora (corpus), shard preparation (prepare), shard format (shards), input pipeline (pipeline), masking.

``sentences`` and ``SENTENCES_FILE`` are the bundled sentences' older import path, kept for the
demo, tests and benchmarks; new code imports :func:`bertops.data.corpus.bundled_sentences`.
"""

from __future__ import annotations

from bertops.data.corpus import BUNDLED_SENTENCES_FILE as SENTENCES_FILE
from bertops.data.corpus import bundled_sentences as sentences

__all__ = ["SENTENCES_FILE", "sentences"]
