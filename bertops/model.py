"""The BERT encoder and the built-in task heads (torch modules; bertops.tasks says which task uses which).

Module and parameter names are those of HF ``modeling_bert`` (``bert.encoder.layer.{i}.attention.
self.query`` ...), so HF checkpoints load without a mapping. Only what an encoder needs is here: no
decoder, cache, cross-attention or head pruning.

Shapes: B batch, T sequence length, H hidden size, nh heads, hs head size (H = nh * hs), V vocab.
Every forward returns a dict of named tensors; the names are the ONNX / Triton tensor names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bertops.config import ModelConfig

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # erf form, as in the original BERT
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def row_multiple(n: int) -> int:
    """What a count of ``n`` gathered rows is rounded up to a multiple of: 64, or 1/16 of n's power of two
    (at most 16 shapes per doubling, at most ~6% extra rows)."""
    return max(64, 1 << max(0, n.bit_length() - 5))


def rows_to_multiple(chosen: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Indices of the chosen rows (flat bool mask (R,)), followed by unchosen ones up to :func:`row_multiple`.

    Returns (indices (N',), N): the first N are the chosen rows in order. Training gathers rows whose
    count changes with every batch (real tokens, masked positions); on CPUs oneDNN caches a kernel,
    with its buffers, per matrix shape, so a new count per step grew a pretraining process by ~0.2 GB
    a step until the machine ran out of memory. Rounding the count keeps a few shapes, whose kernels
    are reused (a cache sized down instead ran 2x slower). The extra rows are positions the loss
    ignores, and their outputs are dropped.
    """
    picked = chosen.nonzero().squeeze(1)
    n = picked.numel()
    multiple = row_multiple(n)
    extra = min(-(-n // multiple) * multiple, chosen.numel()) - n
    if extra:
        picked = torch.cat([picked, (~chosen).nonzero().squeeze(1)[:extra]])
    return picked, n


def extended_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 1/0 mask -> (B, 1, 1, T) additive bias: 0 where attended, dtype's minimum at padding.

    Written as ``(1 - mask) * min`` because that is the pattern onnxruntime's BERT fusion matches.
    """
    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


def eager_attention(q, k, v, bias, dropout_p: float, scale: float) -> torch.Tensor:
    """Plain matmul-softmax-matmul. q, k, v: (B, nh, T, hs); bias: (B, 1, 1, T). Returns (B, nh, T, hs).

    Kept op-for-op like HF's eager BERT attention so exporters and graph fusers recognise it.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, nh, T, T)
    scores = scores + bias
    probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, v)


def sdpa_attention(q, k, v, bias, dropout_p: float, scale: float) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention (flash / memory-efficient kernels where they apply).

    Except when training on CPU (autograd recording): there SDPA with dropout falls back to an
    unfused math path, and without dropout its fused bf16 backward is slow at BERT's lengths, so
    :func:`eager_attention` (the same mathematics) runs instead. Measured with torch 2.13, seq 128,
    one thread, attention forward + backward: bf16 1.6-1.7x faster than SDPA, fp32 the same.
    Inference and export (no autograd) keep SDPA.
    """
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        return eager_attention(q, k, v, bias, dropout_p, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p, scale=scale)


ATTENTION_FUNCTIONS = {"eager": eager_attention, "sdpa": sdpa_attention}


class BertEmbeddings(nn.Module):
    """word + position + token type embeddings, then LayerNorm and dropout. (B, T) ids -> (B, T, H)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings)[None, :], persistent=False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        position_ids = self.position_ids[:, : input_ids.size(1)]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_size = cfg.head_size
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob
        self.attend = ATTENTION_FUNCTIONS[cfg.attn_implementation]

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, nh, T, hs)
        return x.view(x.size(0), x.size(1), self.num_heads, self.head_size).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        p = self.dropout_p if self.training else 0.0
        ctx = self.attend(q, k, v, bias, p, self.head_size**-0.5)  # (B, nh, T, hs)
        ctx = ctx.permute(0, 2, 1, 3).contiguous()
        return ctx.view(ctx.size(0), ctx.size(1), self.num_heads * self.head_size)  # (B, T, H)

    def forward_unpadded(self, h: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor, shape: tuple[int, int]):
        """The same attention for real tokens only: h (N, H) -> (N, H). ``keep`` (N,) are their indices
        in the flattened (B * T) batch of ``shape`` (B, T). The projections run on the N rows; only the
        (T x T) score step needs the padded layout, into which q, k, v are scattered (zeros at padding,
        which the bias masks as keys) and out of which the real rows are gathered again."""
        B, T = shape

        # one (N x H) @ (H x 3H) product instead of three: ~3% of a BERT-base fp32 step
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])  # (3H, H)
        qkv = F.linear(h, weight, torch.cat([self.query.bias, self.key.bias, self.value.bias]))  # (N, 3H)
        qkv = qkv.new_zeros(B * T, qkv.size(1)).index_copy(0, keep, qkv)  # (B * T, 3H), zeros at padding
        q, k, v = qkv.view(B, T, 3, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        p = self.dropout_p if self.training else 0.0
        ctx = self.attend(q, k, v, bias, p, self.head_size**-0.5)  # (B, nh, T, hs)
        return ctx.permute(0, 2, 1, 3).reshape(B * T, -1).index_select(0, keep)  # (N, H)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)

    def forward_unpadded(self, h: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor, shape: tuple[int, int]):
        """:meth:`forward` on the real tokens only, h (N, H) -> (N, H) (see BertEncoder)."""
        a = self.attention.output(self.attention.self.forward_unpadded(h, bias, keep, shape), h)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    """The layers. (B, T, H) -> (B, T, H).

    Unpadded training: while autograd records on the CPU, every layer's
    projections, feed-forward, LayerNorms and dropouts run on the N real tokens alone (as MosaicBERT
    does; plus a few padding rows, so that N keeps a few shapes: :func:`rows_to_multiple`); only
    the attention scores use the padded (B, T) layout. Real tokens get the same values
    and gradients as the padded computation (nothing reads padded positions: the attention bias
    masks them as keys, the heads read real or [CLS] positions); padded positions come back as zeros.
    Pretraining pairs of Wikipedia leads at seq 128 are ~28% padding in batches of 8, work HF's
    padded model does. Inference and ONNX export keep the padded graph (onnxruntime fuses it and
    bertops.infer groups rows by length instead); ``unpad = False`` turns it off. Not under ZeRO-3:
    it gathers a module's partitioned parameters only when that module runs, in an order every rank
    must repeat. The path never depends on the batch (a batch without padding is unpadded too), so
    every rank builds the same autograd graph and ZeRO's gradient buckets fill in the same order.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False  # trade compute for activation memory in training
        self.unpad = True  # real tokens only in CPU training (class doc)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.unpad and attention_mask is not None and self.training and torch.is_grad_enabled() \
                and x.device.type == "cpu" and not hasattr(self.layer[0].output.dense.weight, "ds_id"):
            return self._unpadded(x, bias, attention_mask)
        for layer in self.layer:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, bias, use_reentrant=False)
            else:
                x = layer(x, bias)
        return x

    def _unpadded(self, x: torch.Tensor, bias: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        keep, n = rows_to_multiple(attention_mask.reshape(-1) != 0)  # (N',) in B * T: the N real tokens first
        h = x.reshape(B * T, H).index_select(0, keep)  # (N', H)
        for layer in self.layer:
            if self.gradient_checkpointing:
                h = torch.utils.checkpoint.checkpoint(layer.forward_unpadded, h, bias, keep, (B, T), use_reentrant=False)
            else:
                h = layer.forward_unpadded(h, bias, keep, (B, T))
        return h.new_zeros(B * T, H).index_copy(0, keep[:n], h[:n]).view(B, T, H)


class BertPooler(nn.Module):
    """tanh(dense(hidden state of [CLS])): the sentence vector NSP and sequence classification use."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, H)
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    """The encoder. ``forward`` -> {"last_hidden_state": (B, T, H), "pooler_output": (B, H) if pooled}."""

    def __init__(self, cfg: ModelConfig, add_pooling_layer: bool = True):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg) if add_pooling_layer else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        hidden = self.encoder(x, extended_attention_mask(attention_mask, x.dtype), attention_mask)
        out = {"last_hidden_state": hidden}
        if self.pooler is not None:
            out["pooler_output"] = self.pooler(hidden)
        return out


# --- heads ----------------------------------------------------------------------------------------


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """Hidden states -> vocab logits. The decoder weight *is* the word embedding matrix (tied)."""

    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied: one tensor, two names
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., V)
        return self.decoder(self.transform(x)) + self.bias


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, word_embeddings)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, word_embeddings)
        self.seq_relationship = nn.Linear(cfg.hidden_size, 2)


def masked_lm(
    head: BertLMPredictionHead, hidden: torch.Tensor, labels: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """MLM logits and loss. Without labels: logits (B, T, V) everywhere (fill-mask inference).

    With labels (B, T), -100 meaning "not masked": logits only at the N masked positions, (N, V).
    The vocab projection is the largest matmul in pretraining and ~85% of positions are not
    masked, so computing it only where the loss needs it saves most of that cost.
    """
    if labels is None:
        return {"logits": head(hidden)}
    rows, n = rows_to_multiple(labels.view(-1) != -100)  # (N',): the N masked positions first
    logits = head(hidden.reshape(-1, hidden.size(-1)).index_select(0, rows))  # (N', V)
    loss = F.cross_entropy(logits.float(), labels.view(-1).index_select(0, rows))  # the extra rows' -100: ignored
    return {"logits": logits[:n], "mlm_loss": loss, "loss": loss}


def _init_weights(module: nn.Module, std: float) -> None:
    """BERT's init: N(0, std) for Linear / Embedding, ones / zeros for LayerNorm."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BertForPreTraining(nn.Module):
    """Masked-LM + next-sentence prediction. Outputs ``logits`` (MLM) and ``nsp_logits`` (B, 2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bert = BertModel(cfg)
        self.cls = BertPreTrainingHeads(cfg, self.bert.embeddings.word_embeddings)
        _init_weights(self, cfg.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, next_sentence_label=None):
        enc = self.bert(input_ids, attention_mask, token_type_ids)
        out = masked_lm(self.cls.predictions, enc["last_hidden_state"], labels)
        out["nsp_logits"] = self.cls.seq_relationship(enc["pooler_output"])
        if next_sentence_label is not None:
            out["nsp_loss"] = F.cross_entropy(out["nsp_logits"].float(), next_sentence_label.view(-1))
            out["loss"] = out.get("mlm_loss", 0.0) + out["nsp_loss"]
        return out


class BertForMaskedLM(nn.Module):
    """Masked-LM only (fill-mask). Output ``logits`` (B, T, V), or (N, V) at masked positions with labels."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(cfg, self.bert.embeddings.word_embeddings)
        _init_weights(self, cfg.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        enc = self.bert(input_ids, attention_mask, token_type_ids)
        return masked_lm(self.cls.predictions, enc["last_hidden_state"], labels)


class BertForSequenceClassification(nn.Module):
    """Pooled text -> ``logits`` (B, num_labels). Single sentences and pairs alike.

    ``cfg.classifier_pooling``: "cls" is BERT's pooler (dense + tanh on [CLS], HF's class); "mean"
    averages the real tokens (no pooler), which is what a sentence-transformers encoder's vectors
    mean: on BBC news, a logistic regression on all-MiniLM-L6-v2's frozen mean vectors scored
    0.98-0.99 test accuracy and one on its [CLS] vectors 0.97-0.98.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mean = cfg.classifier_pooling == "mean"
        self.bert = BertModel(cfg, add_pooling_layer=not self.mean)
        drop = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        self.dropout = nn.Dropout(drop)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        _init_weights(self, cfg.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        if self.mean and attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.bert(input_ids, attention_mask, token_type_ids)
        pooled = mean_pool(out["last_hidden_state"], attention_mask) if self.mean else out["pooler_output"]
        out = {"logits": self.classifier(self.dropout(pooled))}
        if labels is not None:
            out["loss"] = F.cross_entropy(out["logits"].float(), labels.view(-1))
        return out


class BertForTokenClassification(nn.Module):
    """Per-token ``logits`` (B, T, num_labels), e.g. BIO tags for NER. Labels -100 are ignored."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bert = BertModel(cfg, add_pooling_layer=False)
        drop = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        self.dropout = nn.Dropout(drop)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        _init_weights(self, cfg.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids)["last_hidden_state"]
        out = {"logits": self.classifier(self.dropout(hidden))}
        if labels is not None:
            out["loss"] = F.cross_entropy(out["logits"].flatten(0, 1).float(), labels.view(-1), ignore_index=-100)
        return out


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the real (unpadded) token vectors: (B, T, H), (B, T) -> (B, H)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class BertForEmbeddings(nn.Module):
    """Sentence embeddings as sentence-transformers computes them: mean pooling, then L2 norm.

    Outputs ``last_hidden_state`` (B, T, H) and ``sentence_embedding`` (B, H), unit length.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bert = BertModel(cfg, add_pooling_layer=False)
        _init_weights(self, cfg.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(input_ids, attention_mask, token_type_ids)["last_hidden_state"]
        pooled = mean_pool(hidden, attention_mask)
        return {"last_hidden_state": hidden, "sentence_embedding": F.normalize(pooled, p=2.0, dim=-1)}

