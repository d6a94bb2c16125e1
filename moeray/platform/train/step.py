"""One training step, pure (no Ray, no process groups of its own): loss, optimizer, schedule.

Legend: B sequences, S positions, V vocabulary, E routed experts, K experts per token, L MoE
layers (main layers then MTP blocks, the RouterActor's order).

Objective (DeepSeek-V3 report, sections 2.2 and 2.1.2):
  L = CE(main) + (lambda / D) * sum_k CE_k  +  sum over MoE layers of the sequence-wise balance loss
where CE_k is MTP depth k's cross-entropy for token t+1+k, and the balance term is
alpha * sum_i f_i P_i per sequence (`routing.balance.sequence_balance_loss`, alpha = 0.0001).
Optimizer: AdamW, betas (0.9, 0.95), weight decay 0.1 on matrices (not on norms, biases or the
1-D gate bias buffer), gradient clipping at global norm 1.0; learning rate: linear warmup, then
cosine decay to `min_lr_ratio * lr`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.autograd.graph import increment_version

from moeray.platform.loss import token_cross_entropy
from moeray.platform.model.moe import MoE
from moeray.platform.routing.balance import sequence_balance_loss

ZERO_STAGES = (0, 1)
MOMENTS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    total_steps: int = 200
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    clip: float = 1.0
    # 1: ZeRO-1, each data-parallel rank keeps AdamW state for its share of the parameters only
    # (train/zero.py); 0: every rank keeps all of it
    zero_stage: int = 0
    moments_dtype: str = "float32"  # AdamW's exp_avg / exp_avg_sq: float32 | bfloat16

    def __post_init__(self):
        if self.zero_stage not in ZERO_STAGES:
            raise ValueError(
                f"optim.zero_stage={self.zero_stage!r} is not supported; accepted: "
                f"{', '.join(map(str, ZERO_STAGES))}"
            )
        if self.moments_dtype not in MOMENTS_DTYPES:
            raise ValueError(
                f"optim.moments_dtype={self.moments_dtype!r} is not supported; accepted: "
                f"{', '.join(MOMENTS_DTYPES)}"
            )
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"lr={self.lr} must be > 0 and min_lr_ratio={self.min_lr_ratio} in [0, 1]"
            )
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must be in [0, total_steps={self.total_steps}]"
            )
        if self.clip <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"clip={self.clip} must be > 0 and weight_decay={self.weight_decay} >= 0"
            )


@dataclass(frozen=True)
class LossConfig:
    mtp_lambda: float = 0.3
    balance_alpha: float = 1e-4


def learning_rate(step: int, cfg: OptimConfig) -> float:
    """Step 0-based. Warmup reaches `lr` at step warmup_steps-1; cosine ends at min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.total_steps - cfg.warmup_steps - 1, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_impl(params: Sequence[torch.Tensor]) -> dict[str, bool]:
    """How every AdamW of the platform runs its update (keyword arguments of torch.optim.AdamW):
    on CUDA the fused kernel, a few launches per step for all parameters, where torch's default
    there (foreach) makes ~10 multi-tensor launches per chunk of parameters and the plain loop ~10
    per parameter; elsewhere torch's default (bit-identical across the CPU tests that compare
    optimizers)."""
    return {"fused": True} if params and all(p.is_cuda for p in params) else {}


def track_fused_updates(opt: torch.optim.Optimizer) -> None:
    """torch's fused AdamW writes the parameters without moving their version counters (torch
    2.11 on CUDA and 2.13 on CPU alike), and fp8.WeightCache reads those counters to drop a
    quantized weight that went stale: move them after each step of a fused optimizer (no kernel,
    a counter per parameter)."""
    if opt.defaults.get("fused"):
        params = [p for g in opt.param_groups for p in g["params"]]
        opt.register_step_post_hook(lambda *_: increment_version(params))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8, **adamw_impl(decay + no_decay)
    )
    track_fused_updates(opt)
    return opt


@dataclass(frozen=True)
class LossParts:
    """The objective (`total`, what backward runs on) and its parts for logging, kept on the
    loss's device as `values_3` [main, mtp, balance] (fp32, detached): reading them as floats
    makes the host wait for the GPU, which a step of several micro-batches should do once (sum
    `values_3` over them), not after every forward."""

    total: torch.Tensor
    values_3: torch.Tensor

    @property
    def main(self) -> float:
        """Next-token cross-entropy."""
        return float(self.values_3[0])

    @property
    def mtp(self) -> float:
        """Mean MTP cross-entropy over depths (before lambda); nan without MTP."""
        return float(self.values_3[1])

    @property
    def balance(self) -> float:
        """Sum of the sequence-wise balance losses."""
        return float(self.values_3[2])


def moe_layers(model: torch.nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, MoE)]


def compute_loss(model: torch.nn.Module, tokens_BS1: torch.Tensor, cfg: LossConfig) -> LossParts:
    """Forward the model on tokens[:, :-1] and build the objective from the module docstring."""
    if tokens_BS1.dim() != 2 or tokens_BS1.shape[1] < 2:
        raise ValueError(f"tokens must be [B, S+1] with S >= 1, got {tuple(tokens_BS1.shape)}")
    inputs_BS, targets_BS = tokens_BS1[:, :-1], tokens_BS1[:, 1:]
    B = inputs_BS.shape[0]
    out = model(inputs_BS)
    # the fused path (CUDA) writes the gradient over out.logits: nothing below reads the logits
    main = token_cross_entropy(out.logits, targets_BS)
    total = main
    mtp_ces = []
    for k, logits in enumerate(out.mtp_logits, start=1):
        # position s of depth k predicts token s+1+k: targets[:, k:], S-k of them
        mtp_ces.append(token_cross_entropy(logits, targets_BS[:, k:]))
    if mtp_ces:
        total = total + cfg.mtp_lambda / len(mtp_ces) * torch.stack(mtp_ces).sum()
    balance = main.new_zeros(())
    if cfg.balance_alpha > 0:
        for moe in moe_layers(model):
            r = moe.last_routing
            if r is None:
                continue
            T = r.scores_TE.shape[0]
            balance = balance + sequence_balance_loss(
                r.scores_TE.view(B, T // B, -1),
                r.expert_ids_TK.view(B, T // B, -1),
                cfg.balance_alpha,
            )
        total = total + balance
    mtp = torch.stack(mtp_ces).mean() if mtp_ces else main.new_full((), float("nan"))
    values = torch.stack([t.detach().float() for t in (main, mtp, balance)])
    return LossParts(total, values)


def expert_loads(model: torch.nn.Module) -> torch.Tensor:
    """[L, E] int64 tokens per expert of the last forward (this rank's tokens only), on the CPU."""
    return expert_loads_on_device(model).cpu()


def expert_loads_on_device(model: torch.nn.Module) -> torch.Tensor:
    """`expert_loads` where the counts are (the model's device): a step of several micro-batches
    sums these and reads them back once."""
    rows = [m.last_routing.counts_E.detach() for m in moe_layers(model)]
    return torch.stack(rows).to(torch.int64) if rows else torch.zeros(0, 0, dtype=torch.int64)


@torch.no_grad()
def set_biases(model: torch.nn.Module, bias_LE: torch.Tensor) -> None:
    layers = moe_layers(model)
    if bias_LE.shape[0] != len(layers):
        raise ValueError(f"bias_LE has {bias_LE.shape[0]} rows for {len(layers)} MoE layers")
    for moe, b in zip(layers, bias_LE, strict=True):
        moe.gate.e_score_correction_bias.copy_(b.to(moe.gate.e_score_correction_bias))


@dataclass(frozen=True)
class StepResult:
    loss: LossParts
    grad_norm: float
    lr: float
    loads_LE: torch.Tensor


def apply_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    cfg: OptimConfig,
    total_norm: float | None = None,
    keep_grads: bool = False,
) -> tuple[float, float]:
    """Clip, set this step's learning rate, step the optimizer, clear the gradients; returns
    (grad norm, lr).

    `total_norm`: the global gradient norm when parameters are sharded over ranks (every rank
    must scale by the same factor or the replicas drift apart); None computes it locally.
    `keep_grads`: the gradients are left as they are instead of set to None (a captured CUDA
    graph writes them by address, its step's first micro-batch overwriting: `train/graphs.py`).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    fused = bool(getattr(optimizer, "defaults", {}).get("fused"))
    if total_norm is None and fused:
        # The norm stays on the device: fused AdamW divides each gradient by
        # max((norm + 1e-6) / clip, 1) (clip_grad_norm_'s factor, inverted; exactly 1 when no
        # clipping), and the norm is read only after the optimizer's kernels are queued. Reading
        # it first drained the GPU and left it idle while the host launched the optimizer (the
        # one-GPU step is near host-bound: benchmarks/notes-train.md).
        norm_t = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        grad_scale = ((norm_t.float() + 1e-6) / cfg.clip).clamp(min=1.0)
        optimizer.grad_scale = grad_scale  # type: ignore[attr-defined]
        lr = _step(optimizer, step, cfg, fused, keep_grads)
        return float(norm_t), lr
    if total_norm is None:
        norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
    else:
        norm = float(total_norm)
    # clip_grad_norm_'s factor: clip / (norm + 1e-6) when below 1
    scale = cfg.clip / (norm + 1e-6)
    if scale < 1.0 and fused:
        # torch's fused AdamW divides each gradient by `grad_scale` as it reads it (the hook AMP's
        # GradScaler uses): clipping costs no pass of its own over the gradients. That pass was a
        # foreach multiply reading and writing every fp32 gradient, ~12 ms a step at 10 Moonlight
        # layers on an H200 (results/train-step-sources-nvidia-h200-bf16.json: 5.5 ms at 4).
        grad_scale = torch.full((), 1.0 / scale, device=params[0].device)
        optimizer.grad_scale = grad_scale  # type: ignore[attr-defined]
    elif scale < 1.0 and total_norm is not None:
        for p in params:
            assert p.grad is not None  # params holds only parameters with a gradient
            p.grad.mul_(scale)
    return norm, _step(optimizer, step, cfg, fused, keep_grads)


def _step(
    optimizer: torch.optim.Optimizer, step: int, cfg: OptimConfig, fused: bool, keep_grads: bool
) -> float:
    """Set this step's learning rate, step the optimizer (its `grad_scale` cleared after), clear
    the gradients (left in place with `keep_grads`, else set to None); returns the learning
    rate."""
    lr = learning_rate(step, cfg)
    for g in optimizer.param_groups:
        g["lr"] = lr
    try:
        optimizer.step()
    finally:
        if fused:
            optimizer.grad_scale = None  # type: ignore[attr-defined]
    if not keep_grads:
        optimizer.zero_grad(set_to_none=True)
    return lr


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokens_BS1: torch.Tensor,
    step: int,
    optim_cfg: OptimConfig,
    loss_cfg: LossConfig,
) -> StepResult:
    """Single-process step: forward, backward, clip, AdamW. (Distributed runs put a gradient
    all-reduce between backward and `apply_update`; see `replica.py`.)"""
    model.train()
    parts = compute_loss(model, tokens_BS1, loss_cfg)
    parts.total.backward()
    loads = expert_loads(model)
    norm, lr = apply_update(model, optimizer, step, optim_cfg)
    return StepResult(parts, norm, lr, loads)
