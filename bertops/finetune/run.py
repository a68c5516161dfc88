"""``finetune(...)``: checks, the DeepSpeed engine, the loop, checkpoints with evaluation, OUT/best and OUT/final.

The same machinery as pretraining (:mod:`bertops.train`): engine (``build_engine`` with the task's
model), ``OUT/checkpoints`` with manifests and every rank's RNG state (``--resume auto`` after a
SIGKILL continues as if never stopped; on another world size / ZeRO stage the fp32 weights are
rebuilt and the optimizer moments restart), ``OUT/metrics.jsonl`` + TensorBoard, the run log, and
the launcher (one process, or each rank under ``deepspeed``).

Every checkpoint is also an evaluation on the eval examples (validation data). When the task's
``main_metric`` improves, that checkpoint is converted at once to ``OUT/best/`` (HF layout, fp32,
label names and ``finetuning_task`` in config.json), so pruning old checkpoints never loses it; at
the end ``OUT/final/`` is a copy of ``OUT/best/`` (of the last checkpoint when there is no eval data).
Test examples, when given, are scored once on ``OUT/final/`` (fp32, as ``bertops evaluate`` scores
it) and written as a ``test_*`` row of metrics.jsonl: they choose nothing, so the figure is unbiased.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bertops.config import Config, config_from_dict
from bertops.data.labeled import check_labels, example_kind, labels_of
from bertops.errors import BertopsError
from bertops.finetune import heads
from bertops.tasks import Task, get_task
from bertops.train import checkpoints as ckpt

FINAL_DIR, BEST_DIR, CHECKPOINT_DIR, BEST_FILE = "final", "best", "checkpoints", "best.json"


@dataclass
class FinetuneResult:
    out_dir: Path
    final_dir: Path
    task: str
    labels: list[str]
    steps: int
    world_size: int
    precision: str
    best: dict | None  # {"step", "metric", "value", "metrics"} of the checkpoint in final/
    test: dict | None = None  # final/'s metrics on the test examples (they chose nothing)
    evals: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    seconds: float = 0.0
    resumed_from: str | None = None


LOWER_IS_BETTER = ("loss", "error", "perplexity")  # a main_metric naming one of these is minimised


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


def train_steps(cfg: Config, examples: int, world_size: int, epochs: float | None) -> int:
    """``train.max_steps``, or ``epochs`` passes over the examples at the global batch size."""
    cfg.train.grad_accum_steps(world_size)
    if epochs is None:
        return cfg.train.max_steps
    if epochs <= 0:
        raise BertopsError(f"epochs={epochs} must be positive")
    return max(1, math.ceil(epochs * examples / cfg.train.global_batch_size))


@dataclass(frozen=True)
class Plan:
    task: Task
    labels: list[str]
    fresh_head: bool
    max_steps: int
    world: object
    precision: object
    ds_raw: dict
    out_dir: Path
    ds_choice: str  # the run log's line on which DeepSpeed config runs


def plan_run(cfg: Config, task: Task, model_dir: Path, train: Sequence[dict], evals: Sequence[dict] | None,
             out_dir: Path, ds_config_path: str | None, resume: str | None, new_head: bool,
             epochs: float | None, tests: Sequence[dict] | None = None, pooling: str = "auto") -> Plan:
    """Every check that can fail on user input, before any rank talks to another."""
    from bertops.train.dist import world_from_env
    from bertops.train.dsconfig import choose_ds_config, resolve_precision, zero_stage
    from bertops.train.optim import check_optimizer
    from bertops.train.run import _check_run_dir

    if task.loss is None or task.collate is None:
        raise BertopsError(f"task {task.name} has no training slots (loss, collate); it cannot be fine-tuned")
    if evals and (task.metrics is None or not task.main_metric):
        raise BertopsError(f"task {task.name} has no metrics / main_metric; it cannot be evaluated")
    if tests and task.metrics is None:
        raise BertopsError(f"task {task.name} has no metrics; it cannot be tested")
    kind = example_kind(task)
    labels: list[str] = []
    if task.needs_labels:
        labels = labels_of(train, kind)
        for held_out in (evals, tests):
            if held_out:
                check_labels(held_out, kind, labels)
        labels, fresh = heads.head_labels(model_dir, task, labels, new_head)
    else:
        fresh = heads.head_labels(model_dir, task, [], new_head)[1]
    heads.check_pooling(model_dir, task, fresh, pooling)
    world = world_from_env()
    steps = train_steps(cfg, len(train), world.world_size, epochs)
    ds_raw, ds_choice = choose_ds_config(cfg.train.ds_config if ds_config_path is None else ds_config_path,
                                         world.world_size)
    check_optimizer(cfg.train, zero_stage(ds_raw))
    precision = resolve_precision(cfg.train.precision, world.device)
    if resume not in (None, "", "auto") and not ckpt.TAG_RE.match(resume):
        raise BertopsError(f"--resume {resume!r} is not understood; use --resume auto or a tag such as global_step100")
    if not resume and ckpt.tags(out_dir / CHECKPOINT_DIR):
        raise BertopsError(f"{out_dir} already holds checkpoints; pass --resume auto to continue that run, or another --out")
    _check_run_dir(out_dir, needed=(model_dir / "model.safetensors").stat().st_size * 8 + (16 << 20))
    return Plan(task, labels, fresh, steps, world, precision, ds_raw, out_dir, ds_choice)


def checkpoint_to_folder(tag_dir: Path, meta: dict, task: Task, out: Path) -> Path:
    """An engine checkpoint of this run -> HF-layout folder ``out`` (replaced only once complete)."""
    import torch

    from bertops.checkpoint import TIED_KEYS, save_model
    from bertops.train.convert import fp32_state_dict

    with torch.random.fork_rng(devices=[]):  # building the model draws random init: keep the run's RNG untouched
        model = task.build_model(config_from_dict({"model": meta["model"]}).model)
    result = model.load_state_dict(fp32_state_dict(tag_dir, int(meta["zero_stage"])), strict=False)
    missing = [k for k in result.missing_keys if k not in TIED_KEYS]
    if missing:
        raise BertopsError(f"checkpoint {tag_dir} lacks weights (first: {missing[0]}); it is incomplete")
    staging = out.with_name(out.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    save_model(model, staging, tokenizer_dir=tag_dir / ckpt.TOKENIZER_DIR)
    heads.mark_finetuned(staging, task, meta.get("max_seq_len"))
    if meta.get("best"):
        (staging / BEST_FILE).write_text(json.dumps(meta["best"], indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    staging.replace(out)
    return out


def _copy_folder(src: Path, dst: Path) -> None:
    staging = dst.with_name(dst.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src, staging)
    shutil.rmtree(dst, ignore_errors=True)
    staging.replace(dst)


def finetune(
    cfg: Config,
    task: str,
    model_dir: str | Path,
    train_examples: Sequence[dict],
    eval_examples: Sequence[dict] | None,
    out_dir: str | Path,
    *,
    ds_config_path: str | None = None,
    resume: str | None = None,
    new_head: bool = False,
    epochs: float | None = None,
    test_examples: Sequence[dict] | None = None,
    pooling: str = "auto",
) -> FinetuneResult:
    """Fine-tune ``model_dir`` for ``task`` on checked examples (every rank passes the same ones);
    ``eval_examples`` pick ``final/``, ``test_examples`` only score it."""
    from bertops.finetune.loop import LoopState, eval_batch_size, evaluate, evaluate_folder, train
    from bertops.finetune.objectives import Collation
    from bertops.tokenizer import load_tokenizer
    from bertops.train.convert import fp32_state_dict
    from bertops.train.dist import all_gather_object, barrier, init_process_group
    from bertops.train.dsconfig import zero_stage
    from bertops.train.engine import build_engine
    from bertops.train.metrics import MetricsLog
    from bertops.train.run import RunLog

    began = time.perf_counter()
    spec, model_dir, out_dir = get_task(task), Path(model_dir), Path(out_dir)
    plan = plan_run(cfg, spec, model_dir, train_examples, eval_examples, out_dir, ds_config_path, resume, new_head,
                    epochs, test_examples, pooling)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=plan.max_steps))  # the LR schedule's length
    world, t = plan.world, cfg.train
    ckpt_dir = out_dir / CHECKPOINT_DIR
    init_process_group(world)
    say = RunLog(out_dir, world.is_main)

    found = ckpt.resume_point(ckpt_dir, resume, world.is_main, say)
    meta = found.meta
    start = int(meta.get("step", 0))
    if found.tag and meta.get("task") != spec.name:
        raise BertopsError(f"{ckpt_dir / found.tag} is a {meta.get('task')} run; this run fine-tunes {spec.name}")
    labels = list(meta.get("labels", plan.labels)) if found.tag else plan.labels
    same_layout = bool(found.tag) and (meta["world_size"], meta["zero_stage"], meta["precision"]) == (
        world.world_size, zero_stage(plan.ds_raw), plan.precision.name)

    ckpt.seed_everything(t.seed)  # a fresh head starts from the same random weights on every rank
    model, model_cfg = heads.build_model(model_dir, spec, labels, plan.fresh_head, pooling)
    init_state = fp32_state_dict(ckpt_dir / found.tag, int(meta["zero_stage"])) if found.tag and not same_layout else None
    say(plan.precision.reason)
    say(plan.ds_choice)
    engine = build_engine(cfg, world, plan.ds_raw, plan.precision, t.micro_batch_size, init_state=init_state,
                          start_step=start, model=model)
    if found.tag and same_layout:
        _, client = engine.ds.load_checkpoint(str(ckpt_dir), tag=found.tag)
        ckpt.set_rng_state(client["bertops_rng"][world.rank])
    elif found.tag:
        ckpt.seed_everything(t.seed * 1000 + start * 7919 + world.rank + 1)
        say(f"resuming {found.tag} written by {meta['world_size']} rank(s), ZeRO-{meta['zero_stage']}, "
            f"{meta['precision']}: weights, LR schedule and data position continue; optimizer moments restart")
    if found.tag:
        say(f"resumed from {found.tag}: step {start}")
    head = ("fresh head" if plan.fresh_head else "its head") if spec.head_keys else "no head"
    say(f"fine-tuning {spec.name} from {model_dir} ({head}{f', {len(labels)} labels' if labels else ''}): "
        f"{len(train_examples)} examples, {plan.max_steps} steps of {t.global_batch_size} = micro {t.micro_batch_size} "
        f"x ranks {world.world_size} x accumulation {engine.ds.gradient_accumulation_steps()}, ZeRO stage {engine.stage}")
    if world.is_main:
        (out_dir / "config.json").write_text(json.dumps(
            {**cfg.to_dict(), "finetune": {"task": spec.name, "model": str(model_dir), "labels": labels,
                                           "max_steps": plan.max_steps}}, indent=2) + "\n")
        (out_dir / "ds_config.json").write_text(json.dumps(engine.ds_config, indent=2) + "\n")

    ctx = Collation(load_tokenizer(model_dir), tuple(labels), cfg.data.max_seq_len)
    best_file = out_dir / BEST_FILE
    best = json.loads(best_file.read_text()) if found.tag and best_file.is_file() else None
    if best and best["step"] > start:  # from after the checkpoint we resume: that evaluation is redone
        best = None
    tag_best = meta.get("best") if found.tag else None
    if tag_best and (best is None or best["step"] < tag_best["step"]):  # killed before best/ was written
        best = tag_best
        if world.is_main:
            checkpoint_to_folder(ckpt_dir / found.tag, meta, spec, out_dir / BEST_DIR)
            best_file.write_text(json.dumps(best, indent=2) + "\n", encoding="utf-8")
    if world.is_main and not best:
        best_file.unlink(missing_ok=True)
        shutil.rmtree(out_dir / BEST_DIR, ignore_errors=True)
    metrics_log = MetricsLog(out_dir, world.is_main, resume_step=start if found.tag else None)
    model_meta = json.loads(json.dumps(dataclasses.asdict(model_cfg)))  # as pretraining writes it (checkpoint convert)
    eval_batch = t.micro_batch_size

    def checkpoint(step: int, scored: bool) -> dict | None:
        nonlocal best
        row, improved = None, False
        if eval_examples and scored:
            engine.ds.eval()
            scores = evaluate(engine.ds, spec, eval_examples, ctx, eval_batch, engine.device, world.rank,
                              world.world_size)
            row = {"step": step, **{f"eval_{k}": v for k, v in scores.items()}}
            metrics_log.write(row)
            key = spec.main_metric
            if key not in scores:
                raise BertopsError(f"task {spec.name}: main_metric {key!r} is not among its metrics {sorted(scores)}")
            value = scores[key]
            improved = best is None or (value < best["value"] if lower_is_better(key) else value > best["value"])
            say(f"step {step:>5}  eval " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items() if k in (key, "loss"))
                + ("  (best)" if improved else ""))
            if improved:
                best = {"step": step, "metric": key, "value": value, "metrics": scores}
        tag = ckpt.tag_for(step)
        rng = all_gather_object(ckpt.rng_state())
        engine.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"bertops_rng": rng}, save_latest=False)
        barrier()
        if world.is_main:
            tag_meta = {"step": step, "position": step * t.global_batch_size, "world_size": world.world_size,
                        "zero_stage": engine.stage, "precision": plan.precision.name, "task": spec.name,
                        "labels": labels, "model": model_meta, "best": best if improved else None,
                        "max_seq_len": cfg.data.max_seq_len}
            ckpt.write_manifest(ckpt_dir, tag, tag_meta, model_dir, t.keep_checkpoints)
            if improved:
                checkpoint_to_folder(ckpt_dir / tag, tag_meta, spec, out_dir / BEST_DIR)
                best_file.write_text(json.dumps(best, indent=2) + "\n", encoding="utf-8")
        barrier()
        return row

    state = LoopState(step=start)
    final_dir, test = out_dir / FINAL_DIR, None
    try:
        train(engine, spec, train_examples, ctx, state=state, max_steps=plan.max_steps,
              global_batch=t.global_batch_size, micro_batch=t.micro_batch_size, rank=world.rank,
              world_size=world.world_size, seed=t.seed, log_every=t.log_every,
              checkpoint_due=lambda s: s % t.save_every == 0 or bool(t.eval_every and s % t.eval_every == 0),
              checkpoint=checkpoint, log=metrics_log.write, say=say)
        if world.is_main:
            if best and (out_dir / BEST_DIR).is_dir():
                _copy_folder(out_dir / BEST_DIR, final_dir)
                say(f"final/ = step {best['step']} ({best['metric']} {best['value']:.4f})")
            else:
                found_last = ckpt.find_resumable(ckpt_dir)
                checkpoint_to_folder(ckpt_dir / found_last.tag, found_last.meta, spec, final_dir)
                say(f"final/ = last checkpoint {found_last.tag} (no eval data to pick the best)")
        barrier()
        if test_examples:  # every rank scores its share of final/ (fp32), as `bertops evaluate` does
            test = evaluate_folder(final_dir, spec, test_examples, cfg.data.max_seq_len, eval_batch_size(cfg),
                                   engine.device, world.rank, world.world_size)
            metrics_log.write({"step": state.step, **{f"test_{k}": v for k, v in test.items()}})
            say("test (final/): " + "  ".join(f"{k} {v:.4f}" for k, v in test.items() if k != "examples"))
    finally:
        metrics_log.close()
    if world.is_main:
        say(f"done: {final_dir} (export: bertops export onnx --model {final_dir} --task {spec.name})")
    barrier()
    return FinetuneResult(
        out_dir=out_dir, final_dir=final_dir, task=spec.name, labels=labels, steps=state.step,
        world_size=world.world_size, precision=plan.precision.name, best=best, test=test, evals=state.evals,
        history=state.history, train_seconds=state.train_seconds, seconds=time.perf_counter() - began,
        resumed_from=found.tag,
    )
