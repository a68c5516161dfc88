"""The fine-tuning loop: a deterministic example order over ranks, optimizer steps through the engine, evaluation.

Examples form one global stream: epoch ``e`` is the permutation of all examples seeded by
``(seed, e)``, epochs follow one another. Optimizer step ``s`` takes stream positions
``[s*G, (s+1)*G)``; within it micro-step ``a`` of rank ``r`` takes ``[s*G + (a*W + r)*M, ... + M)``
(G global batch, W ranks, M micro batch), the same layout as pretraining's input pipeline. A
checkpoint after step ``s`` therefore only needs ``s`` to resume, on any number of ranks, with no
example repeated or skipped.

Evaluation runs the task's ``collate`` / model / ``loss`` on the eval examples (sorted by length,
batch ``k`` on rank ``k % W``), gathers outputs to rank 0, which calls the task's ``metrics``; every
rank gets the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from bertops.finetune.objectives import MODEL_INPUTS, Collation
from bertops.tasks import Task, TaskInfo


class ExampleOrder:
    """Stream position -> example index (seeded permutation per epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + count)]


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _length(ex: dict) -> int:
    if "tokens" in ex:
        return sum(len(t) + 1 for t in ex["tokens"])
    return len(ex.get("text") or "") + len(ex.get("text_pair") or "")


def evaluate(
    forward: Callable[..., dict],
    task: Task,
    examples: Sequence[dict],
    ctx: Collation,
    batch_size: int,
    device="cpu",
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """``{"loss": ..., **task.metrics(...)}`` over ``examples`` (the same dict on every rank)."""
    from bertops.train.dist import all_gather_object, broadcast_object

    order = sorted(range(len(examples)), key=lambda i: _length(examples[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    outputs, collated, loss_sum, loss_n = [], [], 0.0, 0
    rounds = -(-len(batches) // world_size)  # every rank runs as many forwards (ZeRO-3 gathers are collective)
    with torch.no_grad():
        for turn in range(rounds):
            spare = turn * world_size + rank >= len(batches)
            rows = batches[0 if spare else turn * world_size + rank]
            batch = task.collate([examples[i] for i in rows], ctx)
            on_device = _to(batch, device)
            out = forward(**{k: on_device[k] for k in MODEL_INPUTS})
            if spare:
                continue
            loss_sum += float(task.loss(out, on_device)) * len(rows)
            loss_n += len(rows)
            outputs.append({k: out[k].float().cpu().numpy() for k in task.reads})
            collated.append({k: v.numpy() for k, v in batch.items()})
    gathered = all_gather_object((outputs, collated, loss_sum, loss_n))
    result = None
    if rank == 0:
        outs = [o for g in gathered for o in g[0]]
        bats = [b for g in gathered for b in g[1]]
        total, n = sum(g[2] for g in gathered), sum(g[3] for g in gathered)
        result = {"loss": total / max(n, 1), **task.metrics(outs, bats, TaskInfo(labels=tuple(ctx.labels)))}
    return broadcast_object(result)


def eval_batch_size(cfg) -> int:
    """Examples per forward pass when scoring a saved model (``bertops evaluate``, finetune's test row)."""
    return max(cfg.train.micro_batch_size, 16)


def evaluate_folder(folder, task: Task, examples: Sequence[dict], max_length: int, batch_size: int, device="cpu",
                    rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """:func:`evaluate` of a saved model folder (HF layout, loaded in fp32): ``bertops evaluate`` and the test
    row of ``bertops finetune --test`` both come from here, so they agree (to the last digit in one process;
    over several ranks the loss sums in another order)."""
    from bertops.checkpoint import load_model
    from bertops.data.labeled import check_labels, example_kind
    from bertops.tokenizer import load_tokenizer

    model, cfg = load_model(folder, task.name)
    labels = cfg.labels() if task.needs_labels else []
    if labels:
        check_labels(examples, example_kind(task), labels, f"labels of {folder}")
    ctx = Collation(load_tokenizer(folder), tuple(labels), max_length)
    return evaluate(model.to(device).eval(), task, examples, ctx, batch_size, device, rank, world_size)


@dataclass
class LoopState:
    step: int
    history: list[dict] = field(default_factory=list)  # train rows (rank 0)
    evals: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0  # optimizer steps only (no evaluation, no checkpoints)


def _grad_norm_fp32(engine) -> float | None:
    """Stage-0 fp32 has no DeepSpeed optimiser wrapper recording the norm; computed before the step clips."""
    grads = [p.grad for p in engine.ds.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


def train(
    engine,
    task: Task,
    examples: Sequence[dict],
    ctx: Collation,
    *,
    state: LoopState,
    max_steps: int,
    global_batch: int,
    micro_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    log_every: int,
    checkpoint_due: Callable[[int], bool],
    checkpoint: Callable[[int, bool], dict | None],
    log: Callable[[dict], None],
    say: Callable[[str], None],
) -> LoopState:
    """Optimizer steps ``state.step .. max_steps``; ``checkpoint(step, True)`` (evaluate + save) where
    ``checkpoint_due`` and at the end, ``checkpoint(step, False)`` (save only) before stopping on SIGTERM / SIGINT
    (:class:`~bertops.train.stop.Interrupted`)."""
    from bertops.train.checkpoints import tag_for
    from bertops.train.dist import all_reduce_sum
    from bertops.train.metrics import Pace
    from bertops.train.stop import Interrupted, StopFlag

    order = ExampleOrder(len(examples), seed)
    device = engine.device
    accum = engine.ds.gradient_accumulation_steps()
    fp32_stage0 = engine.stage == 0 and engine.precision.name == "fp32"
    stats = np.zeros(3)  # loss sum over micro-steps, micro-steps, real tokens
    norms: list[float] = []
    busy = 0.0  # training seconds since the last log row
    pace = Pace(state.step, max_steps)
    with StopFlag() as stop:  # a signal ends the run after the current step, saved (bertops.train.stop)
        while state.step < max_steps:
            started = time.perf_counter()
            base = state.step * global_batch
            engine.ds.train()
            norm = None
            for a in range(accum):
                rows = order.indices(base + (a * world_size + rank) * micro_batch, micro_batch)
                batch = _to(task.collate([examples[i] for i in rows], ctx), device)
                outputs = engine.ds(**{k: batch[k] for k in MODEL_INPUTS})
                loss = task.loss(outputs, batch)
                engine.ds.backward(loss)
                if a == accum - 1 and fp32_stage0:
                    norm = _grad_norm_fp32(engine)
                engine.ds.step()
                stats += (float(loss.detach()), 1, float(batch["attention_mask"].sum()))
            if not fp32_stage0:
                norm = engine.ds.get_global_grad_norm()
            if norm is not None:
                norms.append(float(norm))
            state.step += 1
            spent = time.perf_counter() - started
            state.train_seconds += spent
            busy += spent
            last = state.step == max_steps
            if state.step % log_every == 0 or last:
                loss_sum, micro, tokens = all_reduce_sum(list(stats))
                row = {
                    "step": state.step,
                    "epoch": round(state.step * global_batch / len(examples), 3),
                    "loss": loss_sum / max(micro, 1),
                    "lr": engine.ds.get_lr()[0],
                    "grad_norm": sum(norms) / len(norms) if norms else None,
                    "tokens_per_s": tokens / busy if busy > 0 else None,
                }
                log(row)
                state.history.append(row)
                say(f"step {row['step']:>5}  epoch {row['epoch']:.2f}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                    f"{row['tokens_per_s'] or 0:,.0f} tok/s{pace.eta(state.step)}")
                stats[:] = 0
                norms.clear()
                busy = 0.0
            signum = stop.agreed(device)  # SIGTERM / SIGINT on any rank: save this step, then stop
            if checkpoint_due(state.step) or last:
                row = checkpoint(state.step, True)
                if row:
                    state.evals.append(row)
            elif signum:
                checkpoint(state.step, False)  # saved, not evaluated: the schedule's evaluations stay where they were
            if signum:
                raise Interrupted(signum, state.step, tag_for(state.step))
    return state
