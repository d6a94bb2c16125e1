"""One-process training with each micro-batch's forward and backward replayed from a CUDA graph.

Why: at Moonlight-16B-A3B widths on one H200 a step launches ~8,200 kernels, and the host's own
time (~195 ms under cProfile for 4 layers) is as long as the GPU's (~168 ms): the step is
host-bound, so GPU time saved by a faster kernel shows up only partly (benchmarks/notes-train.md).
A graph replay launches the whole micro-batch with one call.

`MicrobatchGraph.run(tokens)` runs one micro-batch: the first call runs it eagerly (on a side
stream, as PyTorch's whole-network capture asks: kernels compile, cuBLAS and cuDNN pick their
plans, WeightCache entries and gradients come into being), then captures the same work into a
graph, which every later call replays after copying its tokens into the graph's input buffer.

What a replay relies on, and who keeps it true:
- Static shapes and no host sync inside the forward and backward: the routed experts' layout is
  planned on the device with a fixed bound on its rows (`grouped_experts._device_plan`); a sync
  raises at capture.
- Gradients exist before the capture (made by the eager first call) and are never set to None:
  every replay adds into them (the GEMM epilogues' `grad_to_add_into` and AccumulateGrad's
  in-place add), so the step zeroes them in place (`step.apply_update(keep_grads=True)`).
- Weights read through a WeightCache (bf16 casts, FP8 quantizations) are re-made in place after
  each optimizer step (`refresh`): the graph reads the cached tensors' storage, not the cache.
  Weights read directly (norms, embedding, router, biases) are updated in place by the optimizer
  and `step.set_biases`.
- Autocast runs without its weight-cast cache (a cached cast would be captured once, stale after).
- The loss parts and expert loads accumulate into this object's buffers (`loss_3`, `loads_LE`),
  which the step zeroes (`zero_outputs`) and reads once.
"""

from __future__ import annotations

import torch
from torch import nn

from moeray.platform import fp8 as f8
from moeray.platform.train import step as tstep


class MicrobatchGraph:
    """The forward and backward of one micro-batch of `model` (tokens [B, S+1] of a fixed shape)
    as a CUDA graph, its loss divided by `microbatches` (a step's count) before the backward.
    CUDA only; see the module docstring for what the caller must keep true between replays."""

    def __init__(
        self,
        model: nn.Module,
        loss_cfg: tstep.LossConfig,
        microbatches: int,
        device: torch.device,
        dtype: torch.dtype | None = torch.bfloat16,
    ) -> None:
        """`dtype`: the autocast dtype the forward runs under; None: no autocast."""
        if device.type != "cuda":
            raise ValueError(f"MicrobatchGraph needs a CUDA device, got {device}")
        self.model, self.loss_cfg, self.microbatches = model, loss_cfg, microbatches
        self.device, self.dtype = device, dtype
        n_moe = len(tstep.moe_layers(model))
        n_exp = tstep.moe_layers(model)[0].gate.weight.shape[0] if n_moe else 0
        # [main, mtp, balance] summed over micro-batches, each over `microbatches`
        self.loss_3 = torch.zeros(3, device=device)
        self.loads_LE = torch.zeros(n_moe, n_exp, dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tokens: torch.Tensor | None = None
        self.caches = f8.weight_caches(model)

    def zero_outputs(self) -> None:
        self.loss_3.zero_()
        self.loads_LE.zero_()

    def refresh(self) -> int:
        """After the optimizer step: re-make every cached weight form in place (see the module
        docstring). Returns the entries re-made."""
        return sum(c.refresh() for c in self.caches)

    def run(self, tokens_BS1: torch.Tensor, loss_cfg: tstep.LossConfig | None = None) -> None:
        """Forward and backward of one micro-batch, adding into the gradients and the outputs.
        `loss_cfg`: this step's loss (a schedule may change the MTP weight); a new one is
        captured anew (the graph holds the weights as constants), the old graph released."""
        if loss_cfg is not None and loss_cfg != self.loss_cfg:
            self.loss_cfg, self.graph = loss_cfg, None
        if self.graph is None:
            self._first(tokens_BS1)
            return
        assert self.tokens is not None
        if tokens_BS1.shape != self.tokens.shape:
            raise ValueError(
                f"tokens {tuple(tokens_BS1.shape)}: this graph was captured for "
                f"{tuple(self.tokens.shape)}"
            )
        self.tokens.copy_(tokens_BS1)
        self.graph.replay()

    def _body(self) -> None:
        assert self.tokens is not None
        on = self.dtype is not None
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=on, cache_enabled=False):
            parts = tstep.compute_loss(self.model, self.tokens, self.loss_cfg)
        (parts.total / self.microbatches).backward()
        self.loss_3.add_(parts.values_3 / self.microbatches)
        if self.loads_LE.numel():
            self.loads_LE.add_(tstep.expert_loads_on_device(self.model))

    def _first(self, tokens_BS1: torch.Tensor) -> None:
        self.tokens = tokens_BS1.to(self.device).clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._body()  # this micro-batch's work, eagerly
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        # The eager pass's freed activations would stay cached in the default pool while the
        # graph's private pool allocates its own: near the memory limit that doubles the peak.
        torch.cuda.empty_cache()
        self.caches = f8.weight_caches(self.model)  # entries exist now; the graph reads them
        named = self.model.named_parameters()
        grads = {n: p.grad.data_ptr() for n, p in named if p.grad is not None}
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' CUDA calls stay legal during the capture. In the default
        # global mode, a call from another thread (the NCCL process group's watchdog polling its
        # events, in a Ray Train worker) invalidated the capture, and the next launch failed
        # ("Pointer argument cannot be accessed from Triton").
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._body()  # recorded, not run: the eager pass above did this micro-batch
        # AccumulateGrad adds out of place (a new tensor assigned to .grad) when something else
        # holds a reference to the gradient: replays would then add into a tensor that is no
        # longer the gradient, and micro-batches would not accumulate.
        now = {n: p.grad for n, p in self.model.named_parameters() if n in grads}
        moved = [n for n, ptr in grads.items() if _ptr(now[n]) != ptr]
        if moved:
            raise RuntimeError(
                f"MicrobatchGraph: the capture replaced the gradients of {moved[:5]} "
                f"({len(moved)} parameters); a replay would not add into them"
            )
        self.graph = graph


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
