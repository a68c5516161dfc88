"""Bundled real text: 256 English sentences (25-400 characters) from Python's own documentation.

They ship with the package so the demo, tests and benchmarks run offline on real, variably long
text. Larger corpora are read from files the user passes.
"""

from __future__ import annotations

from pathlib import Path

SENTENCES_FILE = Path(__file__).with_name("sentences.txt")


def sentences(n: int | None = None) -> list[str]:
    """The first ``n`` bundled sentences (all 256 when ``n`` is None), in a fixed order."""
    lines = [line for line in SENTENCES_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines if n is None else lines[:n]
