"""DeepSpeed engine set-up: model, optimiser, LR schedule and the injected DeepSpeed config, in one call.

``build_engine`` seeds every rank identically before building the model (ZeRO-3 partitions
whatever each rank built, so the weights must agree), applies activation checkpointing, picks the
optimiser (:mod:`bertops.train.optim`) and hands DeepSpeed a config whose batch sizes, clipping and
precision come from the bertops config (:mod:`bertops.train.dsconfig`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from bertops.config import Config
from bertops.train.dist import World
from bertops.train.dsconfig import Precision, build_ds_config, offloads_optimizer, zero_stage
from bertops.train.optim import WarmupDecay, check_optimizer, make_optimizer


@dataclass
class Engine:
    ds: Any  # deepspeed.DeepSpeedEngine
    precision: Precision
    stage: int
    ds_config: dict
    optimizer_name: str  # class of the basic optimiser, for the run log

    @property
    def device(self):
        return self.ds.device


def quiet_deepspeed() -> None:
    """DeepSpeed logs every config key at INFO on every rank; bertops writes its own run log."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def build_engine(
    cfg: Config,
    world: World,
    ds_raw: dict,
    precision: Precision,
    micro_batch_size: int,
    *,
    init_state: dict | None = None,
    start_step: int = 0,
    model=None,
) -> Engine:
    """Model + optimiser + schedule wrapped by ``deepspeed.initialize``.

    ``init_state`` (full fp32 weights) starts the model from a checkpoint of another world size or
    ZeRO stage; ``start_step`` then places the LR schedule where that checkpoint left it. ``model``
    (fine-tuning) replaces the pretraining model this otherwise builds.
    """
    import deepspeed
    import torch

    from bertops.checkpoint import TIED_KEYS, load_weights, read_weights
    from bertops.tasks import PRETRAINING, get_task
    from bertops.train.checkpoints import seed_everything

    quiet_deepspeed()
    train = cfg.train
    stage = zero_stage(ds_raw)
    check_optimizer(train, stage)
    seed_everything(train.seed)  # the same initial weights on every rank
    if model is not None:  # fine-tuning: the task's model, built (identically on every rank) by the caller
        model.train()
    else:
        model = get_task(PRETRAINING.name).build_model(cfg.model)
        if train.init_from:  # continued pretraining: cfg.model already has the folder's shape (run.continued_config)
            load_weights(model, read_weights(train.init_from), train.init_from,
                         lambda shape: f"the model continued from it expects {shape}")
    if init_state is not None:
        result = model.load_state_dict(init_state, strict=False)
        missing = [k for k in result.missing_keys if k not in TIED_KEYS]
        if missing:
            raise RuntimeError(f"checkpoint weights lack {missing[0]}")
    model.bert.encoder.gradient_checkpointing = train.activation_checkpointing
    ds_config = build_ds_config(ds_raw, train, precision, world.world_size, micro_batch_size)
    optimizer = make_optimizer(model, train, world.device, offloads_optimizer(ds_raw))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: WarmupDecay(opt, train, step=start_step),
        config=ds_config,
        dist_init_required=False,
    )
    if start_step:
        engine.global_steps = start_step
        engine.global_samples = start_step * train.global_batch_size
    seed_everything(train.seed * 1000 + world.rank + 1)  # dropout differs between ranks
    del torch
    return Engine(engine, precision, stage, ds_config, type(optimizer).__name__)


def set_micro_batch(engine: Engine, micro_batch_size: int, global_batch_size: int) -> None:
    """Phase 2 of a two-phase schedule: new micro batch, same global batch (accumulation adapts)."""
    engine.ds.set_train_micro_batch_size(micro_batch_size)
    engine.ds.set_train_batch_size(global_batch_size)
