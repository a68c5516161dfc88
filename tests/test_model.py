"""The model on a tiny config (shapes, masking, heads) and golden parity against transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bertops.checkpoint import load_model, save_model
from bertops.model import BertForPreTraining, BertModel
from bertops.tasks import get_task
from bertops.tokenizer import encode, load_tokenizer
from conftest import tiny_config


def _inputs(batch=3, length=11, vocab=30522, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row
    mask[2, 3:] = 0
    types = torch.zeros_like(ids)
    types[0, 6:] = 1
    return ids, mask, types


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_shapes_every_head(impl):
    cfg = tiny_config(attn_implementation=impl, num_labels=3)
    ids, mask, types = _inputs()
    expected = {
        "pretraining": {"logits": (3, 11, 30522), "nsp_logits": (3, 2)},
        "fill-mask": {"logits": (3, 11, 30522)},
        "sequence-classification": {"logits": (3, 3)},
        "token-classification": {"logits": (3, 11, 3)},
        "embeddings": {"last_hidden_state": (3, 11, 32), "sentence_embedding": (3, 32)},
    }
    for task, shapes in expected.items():
        out = get_task(task).build_model(cfg).eval()(ids, mask, types)
        assert {k: tuple(v.shape) for k, v in out.items()} == shapes, task
    emb = get_task("embeddings").build_model(cfg).eval()(ids, mask, types)["sentence_embedding"]
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def test_eager_and_sdpa_agree_and_padding_is_ignored():
    torch.manual_seed(0)
    eager = BertModel(tiny_config(attn_implementation="eager")).eval()
    sdpa = BertModel(tiny_config(attn_implementation="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    ids, mask, types = _inputs()
    a = eager(ids, mask, types)["last_hidden_state"]
    b = sdpa(ids, mask, types)["last_hidden_state"]
    real = mask.bool()
    assert (a - b)[real].abs().max() < 1e-5
    # Changing what sits in padded positions must not change the real tokens' outputs.
    ids2 = ids.clone()
    ids2[~real] = 7
    c = eager(ids2, mask, types)["last_hidden_state"]
    assert (a - c)[real].abs().max() < 1e-6


def test_mlm_loss_sparse_equals_full_logits():
    """Logits only at masked positions give exactly the loss of full logits."""
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config()).eval()
    ids, mask, types = _inputs()
    labels = torch.full_like(ids, -100)
    labels[0, [1, 4, 9]] = ids[0, [1, 4, 9]]
    labels[1, [2]] = 17
    labels[2, [0, 1]] = ids[2, [0, 1]]
    sparse = model(ids, mask, types, labels=labels)
    full_logits = model(ids, mask, types)["logits"]
    full_loss = F.cross_entropy(full_logits.view(-1, full_logits.size(-1)), labels.view(-1), ignore_index=-100)
    assert sparse["logits"].shape == (6, 30522)
    torch.testing.assert_close(sparse["mlm_loss"], full_loss, rtol=1e-6, atol=1e-6)
    # and the masked rows of the sparse logits are the same numbers
    torch.testing.assert_close(sparse["logits"], full_logits[labels != -100])


def test_gathered_rows_come_in_a_few_shapes_chosen_rows_first():
    """Training gathers a varying number of rows (real tokens, masked positions); rounded up (to 64, or 1/16 of
    their power of two) they keep a few shapes, so CPU kernels cached per shape are reused instead of piling up."""
    from bertops.model import rows_to_multiple

    torch.manual_seed(0)
    shapes = set()
    for _ in range(50):
        chosen = torch.rand(16 * 128) < 0.15
        rows, n = rows_to_multiple(chosen)
        assert n == int(chosen.sum()) and rows.numel() % 64 == 0 and rows.numel() - n < 64
        assert torch.equal(rows[:n], chosen.nonzero().squeeze(1))  # the chosen rows, in order
        assert not chosen[rows[n:]].any() and rows.unique().numel() == rows.numel()  # then distinct others
        shapes.add(rows.numel())
    assert len(shapes) <= 4  # ~307 of 2048 +- 16: 50 counts, a few multiples of 64
    big = torch.ones(64 * 512, dtype=torch.bool)
    big[torch.randperm(big.numel())[:2768]] = False  # 30,000 real tokens of 64 x 512
    rows, n = rows_to_multiple(big)
    assert n == 30000 and rows.numel() == 30720  # a multiple of 1,024: 2.4% extra
    rows, n = rows_to_multiple(torch.ones(100, dtype=torch.bool))
    assert n == rows.numel() == 100  # never more rows than there are
    rows, n = rows_to_multiple(torch.arange(256) % 2 == 0)
    assert n == rows.numel() == 128  # a multiple already: nothing added


@pytest.mark.parametrize("task,checkpointing", [("pretraining", False), ("pretraining", True),
                                                 ("token-classification", False), ("sequence-classification", False)])
def test_unpadded_training_equals_padded(task, checkpointing):
    """CPU training runs the layers on real tokens only (BertEncoder.unpad): the same loss and the
    same gradients as the padded computation (no dropout, so both draw nothing random), padded
    positions of the output zero, and a batch without padding gives the padded path's numbers too."""
    torch.manual_seed(0)
    cfg = tiny_config(num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      classifier_pooling="mean")  # (read by sequence classification only)
    model = get_task(task).build_model(cfg).train()
    model.bert.encoder.gradient_checkpointing = checkpointing
    ids, mask, types = _inputs()
    if task == "pretraining":
        labels = torch.full_like(ids, -100)
        labels[0, [1, 9]], labels[1, 2], labels[2, 0] = ids[0, [1, 9]], ids[1, 2], ids[2, 0]
        kwargs = {"labels": labels, "next_sentence_label": torch.tensor([0, 1, 1])}
    elif task == "sequence-classification":  # the mean over real tokens must not see the padded zeros
        kwargs = {"labels": torch.tensor([2, 0, 1])}
    else:
        kwargs = {"labels": torch.randint(0, 3, ids.shape).masked_fill(mask == 0, -100)}
    runs = {}
    for unpad in (False, True):
        model.zero_grad()
        model.bert.encoder.unpad = unpad
        out = model(ids, mask, types, **kwargs)
        out["loss"].backward()
        runs[unpad] = out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-6, atol=1e-6)
    assert runs[True][1].keys() == runs[False][1].keys()
    for name, grad in runs[True][1].items():
        torch.testing.assert_close(grad, runs[False][1][name], rtol=1e-5, atol=1e-6, msg=name)
    hidden = model.bert(ids, mask, types)["last_hidden_state"]
    assert hidden.requires_grad and (hidden[mask == 0] == 0).all()  # unpadded: zeros where padded
    full = torch.ones_like(mask)
    model.bert.encoder.unpad = False
    padded = model.bert(ids, full, types)["last_hidden_state"]
    model.bert.encoder.unpad = True
    torch.testing.assert_close(model.bert(ids, full, types)["last_hidden_state"], padded)


def test_mean_pooled_classifier_reads_the_average_of_real_tokens():
    """classifier_pooling="mean": logits = classifier(mean of the real tokens' vectors), no pooler; padding changes nothing."""
    from bertops.errors import BertopsError

    torch.manual_seed(0)
    model = get_task("sequence-classification").build_model(tiny_config(num_labels=3, classifier_pooling="mean")).eval()
    assert model.bert.pooler is None and not any(n.startswith("bert.pooler") for n in model.state_dict())
    ids, mask, types = _inputs()
    with torch.no_grad():
        hidden = model.bert(ids, mask, types)["last_hidden_state"]
        mean = torch.stack([hidden[i, mask[i] == 1].mean(0) for i in range(len(ids))])
        torch.testing.assert_close(model(ids, mask, types)["logits"], model.classifier(mean))
        n = int(mask[1].sum())
        alone = model(ids[1:2, :n], mask[1:2, :n], types[1:2, :n])["logits"]
    torch.testing.assert_close(alone, model.classifier(mean[1:2]), rtol=1e-5, atol=1e-5)
    with pytest.raises(BertopsError, match="classifier_pooling='max' is unknown"):
        tiny_config(classifier_pooling="max").validate()


def test_decoder_is_tied_to_word_embeddings():
    model = BertForPreTraining(tiny_config())
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_nsp_and_classification_losses_backprop():
    torch.manual_seed(0)
    cfg = tiny_config(num_labels=3)
    ids, mask, types = _inputs()
    model = get_task("pretraining").build_model(cfg).train()
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]
    out = model(ids, mask, types, labels=labels, next_sentence_label=torch.tensor([0, 1, 0]))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.bert.embeddings.word_embeddings.weight.grad is not None
    tok = get_task("token-classification").build_model(cfg)
    tl = torch.randint(0, 3, ids.shape).masked_fill(mask == 0, -100)
    assert torch.isfinite(tok(ids, mask, types, labels=tl)["loss"])


# --- golden parity on the real all-MiniLM-L6-v2 weights ------------------------------------------


@pytest.fixture(scope="module")
def real_batch(minilm_dir, sentences):
    tok = load_tokenizer(minilm_dir)
    texts = sentences[:24]  # 24 real sentences, 8 to ~90 tokens, padded to the longest
    batch = encode(tok, texts)
    assert len(set(batch.lengths.tolist())) > 10  # genuinely different lengths
    return texts, {k: torch.from_numpy(v) for k, v in batch.arrays().items()}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_parity_with_transformers_on_real_weights(minilm_dir, real_batch, impl):
    transformers = pytest.importorskip("transformers")
    _, inputs = real_batch
    hf = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation=impl).eval()
    ours, _ = load_model(minilm_dir, "embeddings", attn_implementation=impl)
    with torch.no_grad():
        ref = hf(**inputs).last_hidden_state
        got = ours(**inputs)
    # every position, padding included
    assert (got["last_hidden_state"] - ref).abs().max().item() < 1e-5
    # sentence-transformers' recipe: mean pooling over real tokens, then L2 normalisation
    m = inputs["attention_mask"].unsqueeze(-1).float()
    st = F.normalize((ref * m).sum(1) / m.sum(1), dim=-1)
    assert (got["sentence_embedding"] - st).abs().max().item() < 1e-5
    # and the embeddings mean something: a sentence is closest to itself
    sims = got["sentence_embedding"] @ st.T
    assert torch.equal(sims.argmax(dim=1), torch.arange(len(sims)))


def test_tokenizer_matches_transformers(minilm_dir, sentences):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    texts = sentences[:32] + ["Crème brûlée in Zürich, 東京 and   extra   spaces!"]
    for source in (minilm_dir, minilm_dir / "vocab.txt"):
        ours = encode(load_tokenizer(source), texts)
        ref = hf(texts, padding=True, return_tensors="np")
        assert ours.input_ids.tolist() == ref["input_ids"].tolist()
        assert ours.attention_mask.tolist() == ref["attention_mask"].tolist()
    pair = encode(load_tokenizer(minilm_dir), texts[:4], pairs=texts[4:8])
    ref = hf(texts[:4], texts[4:8], padding=True, return_tensors="np")
    assert pair.input_ids.tolist() == ref["input_ids"].tolist()
    assert pair.token_type_ids.tolist() == ref["token_type_ids"].tolist()


# --- checkpoint round trip ------------------------------------------------------------------------


def test_round_trip_identical_tensors_and_loads_in_transformers(tmp_path, minilm_dir):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tiny_config(num_labels=3)
    model = BertForPreTraining(cfg).eval()
    save_model(model, tmp_path, tokenizer_dir=minilm_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= {p.name for p in tmp_path.iterdir()}
    loaded, cfg2 = load_model(tmp_path, "pretraining")
    assert cfg2 == cfg
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids, mask, types = _inputs()
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ours = model(ids, mask, types)
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert (ours["logits"] - ref.prediction_logits).abs().max() < 1e-5
    assert (ours["nsp_logits"] - ref.seq_relationship_logits).abs().max() < 1e-5


def test_base_checkpoint_loads_into_heads_only_on_request(minilm_dir):
    from bertops.errors import BertopsError

    with pytest.raises(BertopsError, match="no sequence-classification head"):
        load_model(minilm_dir, "sequence-classification")
    model, cfg = load_model(minilm_dir, "sequence-classification", new_head=True, num_labels=4)
    assert model.classifier.out_features == 4 and cfg.hidden_size == 384
