"""Optimisers and the learning-rate schedule: AdamW / LAMB choice, weight-decay groups, warm-up + decay.

What runs where (DeepSpeed 0.19's own sources decide this, see ``engine._configure_basic_optimizer``):

===========  ===========================================  ==========================================
optimizer    CPU                                           CUDA
===========  ===========================================  ==========================================
adamw        ``torch.optim.AdamW(fused=True)``;            ``torch.optim.AdamW(fused=True)``;
             with ``offload_optimizer``: DeepSpeedCPUAdam  with offload: DeepSpeedCPUAdam
lamb         :class:`Lamb` below (plain torch)             DeepSpeed's ``FusedLamb`` (a CUDA kernel,
             — DeepSpeed's FusedLamb is CUDA-only          so unavailable on CPU)
===========  ===========================================  ==========================================

LAMB scales each update by a per-tensor trust ratio ||w|| / ||update||. ZeRO stages 1-3 hand the
optimiser flat partitions that cut across tensors, where that ratio means nothing, so LAMB is
accepted with ZeRO stage 0 only (there DeepSpeed keeps one fp32 master per tensor, any precision).
"""

from __future__ import annotations

import math

import torch

from bertops.config import TrainConfig
from bertops.errors import BertopsError

NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias")


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, as NVIDIA's BERT recipe runs it): Adam direction, per-tensor trust ratio."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                grad = p.grad.float()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                weights = p.float()
                if group["weight_decay"]:
                    update.add_(weights, alpha=group["weight_decay"])
                w_norm, u_norm = weights.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.add_((update * (-group["lr"] * trust)).to(p.dtype))
        return loss


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay on weight matrices and embeddings; none on biases and LayerNorm (BERT's recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied weights appear once
        if p.requires_grad:
            (no_decay if name.endswith(NO_DECAY) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def check_optimizer(train: TrainConfig, stage: int) -> None:
    """Refuse combinations that would silently compute something else."""
    if train.optimizer == "lamb" and stage > 0:
        raise BertopsError(
            f"train.optimizer=lamb needs whole tensors for its per-layer trust ratio, but ZeRO stage {stage} hands "
            "the optimiser flat partitions; use --deepspeed ds_configs/zero0.json, or train.optimizer=adamw"
        )


def make_optimizer(model: torch.nn.Module, train: TrainConfig, device: str, offload: bool) -> torch.optim.Optimizer:
    """The basic optimiser DeepSpeed wraps (see the table in this module's docstring)."""
    groups = param_groups(model, train.weight_decay)
    kwargs = dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon)
    if train.optimizer == "lamb":
        if device == "cuda":
            from deepspeed.ops.lamb import FusedLamb

            return FusedLamb(groups, **kwargs)
        return Lamb(groups, **kwargs)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=True, **kwargs)


def lr_factor(step: int, train: TrainConfig) -> float:
    """Share of the peak LR for optimizer step ``step`` (0-based): linear warm-up, then the decay."""
    warm, total = train.warmup_steps, train.max_steps
    if step < warm:
        return (step + 1) / warm
    if train.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    floor = train.min_lr_ratio
    if train.lr_schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * (1 - progress)


class WarmupDecay:
    """The LR scheduler DeepSpeed drives: sets every param group's ``lr`` from the step count alone.

    Its whole state is that count, so a resumed run (any number of ranks) continues the same curve.
    """

    def __init__(self, optimizer, train: TrainConfig, step: int = 0):
        self.optimizer, self.train, self.step_count = optimizer, train, step
        self._apply()

    def _apply(self) -> None:
        lr = self.train.learning_rate * lr_factor(self.step_count, self.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)

    def step(self, *args, **kwargs) -> None:
        self.step_count += 1
        self._apply()

    def get_lr(self) -> list[float]:
        return list(self._last_lr)

    get_last_lr = get_lr

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
