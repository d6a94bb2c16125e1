"""FP8 training for linear layers, DeepSeek-V3 recipe (docs/deepseek-v3.md, "FP8").

Legend: M tokens, K input features, N output features; 1x128 = one scale per token per 128
features, 128x1 = one scale per feature per 128 tokens, 128x128 = one scale per weight block.

y = x W^T with all three GEMMs in e4m3 and fp32 accumulation:
  forward   y  = Q1x128(x)  @ Q128x128(W)^T          [M, K] x [N, K]^T
  input     dx = Q1x128(dy) @ Q128x128(W)            [M, N] x [N, K]  (W's blocks transpose exactly)
  weight    dW = Q128x1(dy)^T @ Q128x1(x)            reduce over tokens, so both re-tiled 128x1
Q(.) quantizes each group with scale = amax/448 (448 = largest e4m3 value), rounds to nearest e4m3.
Master weights and gradients stay fp32 (or the model's dtype); only the GEMM inputs are FP8.

On CPU this module is an exact emulation: quantize, dequantize, fp32 matmul (the GEMM's fp32
accumulation differs from the GPU's only in summation order). On CUDA it calls
`moeray.kernels.fp8` (Triton / cuBLASLt block-scaled GEMMs). The quantizers `qdq_*` are plain
PyTorch: the CPU path and the test oracle. The three GEMMs (`forward_gemm`, `dgrad_gemm`,
`wgrad_gemm`) are public: `parallel/weight_grad.py` runs the weight-grad one later, as DualPipe's W.

What runs in FP8 (`enable_fp8_training`, by scope, FP8_SCOPES): with "all" the attention
projections (q/kv LoRA, kv_b, o) and the SwiGLU projections of the dense layers, shared experts and
routed experts; "experts", the Train job's and the bench's default, the routed experts only (the
one scope measured within 0.25% of BF16's loss, benchmarks/notes-train.md). The embedding, output
head, router gate, norms, MTP's eh_proj and the attention core stay in higher precision always.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeray.kernels import fp8 as kernels
from moeray.kernels.common import AMAX_FLOOR, FP8_BLOCK, FP8_DTYPE, FP8_MAX
from moeray.platform.model.mla import MLA
from moeray.platform.model.moe import MLP, Experts


def _qdq_rows(x_RG: torch.Tensor, fp8_max: float = FP8_MAX) -> torch.Tensor:
    """Quantize-dequantize each row (one group) of x with its own scale amax/fp8_max, in fp32."""
    amax = x_RG.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR)
    scale = amax / fp8_max
    q = (x_RG / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.float() * scale


def qdq_1x128(x_MK: torch.Tensor, fp8_max: float = FP8_MAX) -> torch.Tensor:
    """Per-token groups of 128 features (a partial last group when K % 128 != 0)."""
    M, K = x_MK.shape
    kb = -(-K // FP8_BLOCK)
    x = F.pad(x_MK.float(), (0, kb * FP8_BLOCK - K)).view(M, kb, FP8_BLOCK)
    return _qdq_rows(x, fp8_max).view(M, kb * FP8_BLOCK)[:, :K]


def qdq_128x1(x_MK: torch.Tensor, fp8_max: float = FP8_MAX) -> torch.Tensor:
    """Per-feature groups of 128 tokens: the tiling the weight-grad GEMM reduces over."""
    return qdq_1x128(x_MK.t(), fp8_max).t()


def qdq_128x128(w_NK: torch.Tensor, fp8_max: float = FP8_MAX) -> torch.Tensor:
    """Per 128x128 weight block (partial blocks at the edges)."""
    N, K = w_NK.shape
    nb, kb = -(-N // FP8_BLOCK), -(-K // FP8_BLOCK)
    w = F.pad(w_NK.float(), (0, kb * FP8_BLOCK - K, 0, nb * FP8_BLOCK - N))
    blocks = (
        w.view(nb, FP8_BLOCK, kb, FP8_BLOCK)
        .permute(0, 2, 1, 3)
        .reshape(nb, kb, FP8_BLOCK * FP8_BLOCK)
    )
    out = _qdq_rows(blocks, fp8_max).view(nb, kb, FP8_BLOCK, FP8_BLOCK).permute(0, 2, 1, 3)
    return out.reshape(nb * FP8_BLOCK, kb * FP8_BLOCK)[:N, :K]


def _kernels_for(t: torch.Tensor):
    """moeray.kernels.fp8 on CUDA tensors, else None (the CPU path runs the emulation)."""
    return kernels if t.is_cuda else None


def pad_rows(t: torch.Tensor, multiple: int = FP8_BLOCK) -> torch.Tensor:
    """t with zero rows appended up to a multiple of `multiple` rows (the GPU token padding of
    these GEMMs and of split_linear's higher-precision ones in parallel/weight_grad.py)."""
    pad = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, pad)) if pad else t


def _bf16_rows(t: torch.Tensor) -> torch.Tensor:
    """A CUDA GEMM operand as the kernels take it: bf16, contiguous, rows padded to 128."""
    return pad_rows(t.to(torch.bfloat16).contiguous())


def padded_row_counts(max_rows: int, multiple: int = FP8_BLOCK) -> list[int]:
    """Every padded token count a GEMM of at most `max_rows` rows can run at."""
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows}: must be >= 1")
    return list(range(multiple, -(-max_rows // multiple) * multiple + 1, multiple))


# On CUDA the token dimension of every GEMM is padded with zero rows to a multiple of 128 (as
# DeepGEMM's grouped layout aligns each expert's rows). Zero rows change no product: they add
# zero rows to y and dx, which are cut off, and zero terms to dW. Why: per-expert token counts
# change every step, and each new count could pick a kernel variant (Triton specializes on
# divisibility by 16, the tile config depends on M, and the route between cuBLASLt and Triton on
# M % 4 and M % 128) that is compiled and loaded mid-step. A module load may need the whole GPU
# idle, which never comes while a pre-posted NCCL receive spins on it, so a multi-GPU step hangs
# (benchmarks/notes-train.md). Padded, the counts take at most max_rows / 128 values, and
# `prewarm` loads the kernels of every one of them before the first step.
# The GEMMs return fp32 on CPU and the kernels' bf16 on CUDA: every caller casts the result to the
# dtype it needs (an fp32 copy here was one more pass over each output, undone under autocast).


class QuantizedWeight:
    """A weight's FP8 form for the forward and input-grad GEMMs: on CUDA the e4m3 values, their
    128x128 scales and the transposed values the input-grad GEMM reads, all from one launch
    (`kernels.weight_quant_t`); on CPU the emulation's quantized-dequantized fp32 weight."""

    def __init__(self, w_NK: torch.Tensor) -> None:
        self.kernels = _kernels_for(w_NK)
        if self.kernels is None:
            self.qdq_NK = qdq_128x128(w_NK)
        else:
            # Training runs both GEMMs on every weight, so W^T is made with W: the quantization
            # kernel holds each 128x128 tile already, one more 1-byte store per element, where a
            # separate `.t().contiguous()` re-reads and re-writes every byte in a strided copy.
            self.q_NK, self.scale, self._q_KN = self.kernels.weight_quant_t(w_NK)

    @property
    def q_KN(self) -> torch.Tensor:
        """W^T [K, N] e4m3, contiguous: q_NK.t().contiguous() bit for bit (CUDA only)."""
        return self._q_KN

    def remake(self, w_NK: torch.Tensor) -> None:
        """Quantize w (same shape) into this object's tensors, in place."""
        if self.kernels is None:
            self.qdq_NK.copy_(qdq_128x128(w_NK))
        else:
            out = (self.q_NK[None], self.scale[None], self._q_KN[None])
            self.kernels.weight_quant_t(w_NK[None], out=out)


class WeightCache:
    """Quantized (or cast: `cast`) weights kept until the weight changes. Without it every
    micro-batch quantizes each weight (with W^T, in one launch on CUDA) for the forward and again
    for the input grad of an FP8 expert GEMM; weights change only at the optimizer step. An entry
    is keyed by where the weight lives and checked against its version counter, which every
    in-place update moves (AdamW's included), so a stale entry is never used. One cache per
    module: entries of one weight (or one expert's slice of a stacked weight) replace each other."""

    def __init__(self) -> None:
        # key -> (the weights' versions when made, the made value, the weights themselves)
        self._entries: dict[tuple, tuple[tuple[int, ...], object, tuple[torch.Tensor, ...]]] = {}

    def get(self, w_NK: torch.Tensor) -> QuantizedWeight:
        return self._get(w_NK, QuantizedWeight, "fp8")

    def stacked(self, w_ENK: torch.Tensor | tuple[torch.Tensor, ...]) -> StackedWeight:
        """All experts of a stacked [E, N, K] weight at once (the grouped GEMM's form), or of
        several concatenated along N (a tuple: gate and up as one [E, 2I, K] weight)."""
        return self._get(w_ENK, StackedWeight, "stacked")

    def cast(self, w: torch.Tensor | tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        """w in `dtype`: the BF16 grouped experts' operands (`experts_mlp`), which would otherwise
        be cast from the fp32 master weights in every micro-batch's forward and again in its
        backward (6 bytes of traffic per expert parameter each time). A tuple of [E, N_i, K]
        weights: their concatenation along N, cast straight into one tensor."""
        return self._get(w, lambda d: cast_cat(d, dtype), f"cast-{dtype}")

    def refresh(self) -> int:
        """Re-make every entry whose weight changed since it was made, into the entry's own
        tensors (same storage, same objects). A captured CUDA graph reads those tensors by
        address (`train/graphs.py`): a fresh entry in new storage would leave it reading the
        previous step's weights. Returns the number of entries re-made."""
        made = 0
        for key, (versions, value, ws) in list(self._entries.items()):
            now = tuple(t._version for t in ws)
            if now == versions:
                continue
            w = ws if len(ws) > 1 else ws[0]
            if isinstance(value, torch.Tensor):
                cast_cat(w, value.dtype, out=value)
            elif isinstance(value, QuantizedWeight):
                value.remake(ws[0])
            else:
                assert isinstance(value, StackedWeight)
                value.remake(w)
            self._entries[key] = (now, value, ws)
            made += 1
        return made

    def _get(self, w: torch.Tensor | tuple[torch.Tensor, ...], make, kind: str):
        ws = w if isinstance(w, tuple) else (w,)
        key = (kind, *((t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) for t in ws))
        versions = tuple(t._version for t in ws)
        hit = self._entries.get(key)
        if hit is not None and hit[0] == versions:
            return hit[1]
        detached = tuple(t.detach() for t in ws)
        q = make(detached if isinstance(w, tuple) else detached[0])
        self._entries[key] = (versions, q, detached)
        return q


def weight_caches(model: nn.Module) -> list[WeightCache]:
    """Every WeightCache of `model`'s modules: held by a module itself (SplitLinear,
    FP8TrainLinear) or by an object a module holds (the routed experts' `mlp_fn`)."""
    found: dict[int, WeightCache] = {}
    for module in model.modules():
        for value in vars(module).values():
            cache = value if isinstance(value, WeightCache) else getattr(value, "cache", None)
            if isinstance(cache, WeightCache):
                found.setdefault(id(cache), cache)
    return list(found.values())


def cast_cat(
    w: torch.Tensor | tuple[torch.Tensor, ...],
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """w in dtype; a tuple of [..., N_i, K] weights concatenated along N in dtype (each cast
    once, into its slice: no fp32 concatenation). `out`: the tensor to write into (that shape
    and dtype), returned."""
    if isinstance(w, torch.Tensor):
        return w.to(dtype) if out is None else out.copy_(w)
    *lead, _, k = w[0].shape
    if out is None:
        out = w[0].new_empty((*lead, sum(t.shape[-2] for t in w), k), dtype=dtype)
    start = 0
    for t in w:
        out[..., start : start + t.shape[-2], :].copy_(t)
        start += t.shape[-2]
    return out


class StackedWeight:
    """All experts' weights [E, N, K] in FP8 for the grouped GEMM (`kernels.fp8.fp8_gemm_grouped`):
    q [E, N, K] e4m3 and scales [E, NB, KB], each expert quantized on its own (its 128x128 blocks
    never straddle two experts), and W^T per expert for the input-grad GEMM (`transposed`), all
    from one `kernels.weight_quant_t` launch. Uses the kernels module on any device (its PyTorch
    references off CUDA)."""

    def __init__(self, w_ENK: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        # One launch for all experts, any N (the kernel's third grid axis is the expert): per
        # expert would be E launches and two stacking copies, 1,728 quantizations a step at 9
        # Moonlight MoE layers x 64 experts x 3 projections; W^T as a separate copy would re-read
        # and re-write every e4m3 byte in a strided pass (`float8_copy_kernel`).
        if isinstance(w_ENK, torch.Tensor):
            self.q, self.scale, q_EKN = kernels.weight_quant_t(w_ENK)
        else:
            self.q, self.scale, q_EKN = _quant_t_cat(w_ENK)
        self._t = (q_EKN, self.scale.transpose(1, 2).contiguous())

    @property
    def transposed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W^T [E, K, N] e4m3, its scales [E, KB, NB]), contiguous: the input-grad GEMM's b,
        K-major like every b of the block-scaled GEMMs (FP8 tensor-core MMAs read K-major operands;
        a transposed view would make the kernel transpose every tile)."""
        return self._t

    def remake(self, w_ENK: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        """Quantize w (the same shapes) into this object's tensors, in place."""
        out = (self.q, self.scale, self._t[0])
        if isinstance(w_ENK, torch.Tensor):
            kernels.weight_quant_t(w_ENK, out=out)
        else:
            _quant_t_cat(w_ENK, out=out)
        self._t[1].copy_(self.scale.transpose(1, 2))


def _quant_t_cat(ws: tuple[torch.Tensor, ...], out=None):
    """weight_quant_t of [E, N_i, K] weights concatenated along N, each written by its own launch
    into its slice of the outputs (no fp32 concatenation, no copies of the e4m3 bytes). Equal to
    quantizing the concatenation where every N_i but the last is a multiple of 128 (no 128-row
    block straddles two): refused otherwise. `out`: (q, scales, q_t) to write into."""
    e, _, k = ws[0].shape
    bad = [tuple(w.shape) for w in ws[:-1] if w.shape[1] % FP8_BLOCK]
    if bad or any(w.dim() != 3 or w.shape[0] != e or w.shape[2] != k for w in ws):
        raise ValueError(
            f"weights {[tuple(w.shape) for w in ws]}: expected [E, N_i, K] with one E and K, "
            f"every N_i but the last a multiple of {FP8_BLOCK}"
        )
    n = sum(w.shape[1] for w in ws)
    dev = ws[0].device
    if out is None:
        q = torch.empty((e, n, k), dtype=FP8_DTYPE, device=dev)
        nb, kb = -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)
        s = torch.empty((e, nb, kb), dtype=torch.float32, device=dev)
        q_t = torch.empty((e, k, n), dtype=FP8_DTYPE, device=dev)
    else:  # (q, s, q_t) of those shapes, from an earlier call (StackedWeight.remake)
        q, s, q_t = out
    start = 0
    for w in ws:
        rows, b0 = slice(start, start + w.shape[1]), start // FP8_BLOCK
        blocks = slice(b0, b0 + -(-w.shape[1] // FP8_BLOCK))
        kernels.weight_quant_t(w, out=(q[:, rows], s[:, blocks], q_t[:, :, rows]))
        start = rows.stop
    return q, s, q_t


def forward_gemm(x_MK, w_NK, wq: QuantizedWeight | None = None):
    """y = x W^T in FP8; `wq`: W already quantized (WeightCache), else quantized here."""
    wq = wq or QuantizedWeight(w_NK)
    if wq.kernels is None:
        return qdq_1x128(x_MK) @ wq.qdq_NK.t()
    M = x_MK.shape[0]
    return wq.kernels.fp8_linear_forward(_bf16_rows(x_MK), wq.q_NK, wq.scale)[:M]


def dgrad_gemm(dy_MN, w_NK, wq: QuantizedWeight | None = None):
    """dx = dy W in FP8; `wq` as in forward_gemm."""
    wq = wq or QuantizedWeight(w_NK)
    if wq.kernels is None:
        return qdq_1x128(dy_MN) @ wq.qdq_NK
    M = dy_MN.shape[0]
    return wq.kernels.fp8_linear_dgrad(_bf16_rows(dy_MN), wq.q_NK, wq.scale, w_t_fp8=wq.q_KN)[:M]


def wgrad_gemm(dy_MN, x_MK):
    k = _kernels_for(dy_MN)
    if k is None:
        return qdq_128x1(dy_MN).t() @ qdq_128x1(x_MK)
    return k.fp8_linear_wgrad(_bf16_rows(dy_MN), _bf16_rows(x_MK))


def forward_gemm_pair(x_MK, wa: QuantizedWeight, wb: QuantizedWeight):
    """(x Wa^T, x Wb^T) with x quantized once: a SwiGLU's gate and up projections read the same
    rows."""
    if wa.kernels is None:
        xq = qdq_1x128(x_MK)
        return xq @ wa.qdq_NK.t(), xq @ wb.qdq_NK.t()
    k, M = wa.kernels, x_MK.shape[0]
    xq, xs = k.act_quant(_bf16_rows(x_MK), scale_col_major=True)
    return k.fp8_gemm(xq, xs, wa.q_NK, wa.scale)[:M], k.fp8_gemm(xq, xs, wb.q_NK, wb.scale)[:M]


def wgrad_gemm_pair(dya_MN, dyb_MN, x_MK):
    """(dya^T x, dyb^T x) with x re-tiled 128x1 once (the gate and up weight gradients)."""
    k = _kernels_for(x_MK)
    if k is None:
        xq = qdq_128x1(x_MK)
        return qdq_128x1(dya_MN).t() @ xq, qdq_128x1(dyb_MN).t() @ xq
    xt, xt_s = k.act_quant_t(_bf16_rows(x_MK))
    out = []
    for dy in (dya_MN, dyb_MN):
        dyt, dyt_s = k.act_quant_t(_bf16_rows(dy))
        out.append(k.fp8_gemm(dyt, dyt_s, xt, xt_s))
    return out[0], out[1]


def prewarm(
    weights: set[tuple[int, int, torch.dtype]], row_counts: list[int], device: torch.device
) -> int:
    """Run the three GEMMs of every weight (N, K, dtype) in `weights` at each token count of
    `row_counts` (see `padded_row_counts`), so that each kernel variant a training step can pick is
    compiled and loaded now (the padding note above). Returns the number of GEMMs run; 0 off CUDA.

    For small()'s routed experts with 2,048-token micro-batches and EP = 2: 32 counts x 3 GEMMs
    per shape, ~1 ms each once compiled. The count grows with micro-batch tokens x EP: at V3 scale
    (EP = 64) kernels that do not specialize on the token count would be the way, not this."""
    if device.type != "cuda":
        return 0
    runs = 0
    gen = torch.Generator(device=device).manual_seed(0)
    for n, k, dtype in sorted(weights, key=str):
        w_NK = torch.randn(n, k, device=device, generator=gen).to(dtype)
        for m in row_counts:
            x_MK = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=gen)
            dy_MN = torch.randn(m, n, device=device, dtype=torch.bfloat16, generator=gen)
            forward_gemm(x_MK, w_NK)
            dgrad_gemm(dy_MN, w_NK)
            wgrad_gemm(dy_MN, x_MK)
            runs += 3
    torch.cuda.synchronize(device)
    return runs


class _FP8LinearFn(torch.autograd.Function):
    # Autocast is switched off inside: the GEMM inputs are already FP8 values and the products
    # must accumulate in fp32 (an autocast region would run the emulated matmul in bf16).
    # Under autocast the output takes the autocast dtype, like F.linear would.

    @staticmethod
    def forward(ctx, x_MK: torch.Tensor, w_NK: torch.Tensor, cache: WeightCache | None):
        dev = x_MK.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_MK.dtype
        ctx.save_for_backward(x_MK, w_NK)
        # the forward's quantized weight serves the input-grad GEMM too (W cannot change in
        # between: autograd's saved-tensor version check would refuse the backward)
        ctx.wq = wq = QuantizedWeight(w_NK) if cache is None else cache.get(w_NK)
        with torch.autocast(dev, enabled=False):
            return forward_gemm(x_MK, w_NK, wq).to(out_dtype)

    @staticmethod
    def backward(ctx, dy_MN: torch.Tensor):
        x_MK, w_NK = ctx.saved_tensors
        with torch.autocast(dy_MN.device.type, enabled=False):
            dx = dgrad_gemm(dy_MN, w_NK, ctx.wq).to(x_MK.dtype) if ctx.needs_input_grad[0] else None
            dw = wgrad_gemm(dy_MN, x_MK).to(w_NK.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def fp8_linear(
    x: torch.Tensor,
    weight_NK: torch.Tensor,
    bias: torch.Tensor | None = None,
    cache: WeightCache | None = None,
) -> torch.Tensor:
    """F.linear with the three GEMMs in FP8 (see the module docstring); any leading dims.
    `cache`: a WeightCache keeping the quantized weight (and its transpose) until the weight
    changes; without one the weight is quantized for every call."""
    if weight_NK.dim() != 2 or x.shape[-1] != weight_NK.shape[1]:
        raise ValueError(
            f"fp8_linear: x [..., {x.shape[-1]}] does not match weight "
            f"{tuple(weight_NK.shape)} [N, K]"
        )
    lead = x.shape[:-1]
    y = _FP8LinearFn.apply(x.reshape(-1, x.shape[-1]), weight_NK, cache)
    y = y.reshape(*lead, weight_NK.shape[0])
    return y if bias is None else y + bias


class FP8TrainLinear(nn.Module):
    """An nn.Linear whose GEMMs run in FP8; it shares the original layer's Parameters, so the
    parameter names, the optimizer state and the checkpoints are unchanged. Its WeightCache
    quantizes the weight once per optimizer step: per call it was two quantizations (forward,
    input grad) and one transpose, 587 `_weight_quant_kernel` and 307 e4m3 transpose launches a
    step at 10 Moonlight layers x 4 micro-batches (38 ms of GPU time in the transposes alone,
    results/train-1gpu-nvidia-h200.json)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.cache = WeightCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.cache)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3"


ATTENTION_PROJECTIONS = (
    "q_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
)
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


# What `enable_fp8_training` switches: "all" as DeepSeek-V3 trains (every projection but the
# embedding, the head and the router), "all-but-o-proj" the same less MLA's output projection (whose
# input DeepSeek-V3 keeps out of E4M3, in an E5M6 format), "mlp" every MLP (routed, shared and
# dense; MLA's projections stay BF16), "experts" the routed experts only. At Moonlight's width
# (2048) the attention and shared-expert projections are small GEMMs whose quantization launches
# cost more than FP8 saves (one H200, 10 layers: their FP8 GEMMs ~52 ms and act_quant ~36 ms a step
# against ~40 ms of BF16 GEMMs; benchmarks/notes-train.md), and "all" trained to a 0.73% higher loss
# than BF16 over 80 steps where "experts" stayed within 0.15% (same notes): torchao's recipes too
# leave per-layer choices to the user.
FP8_SCOPES = ("all", "all-but-o-proj", "mlp", "experts")


def enable_fp8_training(model: nn.Module, scope: str = "all") -> list[str]:
    """Switch `model`'s projections in `scope` (FP8_SCOPES) to FP8: "all" the attention
    projections, the dense and shared-expert MLPs and the routed experts; "all-but-o-proj" all
    but MLA's o_proj; "mlp" all but the attention projections; "experts" the routed experts only.

    Returns the qualified names of what now runs in FP8 (for logs and tests). Call before the
    optimizer is built or after: the Parameters are the same objects either way.
    """
    if scope not in FP8_SCOPES:
        raise ValueError(f"fp8 scope {scope!r}: expected one of {', '.join(FP8_SCOPES)}")
    converted: list[str] = []
    children: tuple[str, ...]
    for name, module in list(model.named_modules()):
        if isinstance(module, (MLA, MLP)) and scope == "experts":
            continue
        if isinstance(module, MLA) and scope == "mlp":
            continue
        if isinstance(module, MLA):
            children = ATTENTION_PROJECTIONS
        elif isinstance(module, MLP):
            children = MLP_PROJECTIONS
        elif isinstance(module, Experts):
            module.linear = fp8_linear
            converted.append(name)
            continue
        else:
            continue
        for child in children:
            if child == "o_proj" and scope == "all-but-o-proj":
                continue
            lin = getattr(module, child, None)
            if isinstance(lin, nn.Linear):
                setattr(module, child, FP8TrainLinear(lin))
                converted.append(f"{name}.{child}")
    return converted
