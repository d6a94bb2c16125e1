"""Live expert placement for an expert-parallel serving gang: stage a new logical-to-physical
expert map on every rank, then switch all ranks to it between the same two steps.

Legend: L MoE layers, E logical experts, P physical slots (E plus redundant replicas), S = P / N
slots per rank (N ranks), R the most replicas of one expert, I expert width, D model width.

A placement (`platform/placement.py`) puts physical slot p on rank p // S. Switching is two-phase:
  1. `stage(version, placement)` (any thread, while the engine keeps serving): this rank builds the
     expert weights of its new slots, copied from the slots it holds now where the logical expert
     is already here, else read through `source` (the checkpoint files: `rank_weights.py`).
  2. `switch(agreed)` (the engine thread, after a step's lockstep): the lockstep's last round of
     every step carries each rank's newest staged version and returns their minimum, identical on
     all ranks; every rank then swaps in that version's map and weights before the next step. No
     rank can switch alone, so the all-to-alls of the next step use one map on every rank.
Replicas hold the same weights, so which replica computes a token never changes its output; no
request is paused or dropped (the swap is a few attribute assignments between steps).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moeray.kernels.common import FP8_DTYPE
from moeray.platform.parallel.serve_ep import ExpertStack, ExpertStacks, ServingEPMoE
from moeray.platform.placement import Placement

log = logging.getLogger(__name__)
PROJS = ("gate_proj", "up_proj", "down_proj")


# (MoE layer index in model order, logical expert ids) -> those experts' stacked projections:
# gate_proj and up_proj [n, I, D], down_proj [n, D, I]; e4m3 + scales when `fp8` is asked.
ExpertSource = Callable[[int, list[int], bool], ExpertStacks]


@dataclass(frozen=True)
class StagedLayer:
    phy2log_P: torch.Tensor
    log2phy_ER: torch.Tensor
    logcnt_E: torch.Tensor
    weights: ExpertStacks  # this rank's S slots


@dataclass(frozen=True)
class SwitchReport:
    version: int
    loaded_experts: int  # slots whose weights were read through the source
    copied_experts: int  # slots copied from experts this rank already held


class PlacementSwitch:
    """Stages placements on one rank and applies the version all ranks agree on (module
    docstring). `source` is None when weights can only be copied (a placement that needs an
    expert this rank does not hold is then refused at staging)."""

    def __init__(
        self, model: nn.Module, ep_rank: int, ep_size: int, source: ExpertSource | None = None
    ) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, ServingEPMoE)]
        if not self.layers:
            raise ValueError("the model has no expert-parallel serving MoE layers")
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.source = source
        self.version = 0  # applied
        self.switches: list[tuple[int, int]] = []  # (version, gang step) of each switch
        self._staged: dict[int, list[StagedLayer]] = {}
        self._lock = threading.Lock()  # staging reads the held weights the switch replaces

    def ready_version(self) -> int:
        """The newest version staged here (or the applied one): this rank's lockstep vote."""
        with self._lock:
            return max([self.version, *self._staged])

    def stage(self, version: int, placement: Placement) -> SwitchReport:
        """Build this rank's weights for `placement` and keep them until the gang agrees."""
        L = len(self.layers)
        layers, P = placement.phy2log_LP.shape
        if layers != L or placement.num_gpus != self.ep_size:
            raise ValueError(
                f"placement for {layers} layers over "
                f"{placement.num_gpus} GPUs; this gang has {L} MoE layers over ep={self.ep_size}"
            )
        if P % self.ep_size:
            raise ValueError(f"{P} physical slots do not split over ep={self.ep_size} ranks")
        with self._lock:
            if version <= max([self.version, *self._staged]):
                raise ValueError(
                    f"placement version {version} must be newer than {self.version} (applied) "
                    f"and {sorted(self._staged)} (staged)"
                )
        S = P // self.ep_size
        lo = self.ep_rank * S
        loaded = copied = 0
        staged = []
        for i, moe in enumerate(self.layers):
            E = moe.num_global_experts
            if placement.logcnt_LE.shape[1] != E:
                raise ValueError(
                    f"placement is for {placement.logcnt_LE.shape[1]} experts, not {E}"
                )
            want = placement.phy2log_LP[i, lo : lo + S].tolist()
            with self._lock:
                held = moe.held_experts()
                held_w = [getattr(moe.experts, n) for n in PROJS]
                fp8 = held_w[0].dtype == FP8_DTYPE
                held_s = [getattr(moe.experts, f"{n}_scale_inv") if fp8 else None for n in PROJS]
            slot_of = {e: s for s, e in enumerate(held)}
            missing = sorted({e for e in want if e not in slot_of})
            if missing and self.source is None:
                raise ValueError(
                    f"rank {self.ep_rank} layer {i} would need experts {missing} it does not "
                    "hold, and there is no weight source to read them from"
                )
            read: ExpertStacks | None = None
            if missing:
                assert self.source is not None  # checked just above
                read = self.source(i, missing, fp8)
                for name, stack in zip(PROJS, read, strict=True):
                    if (stack.scale_inv is not None) != fp8:
                        raise ValueError(
                            f"layer {i} {name}: the source gave {stack.weight.dtype} experts "
                            f"{'with' if stack.scale_inv is not None else 'without'} scales; "
                            f"this rank holds {held_w[0].dtype} ones"
                        )
            read_row = {e: n for n, e in enumerate(missing)}
            rows = [slot_of[e] if e in slot_of else -1 - read_row[e] for e in want]
            weights = []
            for j in range(len(PROJS)):
                got = None if read is None else read[j]
                w = _stack_slots(rows, held_w[j], None if got is None else got.weight)
                hs = held_s[j]
                scale = None
                if hs is not None:
                    scale = _stack_slots(rows, hs, None if got is None else got.scale_inv)
                weights.append(ExpertStack(w, scale))
            loaded += sum(e not in slot_of for e in want)
            copied += sum(e in slot_of for e in want)
            staged.append(
                StagedLayer(
                    placement.phy2log_LP[i].clone(),
                    placement.log2phy_LER[i].clone(),
                    placement.logcnt_LE[i].clone(),
                    (weights[0], weights[1], weights[2]),
                )
            )
        with self._lock:
            self._staged[version] = staged
        return SwitchReport(version, loaded, copied)

    def switch(self, agreed: int, step: int) -> bool:
        """Apply version `agreed` (the gang's minimum ready version) if it is newer than the
        applied one; every rank calls this with the same `agreed` after the same step."""
        with self._lock:
            if agreed <= self.version:
                return False
            if agreed not in self._staged:
                raise RuntimeError(
                    f"rank {self.ep_rank}: the gang agreed on placement {agreed}, which this "
                    f"rank never staged (staged: {sorted(self._staged)})"
                )
            for moe, layer in zip(self.layers, self._staged[agreed], strict=True):
                moe.set_placement(layer.phy2log_P, layer.log2phy_ER, layer.logcnt_E, layer.weights)
            self._staged = {v: s for v, s in self._staged.items() if v > agreed}
            self.version = agreed
            self.switches.append((agreed, step))
        log.info(
            "EP rank %d switched to expert placement v%d after step %d", self.ep_rank, agreed, step
        )
        return True


def _stack_slots(rows: list[int], held: torch.Tensor, read: torch.Tensor | None) -> torch.Tensor:
    """Stack slot weights: row r >= 0 is this rank's held slot r, r < 0 is row -1 - r of `read`
    (moved to the held tensor's device and dtype)."""
    out = []
    for r in rows:
        if r >= 0:
            out.append(held.detach()[r])
        else:
            assert read is not None  # negative rows exist only when experts were read
            out.append(read[-1 - r].to(held.device, held.dtype))
    return torch.stack(out).contiguous()
