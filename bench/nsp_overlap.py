"""How much of next-sentence prediction word overlap alone solves, on prepared shards (an analysis, not a test).

Score of a pair: IDF-weighted cosine of the sets of tokens in A and in B (IDF from the train split;
special tokens left out). One threshold, fitted on the train pairs, labels a pair "random next"
below it. A random B comes from another document, so it rarely shares A's rare words: the
accuracy this reaches on the held-out pairs is what a model that compares A's and B's topics could
reach at least (docs/BENCHMARKS.md, "Learning").

    python bench/nsp_overlap.py SHARDS
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bertops.data.shards import read_examples, read_manifest


def load(data: Path, split: str) -> tuple[list[list[int]], list[int], np.ndarray]:
    t = read_examples(sorted(data.glob(f"{split}-*.parquet")), columns=["input_ids", "a_length", "next_sentence_label"])
    return t["input_ids"].to_pylist(), t["a_length"].to_pylist(), np.asarray(t["next_sentence_label"].to_pylist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="a `bertops data prepare` folder")
    data = ap.parse_args().data
    manifest = read_manifest(data)
    special = set(manifest["tokenizer"]["special_ids"].values())
    train_ids, train_a, train_y = load(data, "train")
    eval_ids, eval_a, eval_y = load(data, "eval")
    df = np.zeros(manifest["tokenizer"]["vocab_size"])
    for ids in train_ids:
        df[np.unique(ids)] += 1
    idf = np.log(len(train_ids) / (1 + df))

    def score(ids: list[int], a: int) -> float:
        sa, sb = set(ids[1 : a - 1]) - special, set(ids[a:-1]) - special
        if not sa or not sb:
            return 0.0
        return idf[list(sa & sb)].sum() / np.sqrt(idf[list(sa)].sum() * idf[list(sb)].sum())

    s_train = np.asarray([score(i, a) for i, a in zip(train_ids, train_a)])
    s_eval = np.asarray([score(i, a) for i, a in zip(eval_ids, eval_a)])
    best = max(np.quantile(s_train, np.linspace(0.01, 0.99, 197)), key=lambda th: np.mean((s_train < th) == train_y))
    print(f"word-overlap NSP, threshold {best:.4f} fitted on {len(train_y)} train pairs: "
          f"train accuracy {np.mean((s_train < best) == train_y):.3f}, "
          f"held-out accuracy {np.mean((s_eval < best) == eval_y):.3f} ({len(eval_y)} pairs)")


if __name__ == "__main__":
    main()
