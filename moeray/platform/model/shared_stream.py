"""The shared experts on a second CUDA stream beside the routed ones (SGLang's dual-stream MoE for
DeepSeek-V2/V3): a transform applied to a loaded model from outside, once, for inference.

Why: past the 16 decode tokens where the shared experts ride inside the fused MoE kernels
(model/shared_fuse.py), each MoE layer runs its shared MLP as launches of its own (gate and up
GEMMs, SwiGLU, the down GEMM), short and latency-bound: at Moonlight FP8 batch 64 on an H100 the
two 2,816 x 2,048 GEMMs take ~7.8 us each and the down GEMM ~8.9 us for ~35 MB, about 27 us of a
~310 us layer, while the routed experts' kernels stream ~550 MB at ~80% of the HBM rate
(benchmarks/results/engine-nvidia-h100-80gb-hbm3-moonlight-fp8-defaults.json). On a second stream
the shared MLP runs while the router, the gate, the alignment and the routed experts run on the
main one; the streams join before the shared output is added. Measured on an H100 with `bench
engine --ab SHARED_STREAM` (benchmarks/results/engine-nvidia-h100-80gb-hbm3-*-sstream.json), batch
64 tokens/s: Moonlight FP8 +5.1% (decode graph 8.33 -> 7.95 ms), bf16 +3.5%, V3 widths FP8 even
(its routed experts outweigh the shared MLP ~40x); batch 1 and 8 (fused shared experts) even.
With FP8 weights the shared MLP's layers still run at 17-64 rows as bf16 GEMMs over kept copies
(model/quant.py `fp8_as_bf16`): keeping them FP8 on the side stream (act_quant + the block-scaled
GEMM, half the bytes beside the routed experts' stream) measured even at batch 64 and 1.2% slower
at 32 (benchmarks/results/engine-nvidia-h100-80gb-hbm3-moonlight-fp8-sstreamfp8.json).

What changes, per `MoE` with shared experts: `MoE.shared_stream` gets a `SharedStream`, and the
MoE's forward hands it the shared MLP where it `applies` (CUDA inference of 1 to MAX_TOKENS tokens
that the fused shared experts do not take): it forks (the side stream waits for the main one, so
it sees x), runs the shared MLP there, and the main stream waits for it before the add. The sum
is the routed experts' output rounded, plus the shared output (DeepSeek-V3's and transformers'
order); the path it replaces adds the shared output inside the routed sum's last launch (one
rounding fewer), so the two differ by one rounding of the dtype.

Memory and CUDA graphs: x (allocated on the main stream) is read on the side stream, and the
main stream waits for the side stream before anything after the MoE runs, so no later main-stream
allocation reuses x's memory while the side stream reads it; the shared output is allocated on
the side stream and consumed by the main one after the join, and the side stream's next work
starts after the next fork, so its memory is not reused early either. Under capture the fork and
join are event edges of the graph (the side stream joins before the forward returns).

MOERAY_FUSED_SHARED_STREAM=0 turns it off (the A/B switch); `SharedStream(None)` runs the same
path in order on the current stream (CPU tests). By default (SHARED_SUM; MOERAY_FUSED_SHARED_SUM=0
joins first and adds apart) the main stream does not join before an add launch of its own: the
routed experts take the shared output as their `add_TD` and their last launch (the fused MoE's
sum) waits for the side stream's event, then adds it with the same rounding (one launch fewer a
layer; the main stream still waits for the side stream inside the MoE, so the memory argument
above holds). On an H100 at Moonlight batch 64 (`bench engine --ab`, benchmarks/results/engine-
nvidia-h100-80gb-hbm3-moonlight-fp8-moelaunches.json): decode graph 0.993x as long (FP8).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moeray.kernels.common import switched_off
from moeray.platform.model.moe import MoE

# The most tokens a forward runs the shared MLP on the side stream: decode batches. Past that the
# GEMMs are long enough to fill the GPU on their own (SGLang's bound is 1,024; not measured here).
MAX_TOKENS = 256


class SharedStream(nn.Module):
    """Runs a MoE layer's shared MLP on `stream` beside the routed experts (module docstring); one
    instance serves every layer of a model (the layers run one after another). `stream` None runs
    the same steps in order on the current stream."""

    def __init__(self, stream: torch.cuda.Stream | None, add_in_sum: bool = False) -> None:
        super().__init__()
        self.stream = stream
        # The MoE hands the shared output to the routed experts, whose last launch adds it after
        # waiting on `ready` (no add launch of its own); else `join` adds it.
        self.add_in_sum = add_in_sum

    def applies(self, x_TD: torch.Tensor) -> bool:
        """Inference (no autograd) of 1 to MAX_TOKENS tokens, on CUDA where a stream is set."""
        T = x_TD.shape[0]
        on_device = self.stream is None or x_TD.is_cuda
        return on_device and not torch.is_grad_enabled() and 0 < T <= MAX_TOKENS

    def start(
        self, mlp: Callable[[torch.Tensor], torch.Tensor], x_TD: torch.Tensor
    ) -> torch.Tensor:
        """mlp(x_TD) launched on the side stream after everything launched so far on the current
        one (the writes of x among them); `join` before its result is read."""
        if self.stream is None:
            return mlp(x_TD)
        self.stream.wait_stream(torch.cuda.current_stream(x_TD.device))
        with torch.cuda.stream(self.stream):
            return mlp(x_TD)

    def ready(self) -> torch.cuda.Event | None:
        """An event recorded on the side stream after the work `start` launched there (None
        without a stream); the current stream waits for it before it reads the shared output."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def join(self, routed_TD: torch.Tensor, shared_TD: torch.Tensor) -> torch.Tensor:
        """routed + shared on the current stream, once the side stream's work is done."""
        if self.stream is not None:
            torch.cuda.current_stream(routed_TD.device).wait_stream(self.stream)
        return routed_TD + shared_TD


def overlap_shared_experts(model: nn.Module) -> dict[str, str | None]:
    """Give each MoE layer of `model` with shared experts one `SharedStream` on a new stream of the
    model's CUDA device (module docstring), or take it away where it does not apply. Returns {MoE
    module name: None where set, else why not}; layers without shared experts are left out."""
    param = next(model.parameters(), None)
    device = None if param is None else param.device
    reason = None
    if switched_off("SHARED_STREAM"):
        reason = "MOERAY_FUSED_SHARED_STREAM=0"
    elif device is None or device.type != "cuda":
        reason = f"parameters on {device}: needs CUDA"
    side = None
    if reason is None:
        side = SharedStream(torch.cuda.Stream(device), add_in_sum=not switched_off("SHARED_SUM"))
    report: dict[str, str | None] = {}
    for name, moe in list(model.named_modules()):
        if not isinstance(moe, MoE) or moe.shared_experts is None:
            continue
        if type(moe) is not MoE:  # expert-parallel and placed layers: see MoE._shared_stream
            report[name] = f"{type(moe).__name__}: runs its shared experts in order"
            continue
        moe.register_module("shared_stream", side)
        report[name] = reason
    return report
