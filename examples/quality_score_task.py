"""A bertops task defined outside the package: one quality / similarity score per text or text pair.

The head is a regression head: pooled [CLS] -> dropout -> Linear(hidden, 1) -> ``score`` (B, 1).
Parameter names are HF's (``bert.*``, ``classifier.*``), so a checkpoint saved by bertops also loads
in transformers' ``BertForSequenceClassification`` with ``num_labels=1`` (its regression mode).

Importing this module registers the task; from then on it exports, predicts and serves like a
built-in one::

    import quality_score_task                     # registers "quality-score"
    from bertops.export import export_onnx
    from bertops.infer import load_predictor
    from bertops.triton.builder import build_repository

    export_onnx(checkpoint_dir, "quality-score", "runs/quality")      # also copies this file in
    load_predictor("runs/quality").predict(["a text"], ["its pair"])  # [{"score": 0.42, "truncated": False}]
    build_repository("runs/quality", "quality", "triton_models")      # RESULT and SCORE outputs

The export folder and the Triton repository carry a copy of this file (``task_plugin.py``), which
``bertops.infer`` and Triton's python backend run when the task is not registered in their process.
So this file must be self-contained (import only installed packages) and must import torch only
inside ``build_model``: the served python models run without torch.
"""

from __future__ import annotations

from bertops.tasks import ServeOutput, Task, register_task


def build_model(cfg):
    """ModelConfig -> the encoder with a one-unit regression head (torch imported here, not at the top)."""
    import torch.nn.functional as F
    from torch import nn

    from bertops.model import BertModel

    class BertForQualityScore(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.bert = BertModel(cfg)
            self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
            self.classifier = nn.Linear(cfg.hidden_size, 1)
            nn.init.normal_(self.classifier.weight, std=cfg.initializer_range)
            nn.init.zeros_(self.classifier.bias)

        def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
            pooled = self.bert(input_ids, attention_mask, token_type_ids)["pooler_output"]
            out = {"score": self.classifier(self.dropout(pooled))}  # (B, 1)
            if labels is not None:
                out["loss"] = F.mse_loss(out["score"].view(-1).float(), labels.view(-1).float())
            return out

    return BertForQualityScore(cfg)


def postprocess(outputs, input_ids, offsets, word_ids, texts, info):
    """The (B, 1) ``score`` output -> ``{"score": float}`` per row (numpy only)."""
    return [{"score": float(s)} for s in outputs["score"].reshape(-1)]


QUALITY_SCORE = register_task(
    Task(
        name="quality-score",
        build_model=build_model,
        outputs=("score",),
        postprocess=postprocess,
        head_keys=("classifier.weight",),
        pairs=True,
        description="one regression score per text or text pair",
        hf_architecture="BertForSequenceClassification",  # with num_labels=1: HF's regression head
        serve_outputs=(ServeOutput("SCORE", "TYPE_FP32", 1, lambda answer, labels: [answer["score"]]),),
    )
)
