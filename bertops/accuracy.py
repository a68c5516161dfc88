"""The accuracy gate of reduced-precision exports: a candidate graph (int8, bf16) against the fp32 graph.

A reduced-precision export is only written when its *answers* stay those of fp32 on real text. Each
task's record names its gate (``Task.gate``); a gate compares what the task's post-processing answers
(``Task.postprocess``: labels, spans, embeddings) for the same inputs:

* embeddings (:func:`embedding_gate`): cosine of every sentence vector to its fp32 vector, mean and
  min (gated), and how often a sentence's nearest neighbour among the others stays the same (reported);
* one label per row (:func:`label_gate`): share of rows with the same label (gated);
* entity spans (:func:`span_gate`): entity-level F1 of the candidate's spans (label, start, end)
  taking fp32's spans as the reference, so ``1 - F1`` bounds how far any entity F1 against gold can move;
* per-token top-1 (:func:`token_gate`, fill-mask): share of real tokens with the same argmax.

With labelled evaluation data (``--eval-data``) :func:`metric_drop` also runs the task's own metrics
(``Task.metrics``, ``Task.main_metric``) on both graphs and gates the main metric's drop in points.

:func:`output_cosine` is the continuous figure used to rank layers by sensitivity (how far a layer's
quantization moves the task's outputs), which a label-agreement figure is too coarse for.

numpy only at import: the gate functions are called at export time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class GateLimits:
    """Thresholds of the gate (``export.gate_*`` config keys, ``--gate-*`` options)."""

    min_mean_cosine: float = 0.99  # embeddings: mean cosine to fp32
    min_cosine: float = 0.97  # embeddings: worst sentence's cosine to fp32
    min_agreement: float = 0.99  # labels / top-1 tokens: share identical to fp32
    max_drop_points: float = 0.5  # entity F1 vs fp32's spans, and --eval-data's main metric: points (of 100) lost


@dataclass
class Run:
    """One graph's results on the gate inputs: the task's read outputs and answers, batch by batch."""

    outputs: list[dict[str, np.ndarray]]  # per batch: read output name -> array
    answers: list[dict]  # one per row, all batches in order
    masks: list[np.ndarray]  # per batch: attention_mask (B, T), to compare per-token outputs on real tokens


@dataclass
class GateResult:
    figures: dict[str, Any]
    failures: list[str] = field(default_factory=list)  # one short clause per missed threshold; [] = passed

    @property
    def passed(self) -> bool:
        return not self.failures


Gate = Callable[[Run, Run, GateLimits], GateResult]


def embedding_gate(ref: Run, got: Run, limits: GateLimits) -> GateResult:
    a = np.asarray([r["embedding"] for r in ref.answers], dtype=np.float64)
    b = np.asarray([r["embedding"] for r in got.answers], dtype=np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    cos = np.nan_to_num((a * b).sum(1), nan=-1.0)
    sim_a, sim_b = a @ a.T, b @ b.T
    np.fill_diagonal(sim_a, -np.inf)
    np.fill_diagonal(sim_b, -np.inf)
    figures = {
        "rows": len(cos),
        "mean_cosine": round(float(cos.mean()), 5),
        "min_cosine": round(float(cos.min()), 5),
        "nearest_neighbour_agreement": round(float((sim_a.argmax(1) == sim_b.argmax(1)).mean()), 4),
    }
    failures = []
    if not figures["mean_cosine"] >= limits.min_mean_cosine:
        failures.append(f"mean cosine {figures['mean_cosine']:.4f} < {limits.min_mean_cosine:g} (--gate-min-mean-cosine)")
    if not figures["min_cosine"] >= limits.min_cosine:
        failures.append(f"min cosine {figures['min_cosine']:.4f} < {limits.min_cosine:g} (--gate-min-cosine)")
    return GateResult(figures, failures)


def label_gate(ref: Run, got: Run, limits: GateLimits) -> GateResult:
    same = [r["label"] == g["label"] for r, g in zip(ref.answers, got.answers)]
    figures = {"rows": len(same), "label_agreement": round(float(np.mean(same)), 4)}
    failures = []
    if not figures["label_agreement"] >= limits.min_agreement:
        failures.append(f"label agreement {figures['label_agreement']:.2%} < {limits.min_agreement:.2%} (--gate-min-agreement)")
    return GateResult(figures, failures)


def _spans(answer: dict) -> set[tuple]:
    return {(s["entity"], s["start"], s["end"]) for s in answer["entities"]}


def span_gate(ref: Run, got: Run, limits: GateLimits) -> GateResult:
    true = pred = hit = 0
    for r, g in zip(ref.answers, got.answers):
        a, b = _spans(r), _spans(g)
        true, pred, hit = true + len(a), pred + len(b), hit + len(a & b)
    f1 = 1.0 if true == pred == 0 else 2 * hit / max(true + pred, 1)
    figures = {"rows": len(ref.answers), "entities_fp32": true, "entities": pred,
               "entity_f1_vs_fp32": round(100 * f1, 2)}
    failures = []
    if not 100 * (1 - f1) <= limits.max_drop_points + 1e-9:
        failures.append(f"entity F1 against fp32's spans {100 * f1:.2f} is more than {limits.max_drop_points:g} points "
                        f"below 100 (--gate-max-drop)")
    return GateResult(figures, failures)


def token_gate(ref: Run, got: Run, limits: GateLimits) -> GateResult:
    same = total = 0
    for a, b, mask in zip(ref.outputs, got.outputs, ref.masks):
        name = next(iter(a))
        real = mask.astype(bool)
        same += int((a[name].argmax(-1) == b[name].argmax(-1))[real].sum())
        total += int(real.sum())
    figures = {"tokens": total, "top1_agreement": round(same / max(total, 1), 4)}
    failures = []
    if not figures["top1_agreement"] >= limits.min_agreement:
        failures.append(f"top-1 agreement {figures['top1_agreement']:.2%} < {limits.min_agreement:.2%} (--gate-min-agreement)")
    return GateResult(figures, failures)


def output_cosine(ref: Run, got: Run) -> float:
    """Mean cosine between fp32 and candidate read outputs, row by row (token by token on real tokens
    for (B, T, ...) outputs): 1.0 = identical. Ranks layers by how much their quantization costs."""
    values = []
    for a, b, mask in zip(ref.outputs, got.outputs, ref.masks):
        for name in a:
            x, y = a[name].astype(np.float64), b[name].astype(np.float64)
            if x.ndim == 3:
                real = mask.astype(bool)
                x, y = x[real], y[real]
            x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
            den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
            values.append(np.nan_to_num((x * y).sum(1) / np.maximum(den, 1e-30), nan=-1.0))
    return float(np.concatenate(values).mean()) if values else 1.0


def metric_drop(task, ref_scores: dict[str, float], got_scores: dict[str, float], limits: GateLimits) -> GateResult:
    """The task's main metric on labelled data, fp32 vs candidate: the drop in points is gated."""
    key = task.main_metric
    a, b = float(ref_scores[key]), float(got_scores[key])
    drop = 100 * (a - b)
    figures = {"metric": key, "fp32": round(a, 5), "candidate": round(b, 5), "drop_points": round(drop, 3),
               "examples": ref_scores.get("examples", ref_scores.get("words", ref_scores.get("pairs")))}
    failures = []
    if not drop <= limits.max_drop_points + 1e-9:
        failures.append(f"eval-data {key} {100 * b:.2f} is {drop:.2f} points below fp32's {100 * a:.2f} "
                        f"(limit {limits.max_drop_points:g}, --gate-max-drop)")
    return GateResult(figures, failures)


def describe(failures: Sequence[str]) -> str:
    return "; ".join(failures)
