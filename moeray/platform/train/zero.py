"""ZeRO-1 for the PP = 1 replica (`replica.FlatReplica`): AdamW whose state each data-parallel rank
keeps only for the parameters it owns, and optional bf16 moments.

Scheme: gradients are all-reduced as without ZeRO (`replica.sync_gradients`, which also gives the
global norm for clipping), then each rank steps only the parameters it owns and broadcasts them,
one flat buffer per owner, to the other holders. Ownership is per whole parameter, not a slice of
one flat buffer: AdamW is elementwise, so both are exact, but whole parameters keep torch's own
AdamW step (bit-identical to the unsharded run), its per-parameter weight-decay groups and a
per-parameter state dict. Parameters are dealt largest first to the least-loaded rank (the tiny
preset: 266k replicated parameters over 2 ranks split 133120 / 133184).

Holders: a replicated parameter is the same on every rank of the world, so its owners are the
world's ranks; a routed-expert shard is the same only on the ranks with the same ep_rank (the DP
group, `Groups.dp_group`, ranks ep_rank, ep_rank + EP, ...), so it is dealt over those alone and
never across ranks that hold different experts (DP = 1: each rank owns its experts' state).

bf16 moments (`OptimConfig.moments_dtype`): exp_avg and exp_avg_sq are stored in bf16 (half the
state bytes), upcast to fp32 for each update and rounded back; weights stay fp32. On CUDA the
update is one Triton launch for all the parameters of a group (`kernels/adamw.py`, chooser
`use_fused_adamw`); elsewhere, or with MOERAY_FUSED_ADAMW=0, its PyTorch reference, ~10 ops a
parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moeray.kernels.adamw import adamw_step, adamw_step_applies, adamw_step_ref
from moeray.kernels.common import switched_off
from moeray.platform.parallel.expert import is_expert_param
from moeray.platform.train import step as tstep
from moeray.platform.train.replica import Groups


@dataclass
class _Holders:
    """Ranks holding the same copy of some parameters, and which of them each one owns."""

    ranks: list[int]  # global ranks, the group's order
    group: Any  # process group over `ranks` (None: the world)
    owned: list[list[torch.nn.Parameter]]  # per member of `ranks`


def deal(sizes: list[int], n: int) -> list[int]:
    """Owner index in [0, n) of each item: largest first, to the member holding the fewest
    elements so far (ties: the lowest index). The same on every rank for the same sizes."""
    load = [0] * n
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        k = min(range(n), key=lambda k: (load[k], k))
        owner[i] = k
        load[k] += sizes[i]
    return owner


def _holders(params: list[torch.nn.Parameter], ranks: list[int], group: Any) -> _Holders:
    owner = deal([p.numel() for p in params], len(ranks))
    owned: list[list[torch.nn.Parameter]] = [[] for _ in ranks]
    for p, k in zip(params, owner, strict=True):
        owned[k].append(p)
    return _Holders(ranks, group, owned)


def use_fused_adamw(device: torch.device) -> bool:
    """Whether `ShardedAdamW`'s low-precision update runs the fused kernel (`adamw_step`: one pass
    of 20 B a parameter with bf16 moments, one launch per parameter group) instead of
    `adamw_step_ref` (~10 PyTorch ops a parameter with fp32 temporaries): on CUDA unless
    MOERAY_FUSED_ADAMW=0. CPU keeps the loop. `adamw_step_applies` then checks the tensors."""
    return device.type == "cuda" and not switched_off("ADAMW")


class ShardedAdamW(torch.optim.AdamW):
    """AdamW over this rank's owned parameters (all of them when `groups` is None or ZeRO is
    off); `step` also broadcasts each owner's updated parameters to their other holders, and
    `zero_grad` clears every parameter's gradient, owned or not."""

    def __init__(
        self, model: torch.nn.Module, cfg: tstep.OptimConfig, groups: Groups | None = None
    ) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.all_params = [p for _, p in named]
        self.holders: list[_Holders] = []
        mine = set(self.all_params)
        if cfg.zero_stage == 1 and groups is not None and groups.world > 1:
            replicated = [p for n, p in named if not is_expert_param(n)]
            experts = [p for n, p in named if is_expert_param(n)]
            self.holders.append(_holders(replicated, list(range(groups.world)), None))
            dp_ranks = list(range(groups.ep_rank, groups.world, groups.ep_size))
            if experts and len(dp_ranks) > 1:
                self.holders.append(_holders(experts, dp_ranks, groups.dp_group))
            mine = set(self.all_params)
            for h in self.holders:
                me = h.ranks.index(groups.rank)
                mine -= {p for k, ps in enumerate(h.owned) if k != me for p in ps}
        owned = [p for p in self.all_params if p in mine]
        if not owned:
            raise ValueError(
                f"optim.zero_stage={cfg.zero_stage}: rank {groups.rank if groups else 0} owns no "
                f"parameter (more data-parallel ranks than parameters); use zero_stage 0"
            )
        super().__init__(
            [
                {"params": [p for p in owned if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                {"params": [p for p in owned if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=cfg.betas,
            eps=1e-8,
            **tstep.adamw_impl(owned),
        )
        tstep.track_fused_updates(self)
        self.moments_dtype = tstep.MOMENTS_DTYPES[cfg.moments_dtype]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ShardedAdamW.step takes no closure")
        if self.moments_dtype == torch.float32:
            super().step()
        else:
            self._low_precision_step()
        for h in self.holders:
            for k, ps in enumerate(h.owned):
                if not ps:
                    continue
                flat = torch.cat([p.reshape(-1) for p in ps])
                dist.broadcast(flat, src=h.ranks[k], group=h.group)
                offset = 0
                for p in ps:
                    p.copy_(flat[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
        return None

    def _low_precision_step(self) -> None:
        """AdamW (decoupled weight decay, bias-corrected moments) with the moments stored in
        `moments_dtype`; the arithmetic runs in fp32 (`kernels/adamw.py` states it). Gradients are
        divided by `grad_scale` when set (gradient clipping, as torch's fused AdamW reads it:
        `step.apply_update`). Each parameter keeps its own step counter (a CPU tensor, as torch
        keeps it for a non-fused AdamW); the parameters of a group that share a step are updated
        by one call, the fused kernel's where `use_fused_adamw` and `adamw_step_applies` say so."""
        grad_scale = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            by_step: dict[float, list[tuple[torch.Tensor, ...]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype)
                st["step"] += 1
                quad = (p, p.grad, st["exp_avg"], st["exp_avg_sq"])
                by_step.setdefault(float(st["step"]), []).append(quad)
            for t, quads in by_step.items():
                params, grads, exp_avgs, exp_avg_sqs = (list(x) for x in zip(*quads, strict=True))
                fused = use_fused_adamw(params[0].device) and adamw_step_applies(
                    params, grads, exp_avgs, exp_avg_sqs
                )
                (adamw_step if fused else adamw_step_ref)(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    lr=group["lr"],
                    beta1=group["betas"][0],
                    beta2=group["betas"][1],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    step=t,
                    grad_scale=grad_scale,
                )

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts loaded moments to the parameter's dtype; keep them in `moments_dtype`. With
        low-precision moments each step counter also stays a CPU fp32 tensor, as a fresh state
        has it: torch moves it to the parameter's device for its fused step (`fused` is set on
        CUDA), which this update does not run, and reading it there would make the host wait on
        the GPU once a parameter every step."""
        super().load_state_dict(state_dict)
        low_precision = self.moments_dtype != torch.float32
        for st in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key] = st[key].to(self.moments_dtype)
            if low_precision and isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].to("cpu", torch.float32)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            # one launch per ~hundred tensors instead of one per parameter
            grads = [p.grad for p in self.all_params if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)
            return
        for p in self.all_params:
            p.grad = None


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer state this rank holds (moments and step counters)."""
    return sum(
        v.numel() * v.element_size()
        for st in optimizer.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor)
    )


def build_optimizer(
    model: torch.nn.Module, cfg: tstep.OptimConfig, groups: Groups | None = None
) -> torch.optim.AdamW:
    """The run's AdamW: `step.build_optimizer`'s when ZeRO is off and moments are fp32, else
    `ShardedAdamW` (ZeRO-1 needs `groups`, the PP = 1 replica's)."""
    if cfg.zero_stage == 0 and cfg.moments_dtype == "float32":
        return tstep.build_optimizer(model, cfg)
    if cfg.zero_stage == 1 and groups is None:
        raise ValueError("optim.zero_stage=1 needs the PP = 1 replica's process groups")
    return ShardedAdamW(model, cfg, groups)
