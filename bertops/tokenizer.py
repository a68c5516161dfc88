"""WordPiece tokenization with HF ``tokenizers``: load, train, and encode batches to numpy.

One loader for every checkpoint: ``tokenizer.json`` when present (exactly what the model was
trained with), else ``vocab.txt`` with BERT's normalisation (lowercase and accent stripping as in
``tokenizer_config.json``, CJK characters split, control characters removed). Pairs encode as
``[CLS] A [SEP] B [SEP]`` with token_type_ids 0 for A and 1 for B.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from bertops.errors import BertopsError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# The files a checkpoint / export / Triton model folder carries for its tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def _bert_template(tok: Tokenizer) -> None:
    from tokenizers.processors import TemplateProcessing

    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise BertopsError("the vocabulary has no [CLS] or [SEP] token; it is not a BERT WordPiece vocabulary")
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A folder (or file) with tokenizer.json or vocab.txt -> a ``tokenizers.Tokenizer``.

    Truncation and padding are switched off: :func:`encode` decides them per call.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.suffix == ".json" or (folder / "tokenizer.json").is_file() and path.is_dir():
        file = path if path.is_file() else folder / "tokenizer.json"
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise BertopsError(f"{file} is not a valid tokenizer.json ({exc}); re-create it") from None
    elif path.is_file() and path.suffix == ".txt" or (folder / "vocab.txt").is_file():
        vocab = path if path.is_file() else folder / "vocab.txt"
        settings = {}
        if (folder / "tokenizer_config.json").is_file():
            settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        lower = bool(settings.get("do_lower_case", True))
        tok = BertWordPieceTokenizer(
            str(vocab),
            lowercase=lower,
            strip_accents=settings.get("strip_accents"),  # None: strip when lowercasing, as BERT does
            handle_chinese_chars=settings.get("tokenize_chinese_chars", True),
            clean_text=True,
        )._tokenizer
        _bert_template(tok)
    else:
        raise BertopsError(f"{path} has no tokenizer.json or vocab.txt; pass a checkpoint or tokenizer folder")
    tok.no_truncation()
    tok.no_padding()
    return tok


def _first_non_utf8(files: Sequence[str | Path]) -> tuple[Path, int] | None:
    """(file, line) of the first line that is not UTF-8; None when every file decodes."""
    for f in files:
        with open(f, "rb") as fh:
            for n, line in enumerate(fh, 1):  # a newline byte never occurs inside a UTF-8 sequence
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return Path(f), n
    return None


def train_tokenizer(
    files: Sequence[str | Path],
    out_dir: str | Path,
    vocab_size: int = 30522,
    lowercase: bool = True,
    strip_accents: bool | None = None,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> Path:
    """Train a BERT WordPiece vocabulary on text files; writes tokenizer.json, vocab.txt and configs.

    The result loads with :func:`load_tokenizer` and with transformers' ``BertTokenizerFast``.
    """
    missing = [str(f) for f in files if not Path(f).is_file()]
    if not files or missing:
        raise BertopsError(f"input file {missing[0] if missing else '(none)'} not found; pass existing text files")
    if vocab_size < 100:
        raise BertopsError(f"--vocab-size {vocab_size} is too small for a WordPiece vocabulary; use at least 100")
    wp = BertWordPieceTokenizer(
        lowercase=lowercase, strip_accents=strip_accents, handle_chinese_chars=True, clean_text=True
    )
    try:
        wp.train(
            [str(f) for f in files],
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            limit_alphabet=1000,
            wordpieces_prefix="##",
            show_progress=show_progress,
        )
    except Exception:  # tokenizers raises a bare Exception on undecodable input
        bad = _first_non_utf8(files)
        if bad is None:
            raise
        raise BertopsError(
            f"{bad[0]} is not UTF-8 text (binary, or another encoding; first bad byte on line {bad[1]}); "
            "pass UTF-8 text files (re-encode with e.g. `iconv -t utf-8`)"
        ) from None
    if wp.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise BertopsError(
            f"{', '.join(str(f) for f in files)}: no text to learn a vocabulary from (empty or only whitespace); "
            "pass files with text in them"
        )
    _bert_template(wp._tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wp.save_model(str(out))  # vocab.txt
    wp._tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "BertTokenizer",
                "do_lower_case": lowercase,
                "strip_accents": strip_accents,
                "tokenize_chinese_chars": True,
                "model_max_length": 512,
                **{k: v for k, v in zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIAL_TOKENS)},
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps(dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIAL_TOKENS)), indent=2)
        + "\n",
        encoding="utf-8",
    )
    return out


@dataclass
class Batch:
    """Model inputs as int64 numpy arrays (B, T), plus what post-processing needs to map back to text.

    ``offsets[i]`` is a list of (start, end) character spans into the original text for each token
    ((0, 0) for special tokens); ``word_ids[i]`` tells which pre-tokenized word it belongs to (None for
    special tokens), so sub-tokens can be regrouped.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    offsets: list[list[tuple[int, int]]]
    word_ids: list[list[int | None]]
    truncated: list[bool]

    @property
    def lengths(self) -> np.ndarray:
        """(B,) real tokens per row."""
        return self.attention_mask.sum(axis=1)

    def select(self, rows: Sequence[int]) -> Batch:
        """The given rows, re-padded only to their own longest: a length bucket."""
        rows = list(rows)
        width = int(max(self.lengths[rows].max(), 1))
        return Batch(
            input_ids=self.input_ids[rows, :width],
            attention_mask=self.attention_mask[rows, :width],
            token_type_ids=self.token_type_ids[rows, :width],
            offsets=[self.offsets[i] for i in rows],
            word_ids=[self.word_ids[i] for i in rows],
            truncated=[self.truncated[i] for i in rows],
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "token_type_ids": self.token_type_ids}


def encode(
    tok: Tokenizer,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    max_length: int = 512,
    pad_to: int | None = None,
) -> Batch:
    """Tokenize a batch, truncating each input to ``max_length`` and padding to the longest (or ``pad_to``)."""
    if pairs is not None and len(pairs) != len(texts):
        raise BertopsError(f"got {len(texts)} texts but {len(pairs)} second texts; pairs must line up")
    inputs = list(zip(texts, pairs)) if pairs is not None else list(texts)
    tok.enable_truncation(max_length=max_length, strategy="longest_first")
    encs = tok.encode_batch(inputs)
    width = max([len(e.ids) for e in encs] + [pad_to or 0, 1])
    ids = np.zeros((len(encs), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for i, e in enumerate(encs):
        n = len(e.ids)
        ids[i, :n], mask[i, :n], types[i, :n] = e.ids, e.attention_mask, e.type_ids
    return Batch(
        input_ids=ids,
        attention_mask=mask,
        token_type_ids=types,
        offsets=[list(e.offsets) for e in encs],
        word_ids=[list(e.word_ids) for e in encs],
        truncated=[bool(e.overflowing) for e in encs],
    )
