"""TF-IDF + logistic-regression baseline for a text-classification data set, on the split the model uses.

The bar a fine-tuned model has to clear (issue 10, acceptance 1): scikit-learn's TfidfVectorizer
(sublinear tf) and LogisticRegression, trained on the training split; the n-gram range and C are
chosen on the validation split (accuracy, ties broken by the lower validation log-loss), and the
chosen pipeline is then scored once on the test split. The test split picks nothing.

Two views of each text:

  whole      the whole text (the strongest baseline)
  tokens:N   each text cut where the model's tokenizer cuts it at N tokens ([CLS]/[SEP] included):
             the baseline sees exactly what a model with data.max_seq_len=N sees

    python bench/tfidf_baseline.py [--data bbc-news] [--max-seq-len 128 --max-seq-len 512]
        [--tokenizer all-MiniLM-L6-v2] [--out bench/results/tfidf_baseline.json]

Prints one JSON object per view (chosen settings, validation and test accuracy and macro-F1) and
writes all of them to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

NGRAMS = ((1, 1), (1, 2))
CS = (1.0, 3.0, 10.0, 30.0, 100.0)


def read(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r[text_column] for r in rows], [r[label_column] for r in rows]


def split_paths(data: str) -> dict[str, Path]:
    """A `bertops data fetch` name, or a folder with train.jsonl / validation.jsonl / test.jsonl -> their paths."""
    if Path(data).is_dir():
        return {s: Path(data) / f"{s}.jsonl" for s in ("train", "validation", "test")}
    from bertops.data.datasets import fetch

    return fetch(data)


def model_view(texts: list[str], tokenizer: str, max_length: int) -> list[str]:
    """Each text cut after the last character of its last token at ``max_length`` tokens (the model's truncation)."""
    from bertops.checkpoint import resolve_model_dir
    from bertops.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_model_dir(tokenizer))
    tok.enable_truncation(max_length=max_length)
    return [t[: max((end for _, end in e.offsets), default=0)] for t, e in zip(texts, tok.encode_batch(texts))]


def pipeline(ngram: tuple[int, int], c: float):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(TfidfVectorizer(sublinear_tf=True, ngram_range=ngram), LogisticRegression(C=c, max_iter=5000))


def scores(model, texts: list[str], labels: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    pred = model.predict(texts)
    return {"accuracy": float(accuracy_score(labels, pred)), "macro_f1": float(f1_score(labels, pred, average="macro")),
            "log_loss": float(log_loss(labels, model.predict_proba(texts), labels=model.classes_))}


def baseline(splits: dict[str, tuple[list[str], list[str]]]) -> dict:
    """Grid over n-grams x C on validation; the chosen pipeline scored on validation and test."""
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = splits["train"], splits["validation"], splits["test"]
    grid = []
    for ngram, c in itertools.product(NGRAMS, CS):
        model = pipeline(ngram, c).fit(train_x, train_y)
        grid.append({"ngram_range": list(ngram), "C": c, "validation": scores(model, val_x, val_y), "model": model})
    best = max(grid, key=lambda g: (g["validation"]["accuracy"], -g["validation"]["log_loss"]))
    return {
        "chosen": {"ngram_range": best["ngram_range"], "C": best["C"]},
        "validation": best["validation"],
        "test": scores(best["model"], test_x, test_y),
        "grid": [{k: v for k, v in g.items() if k != "model"} for g in grid],
        "examples": {"train": len(train_x), "validation": len(val_x), "test": len(test_x)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="bbc-news", help="a `bertops data fetch` name, or a folder with "
                    "train.jsonl / validation.jsonl / test.jsonl")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--label-column", default="label")
    ap.add_argument("--max-seq-len", type=int, action="append", default=[],
                    help="also score the texts cut at this many model tokens (repeatable)")
    ap.add_argument("--tokenizer", default="all-MiniLM-L6-v2", help="tokenizer of --max-seq-len (folder or bundled name)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/tfidf_baseline.json"))
    args = ap.parse_args()

    paths = split_paths(args.data)
    raw = {s: read(p, args.text_column, args.label_column) for s, p in paths.items()}
    views = {"whole": raw}
    for n in args.max_seq_len:
        views[f"tokens:{n}"] = {s: (model_view(x, args.tokenizer, n), y) for s, (x, y) in raw.items()}
    results = {"data": args.data, "views": {}}
    for name, splits in views.items():
        result = baseline(splits)
        results["views"][name] = result
        print(json.dumps({"view": name, **{k: v for k, v in result.items() if k != "grid"}}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
