"""One-process training with each micro-batch's forward and backward replayed from a CUDA graph.

Why: at Moonlight-16B-A3B widths on one H200 a step launches ~8,200 kernels, and the host's own
time (~195 ms under cProfile for 4 layers) is as long as the GPU's (~168 ms): the step is
host-bound, so GPU time saved by a faster kernel shows up only partly, and a slower host (FP8's
eager step ranged 0.72-0.79 s for 0.64-0.67 s of kernels on different machines) costs it all
(benchmarks/notes-train.md). A replay launches a whole micro-batch with one call.

Two graphs per micro-batch shape: `first` writes the gradients (captured with every `.grad`
None, so each gradient is the tensor its last kernel wrote, allocated in the graph's memory pool,
as the eager first micro-batch of a step does), `rest` adds into those same tensors (captured
after `first`, sharing its pool). A step replays `first` once, then `rest`: the gradients are
never zeroed, and no micro-batch pays for reading a gradient it overwrites.

`MicrobatchGraph.run(tokens)` runs one micro-batch. Before the first capture one eager pass
(on a side stream, as PyTorch's whole-network capture asks: kernels compile, cuBLAS and cuDNN
pick their plans, WeightCache entries come into being) warms up, its result discarded.

What a replay relies on, and who keeps it true:
- Static shapes and no host sync inside the forward and backward: the routed experts' layout is
  planned on the device with a fixed bound on its rows (`grouped_experts._device_plan`); a sync
  raises at capture.
- The gradients stay the tensors `first` writes: the optimizer step leaves them in place
  (`step.apply_update(keep_grads=True)`), never zeroed or set to None.
- Weights read through a WeightCache (bf16 casts, FP8 quantizations) are re-made in place after
  each optimizer step (`refresh`): the graph reads the cached tensors' storage, not the cache.
  Weights read directly (norms, embedding, router, biases) are updated in place by the optimizer
  and `step.set_biases`.
- Autocast runs without its weight-cast cache (a cached cast would be captured once, stale after).
- The loss parts and expert loads accumulate into this object's buffers (`loss_3`, `loads_LE`),
  zeroed by `start_step`, which also marks the next micro-batch as a step's first.
"""

from __future__ import annotations

import torch
from torch import nn

from moeray.platform import fp8 as f8
from moeray.platform.graph_capture import graph_capture
from moeray.platform.train import step as tstep


class MicrobatchGraph:
    """The forward and backward of one micro-batch of `model` (tokens [B, S+1] of a fixed shape)
    as CUDA graphs, its loss divided by `microbatches` (a step's count) before the backward.
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
        self.first: torch.cuda.CUDAGraph | None = None  # writes the gradients
        self.rest: torch.cuda.CUDAGraph | None = None  # adds into them
        self.tokens: torch.Tensor | None = None
        self.caches = f8.weight_caches(model)
        self._warm = False
        self._step_start = True

    def start_step(self) -> None:
        """Before a step's micro-batches: zero the outputs; the next `run` writes the gradients,
        later ones add into them."""
        self.loss_3.zero_()
        self.loads_LE.zero_()
        self._step_start = True

    def refresh(self) -> int:
        """After the optimizer step: re-make every cached weight form in place (see the module
        docstring). Returns the entries re-made."""
        return sum(c.refresh() for c in self.caches)

    def run(self, tokens_BS1: torch.Tensor, loss_cfg: tstep.LossConfig | None = None) -> None:
        """Forward and backward of one micro-batch into the gradients (written by a step's first
        micro-batch, added into after) and the outputs. `loss_cfg`: this step's loss (a schedule
        may change the MTP weight), which may change only at a step's first micro-batch: a new
        one is captured anew (the graphs hold it as constants), the old graphs released."""
        first, self._step_start = self._step_start, False
        if loss_cfg is not None and loss_cfg != self.loss_cfg:
            if not first:
                raise ValueError(
                    f"loss config changed inside a step ({self.loss_cfg} -> {loss_cfg}): it may "
                    "change only at a step's first micro-batch"
                )
            self.loss_cfg, self.first, self.rest = loss_cfg, None, None
        if self.tokens is None:
            self.tokens = tokens_BS1.to(self.device).clone()
        elif tokens_BS1.shape != self.tokens.shape:
            raise ValueError(
                f"tokens {tuple(tokens_BS1.shape)}: this graph was captured for "
                f"{tuple(self.tokens.shape)}"
            )
        if first and self.first is None:
            self._capture_first()
        elif not first and self.rest is None:
            self._capture_rest()
        self.tokens.copy_(tokens_BS1)
        graph = self.first if first else self.rest
        assert graph is not None
        graph.replay()

    def _body(self) -> None:
        assert self.tokens is not None
        on = self.dtype is not None
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=on, cache_enabled=False):
            parts = tstep.compute_loss(self.model, self.tokens, self.loss_cfg)
        (parts.total / self.microbatches).backward()
        self.loss_3.add_(parts.values_3 / self.microbatches)
        if self.loads_LE.numel():
            self.loads_LE.add_(tstep.expert_loads_on_device(self.model))

    def _warm_up(self) -> None:
        """One eager pass, its gradients and outputs discarded."""
        outputs = (self.loss_3.clone(), self.loads_LE.clone())
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        self.loss_3.copy_(outputs[0])
        self.loads_LE.copy_(outputs[1])
        self.caches = f8.weight_caches(self.model)  # entries exist now; the graphs read them
        self._warm = True

    def _capture_first(self) -> None:
        if not self._warm:
            self._warm_up()
        self.rest = None  # captured again after this one, in its pool
        for p in self.model.parameters():
            p.grad = None  # each gradient becomes what the captured backward writes
        # The eager pass's freed activations (and old graphs) would stay cached in the default
        # pool while the graph's private pool allocates its own: near the limit that doubles
        # the peak.
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        with graph_capture(graph):
            self._body()  # recorded, not run
        self.first = graph

    def _capture_rest(self) -> None:
        assert self.first is not None
        named = self.model.named_parameters()
        grads = {n: p.grad.data_ptr() for n, p in named if p.grad is not None}
        graph = torch.cuda.CUDAGraph()
        with graph_capture(graph, pool=self.first.pool()):
            self._body()  # recorded, not run
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
        self.rest = graph


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
