"""The training loop: micro-steps through the engine, logging, evaluation and checkpoints on schedule.

One optimizer step = ``accumulation`` micro-steps of ``engine(batch)`` / ``engine.backward`` /
``engine.step`` (DeepSpeed scales the loss by 1/accumulation and only updates on the boundary).
Statistics stay on the device until a log step, then one all-reduce sums them over ranks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from bertops.config import Config
from bertops.errors import BertopsError
from bertops.tasks import PRETRAINING, get_task
from bertops.train.checkpoints import tag_for
from bertops.train.engine import Engine, set_micro_batch
from bertops.train.metrics import MetricsLog, Pace
from bertops.train.stop import Interrupted, StopFlag

STATS = ("loss", "mlm_loss", "nsp_loss", "mlm_correct", "mlm_count", "nsp_correct", "nsp_count", "tokens", "micro")


@dataclass
class LoopState:
    step: int  # optimizer steps done
    phase: int  # 1 or 2
    position: int = 0  # examples of the current phase's stream already trained on (all ranks)
    history: list[dict] = field(default_factory=list)  # train rows logged by this process (rank 0)
    evals: list[dict] = field(default_factory=list)


@dataclass
class Phase:
    """Where a phase's batches come from: makes the input iterator for a given start position."""

    number: int
    micro_batch_size: int
    make_input: Callable[[int], Iterator[dict]]  # start_example -> iterator of micro-batches
    start_step: int  # first global step of this phase


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _grad_norm_fp32(engine: Engine) -> float | None:
    """Stage-0 fp32 has no DeepSpeed optimiser wrapper recording the norm; compute it before clipping."""
    grads = [p.grad for p in engine.ds.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


def _reduce(t: torch.Tensor) -> list[float]:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _check_finite(loss_sum: float, step: int, lr: float) -> None:
    """Stop with one line (every rank sees the same reduced value) instead of training on NaN weights."""
    if not math.isfinite(loss_sum):
        raise BertopsError(
            f"the training loss became {loss_sum} by step {step} (lr {lr:.2e}); checkpoints up to the previous "
            "save are intact: lower train.learning_rate or raise train.warmup_steps, prefer bf16/fp32 to fp16, "
            "or check the data, then rerun with --resume auto"
        )


def evaluate(engine: Engine, batches: Callable[[], Iterator[dict]]) -> dict:
    """Held-out MLM loss / accuracy and NSP loss / accuracy, summed over ranks (token- and example-weighted)."""
    task = get_task(PRETRAINING.name)
    device = engine.device
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    engine.ds.eval()
    with torch.no_grad():
        for batch in batches():
            batch = _to_device(batch, device)
            m = task.metrics(engine.ds(**batch), batch)
            sums += torch.stack([
                m["mlm_loss"] * m["mlm_count"], m["mlm_accuracy"] * m["mlm_count"], m["mlm_count"],
                m["nsp_loss"] * m["nsp_count"], m["nsp_accuracy"] * m["nsp_count"], m["nsp_count"],
            ]).double()
    engine.ds.train()
    mlm_loss, mlm_correct, mlm_n, nsp_loss, nsp_correct, nsp_n = _reduce(sums)
    return {
        "eval_mlm_loss": mlm_loss / max(mlm_n, 1),
        "eval_nsp_loss": nsp_loss / max(nsp_n, 1),
        "eval_mlm_accuracy": mlm_correct / max(mlm_n, 1),
        "eval_nsp_accuracy": nsp_correct / max(nsp_n, 1),
    }


def train(
    engine: Engine,
    cfg: Config,
    state: LoopState,
    phases: list[Phase],
    metrics: MetricsLog,
    save: Callable[[int, int, int], None],
    eval_batches: Callable[[], Iterator[dict]] | None,
    say: Callable[[str], None],
) -> LoopState:
    """Run optimizer steps ``state.step .. max_steps``; ``save(step, position, phase)`` on schedule, at the end, and
    before stopping on SIGTERM / SIGINT (:class:`~bertops.train.stop.Interrupted`)."""
    t = cfg.train
    task = get_task(PRETRAINING.name)
    device = engine.device
    G = t.global_batch_size
    phase = next(p for p in reversed(phases) if state.step >= p.start_step)
    if phase.micro_batch_size != engine.ds.train_micro_batch_size_per_gpu():
        set_micro_batch(engine, phase.micro_batch_size, G)
    batches = phase.make_input(state.position)
    stats = torch.zeros(len(STATS), dtype=torch.float64, device=device)
    norms: list[float] = []
    fp32_stage0 = engine.stage == 0 and engine.precision.name == "fp32"
    if eval_batches is not None and t.eval_every and state.step == 0:  # the baseline a curve starts from
        row = {"step": 0, **evaluate(engine, eval_batches)}
        metrics.write(row)
        state.evals.append(row)
        say(f"step      0  eval mlm {row['eval_mlm_loss']:.4f}  nsp_acc {row['eval_nsp_accuracy']:.3f}")
    tick, paused = time.perf_counter(), 0.0  # paused: eval / checkpoint time inside the log interval
    pace = Pace(state.step, t.max_steps)
    with StopFlag() as stop:  # a signal ends the run after the current step, saved (bertops.train.stop)
        while state.step < t.max_steps:
            nxt = next((p for p in phases if p.start_step == state.step and p.number != phase.number), None)
            if nxt is not None:
                phase, state.position, state.phase = nxt, 0, nxt.number
                set_micro_batch(engine, phase.micro_batch_size, G)
                batches = phase.make_input(0)
                say(f"step {state.step}: phase {phase.number} (micro batch {phase.micro_batch_size})")
            accum = engine.ds.gradient_accumulation_steps()
            lr = engine.ds.get_lr()[0]  # the rate this step applies (the scheduler moves on after it)
            for a in range(accum):
                batch = _to_device(next(batches), device)
                outputs = engine.ds(**batch)
                loss = task.loss(outputs, batch)
                engine.ds.backward(loss)
                if a == accum - 1 and fp32_stage0:
                    norm = _grad_norm_fp32(engine)
                engine.ds.step()
                with torch.no_grad():
                    m = task.metrics(outputs, batch)
                    stats += torch.stack([
                        loss.detach().float(), m["mlm_loss"], m["nsp_loss"],
                        m["mlm_accuracy"] * m["mlm_count"], m["mlm_count"],
                        m["nsp_accuracy"] * m["nsp_count"], m["nsp_count"],
                        batch["attention_mask"].sum().float(), torch.ones((), device=device),
                    ]).double()
            if not fp32_stage0:
                norm = engine.ds.get_global_grad_norm()
            if norm is not None:
                norms.append(float(norm))
            state.step += 1
            state.position += G
            last = state.step == t.max_steps
            if state.step % t.log_every == 0 or last:
                values = dict(zip(STATS, _reduce(stats.clone())))
                _check_finite(values["loss"], state.step, lr)
                elapsed = time.perf_counter() - tick - paused
                n = max(values["micro"], 1)
                row = {
                    "step": state.step,
                    "loss": values["loss"] / n,
                    "mlm_loss": values["mlm_loss"] / n,
                    "nsp_loss": values["nsp_loss"] / n,
                    "mlm_accuracy": values["mlm_correct"] / max(values["mlm_count"], 1),
                    "nsp_accuracy": values["nsp_correct"] / max(values["nsp_count"], 1),
                    "lr": lr,
                    "grad_norm": sum(norms) / len(norms) if norms else None,
                    "tokens_per_s": values["tokens"] / elapsed if elapsed > 0 else None,
                }
                metrics.write(row)
                state.history.append(row)
                say(
                    f"step {row['step']:>6}  loss {row['loss']:.4f}  mlm {row['mlm_loss']:.4f}  nsp {row['nsp_loss']:.4f}  "
                    f"mlm_acc {row['mlm_accuracy']:.3f}  nsp_acc {row['nsp_accuracy']:.3f}  lr {row['lr']:.2e}  "
                    f"{row['tokens_per_s'] or 0:,.0f} tok/s{pace.eta(state.step)}"
                )
                stats.zero_()
                norms.clear()
                tick, paused = time.perf_counter(), 0.0
            pause_start = time.perf_counter()
            if eval_batches is not None and ((t.eval_every and state.step % t.eval_every == 0) or last):
                row = {"step": state.step, **evaluate(engine, eval_batches)}
                metrics.write(row)
                state.evals.append(row)
                say(f"step {row['step']:>6}  eval mlm {row['eval_mlm_loss']:.4f}  nsp_acc {row['eval_nsp_accuracy']:.3f}")
            signum = stop.agreed(device)  # SIGTERM / SIGINT on any rank: save this step, then stop
            if state.step % t.save_every == 0 or last or signum:
                if stats[8] > 0:  # steps since the last log row: never save weights a NaN loss has touched
                    _check_finite(_reduce(stats[:1].clone())[0], state.step, lr)
                save(state.step, state.position, phase.number)
            if signum:
                raise Interrupted(signum, state.step, tag_for(state.step))
            paused += time.perf_counter() - pause_start  # throughput counts training time only
    return state
