"""``pretrain(cfg, data_dir, out_dir, ds_config_path, resume)``: checks, engine, loop, checkpoints, final/.

Every check that can fail on user input runs before the process group forms and before any
training step (same inputs on every rank, so every rank fails the same way): shards and tokenizer
vs ``model.vocab_size``, global batch vs micro batch x ranks, the ds_config's keys, precision and
optimiser, RUN_DIR writable with room for a checkpoint. Then: resume decision (rank 0 verifies
checkpoints, every rank gets its answer), engine, loop, and ``RUN_DIR/final/`` converted from the
last checkpoint, so what export reads is exactly what the run saved.

Resuming on the same world size, ZeRO stage and precision restores everything DeepSpeed saved
(weights, fp32 masters, optimiser moments, LR schedule) plus every rank's RNG state: the run goes
on as if never stopped. On another world size, stage or precision, the fp32 weights are rebuilt
from the checkpoint (``zero_to_fp32``), the LR schedule and the data position continue from the
saved step, and the optimiser moments start again from zero (DeepSpeed's partitions are tied to
the world size that wrote them); the run log says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bertops.config import Config
from bertops.errors import BertopsError
from bertops.tasks import FILL_MASK, PRETRAINING
from bertops.train import checkpoints as ckpt
from bertops.train.dist import LAUNCHER_ENV, World, barrier, init_process_group, world_from_env
from bertops.train.dsconfig import Precision, choose_ds_config, resolve_precision, zero_stage

FINAL_DIR = "final"
CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "train.log"


@dataclass
class PretrainResult:
    run_dir: Path
    final_dir: Path
    steps: int
    precision: str
    world_size: int
    resumed_from: str | None = None  # checkpoint tag this run continued from
    skipped_checkpoints: tuple[str, ...] = ()  # broken checkpoints passed over, with the reason
    optimizer_state: str = "fresh"  # "restored" or "fresh" (new run, or resumed on another world size/stage)
    history: list[dict] = field(default_factory=list)  # train rows (rank 0)
    evals: list[dict] = field(default_factory=list)


class RunLog:
    """Rank 0's run log: stderr and RUN_DIR/train.log."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled, self.file = enabled, run_dir / LOG_FILE

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        line = f"[bertops {time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        with self.file.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


# --- checks before anything runs -------------------------------------------------------------------


def _check_data(data_dir: str | Path, cfg: Config, what: str) -> dict:
    from bertops.data.shards import read_manifest

    manifest = read_manifest(data_dir)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    if vocab != cfg.model.vocab_size:
        raise BertopsError(
            f"model.vocab_size={cfg.model.vocab_size} does not match the tokenizer of {what} {data_dir} "
            f"({vocab} tokens); set model.vocab_size={vocab}"
        )
    if int(manifest["seq_len"]) > cfg.model.max_position_embeddings:
        raise BertopsError(
            f"{what} {data_dir} holds sequences of {manifest['seq_len']} tokens but model.max_position_embeddings="
            f"{cfg.model.max_position_embeddings}; raise it or prepare shorter sequences"
        )
    if not manifest["splits"]["train"]["examples"]:
        raise BertopsError(f"{what} {data_dir} has no training examples; prepare more text")
    return manifest


# What a checkpoint folder fixes when pretraining continues from it; the rest of `model` (dropout,
# attention implementation) stays the config's.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id")


def continued_config(cfg: Config, data_dir: str | Path) -> tuple[Config, str]:
    """``train.init_from`` set: the config with the folder's architecture, and the run log's line about it.

    Continued (domain- or task-adaptive) pretraining starts from a released encoder, so its shape is the
    folder's, whatever the config's ``model`` section says (a fresh model's). The shards must come from
    the folder's own tokenizer: the same ids mean the same word pieces, or the embeddings are read wrongly.
    Heads the folder lacks (a sentence-transformers encoder has no MLM or NSP head) start fresh.
    """
    from bertops.checkpoint import describe_checkpoint, read_config, resolve_model_dir
    from bertops.data.shards import read_manifest, tokenizer_hash
    from bertops.tokenizer import load_tokenizer

    if not cfg.train.init_from:
        return cfg, ""
    folder = resolve_model_dir(cfg.train.init_from)  # a folder, or a bundled model's name
    found = read_config(folder)
    model = dataclasses.replace(cfg.model, **{k: getattr(found, k) for k in ARCHITECTURE_FIELDS})
    manifest = read_manifest(data_dir)
    try:
        own = tokenizer_hash(load_tokenizer(folder))
    except BertopsError:
        own = None  # a folder without tokenizer files: only plan_run's vocabulary-size check applies
    if own is not None and own != manifest["tokenizer"]["hash"]:
        raise BertopsError(
            f"--data {data_dir} was tokenized with another tokenizer than train.init_from {folder}; "
            f"re-run `bertops data prepare --tokenizer {folder}`"
        )
    heads = "its MLM and NSP heads" if PRETRAINING.name in describe_checkpoint(folder)["tasks"] else (
        "fresh MLM and NSP heads (the folder has none)")
    note = (f"continuing from {folder}: {model.num_hidden_layers} layers, hidden {model.hidden_size}, "
            f"{model.num_attention_heads} heads, vocabulary {model.vocab_size} (its architecture, not the "
            f"config's model section), {heads}")
    return dataclasses.replace(cfg, model=model, train=dataclasses.replace(cfg.train, init_from=str(folder))), note


def _parameter_count(cfg: Config) -> int:
    import torch

    from bertops.tasks import get_task

    with torch.device("meta"):
        model = get_task(PRETRAINING.name).build_model(cfg.model)
    return sum(p.numel() for p in model.parameters())


def _check_run_dir(run_dir: Path, needed: int) -> None:
    """Fail now, not at the first checkpoint: the folder must be creatable, writable and have room."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        with probe.open("wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        raise BertopsError(
            f"cannot write to the run folder {run_dir} ({exc.strerror}); pass a writable --out"
        ) from None
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise BertopsError(
            f"the disk holding {run_dir} has {free / 2**20:,.1f} MiB free but one checkpoint and final/ need about "
            f"{needed / 2**20:,.1f} MiB; free space or pass another --out"
        )


@dataclass(frozen=True)
class Plan:
    """Everything validated, before any rank talks to another."""

    world: World
    precision: Precision
    ds_raw: dict
    run_dir: Path
    tokenizer_dir: Path
    micro2: int
    ds_choice: str  # the run log's line on which DeepSpeed config runs


def plan_run(cfg: Config, data_dir: str | Path, out_dir: str | Path | None, ds_config_path: str | None,
             resume: str | None) -> Plan:
    t = cfg.train
    if t.task != PRETRAINING.name:
        raise BertopsError(f"bertops pretrain trains the {PRETRAINING.name} task; train.task is {t.task!r}")
    world = world_from_env()
    _check_data(data_dir, cfg, "--data")
    t.grad_accum_steps(world.world_size)
    micro2 = t.phase2_micro_batch_size or t.micro_batch_size
    if t.phase2_step:
        _check_data(t.phase2_data, cfg, "train.phase2_data")
        dataclasses.replace(t, micro_batch_size=micro2).grad_accum_steps(world.world_size)
        if t.phase2_step >= t.max_steps:
            raise BertopsError(f"train.phase2_step={t.phase2_step} must be below train.max_steps={t.max_steps}")
    ds_raw, ds_choice = choose_ds_config(t.ds_config if ds_config_path is None else ds_config_path, world.world_size)
    from bertops.train.optim import check_optimizer

    check_optimizer(t, zero_stage(ds_raw))
    precision = resolve_precision(t.precision, world.device)
    if resume not in (None, "", "auto") and not ckpt.TAG_RE.match(resume):
        raise BertopsError(f"--resume {resume!r} is not understood; use --resume auto or a tag such as global_step100")
    run_dir = Path(out_dir or t.output_dir)
    if not resume and ckpt.tags(run_dir / CHECKPOINT_DIR):
        raise BertopsError(
            f"{run_dir} already holds checkpoints; pass --resume auto to continue that run, or another --out"
        )
    params = _parameter_count(cfg)
    _check_run_dir(run_dir, needed=params * 20 + (16 << 20))  # bf16/fp32 weights + fp32 masters + Adam moments
    tokenizer_dir = Path(data_dir) / "tokenizer"
    return Plan(world, precision, ds_raw, run_dir, tokenizer_dir, micro2, ds_choice)


# --- the run --------------------------------------------------------------------------------------


def pretrain(
    cfg: Config,
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    ds_config_path: str | None = None,
    resume: str | None = None,
) -> PretrainResult:
    """Pretrain (MLM + NSP) on prepared shards; returns what happened (rank 0 holds the history)."""
    cfg, init_note = continued_config(cfg, data_dir)
    plan = plan_run(cfg, data_dir, out_dir, ds_config_path, resume)
    saved_env = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    try:
        return _run(cfg, plan, data_dir, resume, init_note)
    finally:
        if not plan.world.launched:  # a plain process set these for itself; leave the caller's env as it was
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _run(cfg: Config, plan: Plan, data_dir: str | Path, resume: str | None, init_note: str = "") -> PretrainResult:
    from bertops.data.pipeline import PretrainInput, eval_batches
    from bertops.train.convert import fp32_state_dict
    from bertops.train.engine import build_engine
    from bertops.train.loop import LoopState, Phase, train
    from bertops.train.metrics import MetricsLog, plot_run

    world, t, run_dir = plan.world, cfg.train, plan.run_dir
    ckpt_dir = run_dir / CHECKPOINT_DIR
    init_process_group(world)
    say = RunLog(run_dir, world.is_main)

    found = ckpt.resume_point(ckpt_dir, resume, world.is_main, say)
    meta = found.meta
    if found.tag:
        ckpt.check_same_model(meta, cfg.to_dict()["model"], found.tag)
    start = int(meta.get("step", 0))
    same_layout = bool(found.tag) and (meta["world_size"], meta["zero_stage"], meta["precision"]) == (
        world.world_size, zero_stage(plan.ds_raw), plan.precision.name)
    init_state = None
    if found.tag and not same_layout:
        init_state = fp32_state_dict(ckpt_dir / found.tag, int(meta["zero_stage"]))

    say(plan.precision.reason)
    say(plan.ds_choice)
    if init_note and not found.tag:
        say(init_note)
    if world.device == "cpu":
        import torch

        say(f"{torch.get_num_threads()} CPU thread(s) per rank")
    phase2_active = bool(t.phase2_step) and start >= t.phase2_step
    micro = plan.micro2 if phase2_active else t.micro_batch_size
    engine = build_engine(cfg, world, plan.ds_raw, plan.precision, micro, init_state=init_state, start_step=start)
    del init_state  # the engine holds its own copy
    optimizer_state = "fresh"
    if found.tag and same_layout:
        _, client = engine.ds.load_checkpoint(str(ckpt_dir), tag=found.tag)
        ckpt.set_rng_state(client["bertops_rng"][world.rank])
        optimizer_state = "restored"
    elif found.tag:
        ckpt.seed_everything(t.seed * 1000 + start * 7919 + world.rank + 1)
        say(
            f"resuming {found.tag} written by {meta['world_size']} rank(s), ZeRO-{meta['zero_stage']}, "
            f"{meta['precision']} on {world.world_size} rank(s), ZeRO-{engine.stage}, {plan.precision.name}: "
            "weights, LR schedule and data position continue; optimizer moments restart from zero"
        )
    if found.tag:
        say(f"resumed from {found.tag}: step {start}, example {meta['position']} of phase {meta['phase']}")
    say(
        f"{world.world_size} rank(s) on {world.device}, ZeRO stage {engine.stage}, {engine.optimizer_name}, "
        f"global batch {t.global_batch_size} = micro {micro} x ranks {world.world_size} x accumulation "
        f"{engine.ds.gradient_accumulation_steps()}, {t.max_steps} steps"
    )
    if world.is_main:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (run_dir / "ds_config.json").write_text(json.dumps(engine.ds_config, indent=2) + "\n")

    def make_input(directory, micro_batch):
        def make(start_example: int):
            return iter(PretrainInput(
                directory, micro_batch_size=micro_batch, global_batch_size=t.global_batch_size,
                rank=world.rank, world_size=world.world_size, seed=t.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                shard_interleave=cfg.data.shard_interleave,
                mlm_probability=cfg.data.mlm_probability, whole_word_masking=cfg.data.whole_word_masking,
                start_example=start_example,
            ))
        return make

    phases = [Phase(1, t.micro_batch_size, make_input(data_dir, t.micro_batch_size), 0)]
    if t.phase2_step:
        phases.append(Phase(2, plan.micro2, make_input(t.phase2_data, plan.micro2), t.phase2_step))
    eval_source = None
    if t.eval_batches:
        eval_dir = t.phase2_data if phase2_active else data_dir

        def eval_source():
            return eval_batches(
                eval_dir, batch_size=micro, seed=t.seed, mlm_probability=cfg.data.mlm_probability,
                whole_word_masking=cfg.data.whole_word_masking, rank=world.rank, world_size=world.world_size,
                max_examples=t.eval_batches * micro * world.world_size,
            )

    def save(step: int, position: int, phase: int) -> None:
        tag = ckpt.tag_for(step)
        from bertops.train.dist import all_gather_object

        rng = all_gather_object(ckpt.rng_state())
        engine.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"bertops_rng": rng}, save_latest=False)
        barrier()
        if world.is_main:
            ckpt.write_manifest(ckpt_dir, tag, {
                "step": step, "position": position, "phase": phase, "world_size": world.world_size,
                "zero_stage": engine.stage, "precision": plan.precision.name, "data_dir": str(data_dir),
                "model": cfg.to_dict()["model"],
            }, plan.tokenizer_dir, t.keep_checkpoints)
        barrier()

    metrics = MetricsLog(run_dir, world.is_main, resume_step=start if found.tag else None)
    position = int(meta.get("position", 0)) if found.tag and meta["phase"] == (2 if phase2_active else 1) else 0
    state = LoopState(step=start, phase=2 if phase2_active else 1, position=position)
    try:
        train(engine, cfg, state, phases, metrics, save, eval_source, say)
    finally:
        metrics.close()
    final_dir = run_dir / FINAL_DIR
    if world.is_main:
        _write_final(ckpt_dir, final_dir)
        plot_run(run_dir)
        say(f"done: {final_dir} (export: bertops export onnx --model {final_dir} --task {FILL_MASK.name})")
    barrier()
    return PretrainResult(
        run_dir=run_dir, final_dir=final_dir, steps=state.step, precision=plan.precision.name,
        world_size=world.world_size, resumed_from=found.tag, skipped_checkpoints=found.skipped,
        optimizer_state=optimizer_state, history=state.history, evals=state.evals,
    )


def _write_final(ckpt_dir: Path, final_dir: Path) -> None:
    """RUN_DIR/final/ from the newest checkpoint (replaces an older final/ only once the new one is complete)."""
    from bertops.train.convert import convert_checkpoint

    staging = final_dir.with_name(final_dir.name + ".new")
    if staging.exists():
        shutil.rmtree(staging)
    convert_checkpoint(ckpt_dir, staging)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    staging.replace(final_dir)
