"""head_gemv: one launch for a per-head weight-only GEMM at decode rows, in bf16, fp16 or fp32:

    y [R, H, N] = einsum("rhk,hkn->rhn", x [R, H, K], W [H, K, N])

R rows (the B*S decode tokens, 1-16 at decode), H heads, K the contracted width, N the output
width. W is any strided [H, K, N] view with its N or its K dimension contiguous. MLA's absorbed
decode (model/mla.py) runs two of these per layer on views of kv_b_proj's weight [H*(N+V), C]:
W_UK (q_nope [B,S,H,128] -> q_lat [B,S,H,512]: K = 128 nope dims, N = 512 latent, N contiguous)
and W_UV (o_lat [B,S,H,512] -> o [B,S,H,128]: W_UV is [H, V, C], so the [H, K=C, N=V] view is a
transpose with K contiguous).

Why: as torch.einsum each is a batched cuBLAS GEMM of ~3.3-3.5 us on an H200 at batch 1
(Moonlight-16B-A3B: 16 heads, 27 layers: 54 launches a step, ~0.18 ms) for ~2 MB of weight, whose
floor is ~0.4 us at 4.8 TB/s; and a cuBLAS kernel breaks the chain of PDL Triton kernels around
it. Here each program owns one head and BLOCK_N output columns over the FULL K (K is 128 or 512:
no split-K, no second launch) for all rows of its row tile, so the weight is read once:
- up to BCAST_MAX_ROWS (4) rows, and fp32 at any rows: gemv's broadcast inner product on the CUDA
  cores, acc [BR, BN, BK] += x[:, None, :] * w[None, :, :] in fp32, reduced over K after the loop;
- more rows in bf16/fp16: tl.dot on 16-row tiles (the tensor cores' smallest M; rows past R read
  row R-1 again and are not stored), fp32 accumulation. At 5-16 rows one 16-row tile still reads
  the weight once, where 4-row broadcast tiles would read it 2-4 times.
The output is y in x's dtype, contiguous [R, H, N]; fp32 accumulation throughout.

PDL (sm_90, `common.pdl_launch`), gemv's rule: each program loads its first weight step before it
waits for the previous kernel (`common.pdl_wait`), so that read overlaps the previous kernel's
tail; x and every store come after the wait. The weight must not be written by the kernel
launched just before (model weights are not written during a step); a weight made for the call
(a dtype cast, a first dequantization) is passed with `fresh_w=True` and launches without PDL.

`head_matmul` is the one dispatch (MLA's three per-head einsums): head_gemv for CUDA inference at
up to HEAD_GEMV_MAX_ROWS rows with MOERAY_FUSED_HEAD_GEMV=1, torch.einsum otherwise. Opt-in: in
the engine on an H200 it is +1.5% at Moonlight bf16 batch 1 and 2-4% slower in FP8 and at V3's
widths (benchmarks/results/engine-nvidia-h200-*-ab.json).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import (
    cdiv,
    check_tensor,
    interpreting,
    is_pow2,
    load_k_step,
    num_sms,
    pdl_launch,
    pdl_wait,
    switched_off,
    switched_on,
    use_triton,
)
from moeray.kernels.gemv import (
    ACC_ELEMS,
    BCAST_MAX_ROWS,
    PROGRAMS_PER_SM,
    pow2_at_least,
)

HEAD_GEMV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Rows up to which `head_matmul` takes head_gemv: one 16-row tl.dot tile, so every dispatched
# call reads the weight once (2 MB at Moonlight, 16 MB at V3). At 16 rows x and y are still small
# next to it (Moonlight W_UK: x 64 KB + y 256 KB vs 2 MB of weight); past that cuBLAS's batched
# GEMM tiles start to fill and head_gemv would re-read the weight per row tile.
HEAD_GEMV_MAX_ROWS = 16
# HEAD_TILE (opt-in): 17 to 64 rows in one row tile of up to 64 (a [64, 32] fp32 accumulator is 16
# registers a thread at 4 warps), 32 output columns a program (Moonlight W_UK: 16 heads x 16
# column tiles = 256 programs).
HEAD_TILE_MAX_ROWS = 64
HEAD_TILE_BLOCK_N = 32
DOT_ROWS = 16  # tl.dot's smallest M (and N, K) on the tensor cores
MAX_BLOCK_N = 64
# tl.dot's K step: a [64, 128] bf16 weight tile is 16 KB a stage in shared memory.
DOT_BLOCK_K = 128
# Smallest contiguous run of a weight row a program reads when N is W's contiguous dim: one 32-byte
# DRAM sector (16 bf16), so no sector is split between programs.
MIN_RUN_BYTES = 32
_CONFIG_KEYS = {"BLOCK_R", "BLOCK_N", "BLOCK_K", "DOT", "num_warps", "num_stages"}


def head_gemv_ref(x_RHK: torch.Tensor, w_HKN: torch.Tensor) -> torch.Tensor:
    """einsum("rhk,hkn->rhn") in fp32, returned in x's dtype (the oracle of head_gemv)."""
    return torch.einsum("rhk,hkn->rhn", x_RHK.float(), w_HKN.float()).to(x_RHK.dtype)


@triton.jit
def _head_step(acc, x, w, DOT: tl.constexpr, UPCAST: tl.constexpr):
    """acc += the products of one K step: x [BR, BK], w [BN, BK]."""
    if DOT:
        if UPCAST:  # bf16 x bf16 products are exact in fp32: the same math
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    else:
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    return acc


@triton.jit
def _head_gemv_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    R,
    N,
    K,
    stride_xr,
    stride_xh,
    stride_xk,
    stride_wh,
    stride_wk,
    stride_wn,
    stride_yr,
    stride_yh,
    stride_yn,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,  # tl.dot on the tensor cores (bf16/fp16, BLOCK_R 16); else the broadcast
    UPCAST: tl.constexpr,  # the CPU interpreter multiplies bf16 dots as raw bits: fp32 there
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks in the loop
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,  # launched with PDL (common.pdl_launch): the first weight step is loaded
    # before the wait, so its read overlaps the previous kernel's tail
):
    # Row tiles vary fastest, then output tiles: programs sharing a weight tile run together.
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)  # V3: 128 heads x 640 x 512 weight elements
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows and columns wrap onto valid ones, so loads need no such mask; the store
    # is masked.
    x_ptrs = (
        x_ptr
        + head * stride_xh
        + (offs_r % R).to(tl.int64)[:, None] * stride_xr
        + offs_k[None, :] * stride_xk
    )
    w_ptrs = (
        w_ptr
        + head * stride_wh
        + (offs_n % N).to(tl.int64)[:, None] * stride_wn
        + offs_k[None, :] * stride_wk
    )
    if DOT:
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_start = 0
    if PDL:
        # The first step (never empty: the wrapper returns before launching at K = 0) peeled off
        # the loop: its weights (read by no earlier kernel's writes) before the wait, x after.
        # The same additions in the same order as the loop's, so the same bits.
        w = load_k_step(w_ptrs, 0, stride_wk, offs_k, K, EVEN_K)
        pdl_wait(PDL)
        x = load_k_step(x_ptrs, 0, stride_xk, offs_k, K, EVEN_K)
        acc = _head_step(acc, x, w, DOT, UPCAST)
        k_start = BLOCK_K
    for k0 in tl.range(k_start, K, BLOCK_K, num_stages=NUM_STAGES):
        x = load_k_step(x_ptrs, k0, stride_xk, offs_k, K, EVEN_K)
        w = load_k_step(w_ptrs, k0, stride_wk, offs_k, K, EVEN_K)
        acc = _head_step(acc, x, w, DOT, UPCAST)
    if DOT:
        y = acc
    else:
        y = tl.sum(acc, axis=2)
    y_ptrs = y_ptr + head * stride_yh + offs_r[:, None] * stride_yr + offs_n[None, :] * stride_yn
    mask = (offs_r[:, None] < R) & (offs_n[None, :] < N)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


def head_config(
    r: int, h: int, k: int, n: int, dtype: torch.dtype, n_contiguous: bool, device: torch.device
) -> dict:
    """head_gemv's tiles by shape (not autotuned: one launch per shape, graph-safe).

    DOT for more than BCAST_MAX_ROWS rows of bf16/fp16 (16-row tiles), else broadcast tiles of all
    rows up to 4. BLOCK_N the widest power of two <= 64 that still gives PROGRAMS_PER_SM programs
    per SM (an H200 at R = 1: Moonlight W_UK 16 heads x 512 columns -> BLOCK_N 16 when N is
    contiguous (no narrower than a 32-byte run), 512 programs; W_UV 128 columns -> 2, 1024
    programs; V3's 128 heads -> 64 and 16), never under 16 for DOT. BLOCK_K: DOT_BLOCK_K for DOT,
    else ACC_ELEMS / (BR * BN) (64 accumulator registers a thread at 4 warps); neither past K."""
    dot = r > BCAST_MAX_ROWS and dtype != torch.float32
    block_r = DOT_ROWS if dot else min(BCAST_MAX_ROWS, pow2_at_least(max(r, 1)))
    min_n = DOT_ROWS if dot else 1
    if n_contiguous:  # no narrower than one 32-byte sector of a weight row (or all of N)
        min_n = max(min_n, min(pow2_at_least(n), MIN_RUN_BYTES // dtype.itemsize))
    target = PROGRAMS_PER_SM * num_sms(device)
    block_n = max(min_n, min(MAX_BLOCK_N, pow2_at_least(n)))
    while block_n > min_n and cdiv(r, block_r) * h * cdiv(n, block_n) < target:
        block_n //= 2
    k_pow2 = max(16, pow2_at_least(k))
    if dot:
        block_k = min(DOT_BLOCK_K, k_pow2)
    else:
        block_k = min(ACC_ELEMS // (block_r * block_n), k_pow2)
    return dict(
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_K=block_k, DOT=dot, num_warps=4, num_stages=3
    )


def _check_config(cfg: dict, dtype: torch.dtype) -> None:
    """ValueError naming the bad key or value of a tile config and what is accepted."""
    if cfg.keys() != _CONFIG_KEYS:
        raise ValueError(f"config keys {sorted(cfg)}: need exactly {sorted(_CONFIG_KEYS)}")
    br, bn, bk, warps = cfg["BLOCK_R"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]
    for key, v, low in (("BLOCK_R", br, 1), ("BLOCK_N", bn, 1), ("BLOCK_K", bk, 16)):
        if not is_pow2(v) or v < low or v > 1024:
            raise ValueError(f"{key}={v}: must be a power of two in [{low}, 1024]")
    if not is_pow2(warps) or warps > 16:
        raise ValueError(f"num_warps={warps}: must be a power of two <= 16")
    if cfg["num_stages"] < 1:
        raise ValueError(f"num_stages={cfg['num_stages']}: must be >= 1")
    if cfg["DOT"]:
        if dtype == torch.float32:
            raise ValueError("DOT=True takes bf16/fp16 inputs (fp32 dots would round to TF32)")
        if min(br, bn) < 16:
            raise ValueError(f"DOT=True: BLOCK_R={br} and BLOCK_N={bn} must be >= 16 (tl.dot)")
        return
    # 128 fp32 accumulator registers a thread at most (the heuristic keeps 64 at 4 warps).
    limit = 128 * 32 * warps
    if br * bn * bk > limit:
        raise ValueError(
            f"BLOCK_R * BLOCK_N * BLOCK_K = {br}*{bn}*{bk} = {br * bn * bk}: the fp32 accumulator "
            f"must be <= 128 registers a thread, {limit} elements at num_warps={warps}"
        )


def _check_inputs(x_RHK: torch.Tensor, w_HKN: torch.Tensor) -> None:
    check_tensor(x_RHK, "x_RHK", dtypes=HEAD_GEMV_DTYPES, ndim=3)
    check_tensor(w_HKN, "w_HKN", dtypes=(x_RHK.dtype,), ndim=3, device=x_RHK.device)
    _, h, k = x_RHK.shape
    if tuple(w_HKN.shape[:2]) != (h, k):
        raise ValueError(
            f"x_RHK {tuple(x_RHK.shape)} has H={h}, K={k} but w_HKN {tuple(w_HKN.shape)} has "
            f"H={w_HKN.shape[0]}, K={w_HKN.shape[1]}: they must match"
        )


def head_gemv(
    x_RHK: torch.Tensor,
    w_HKN: torch.Tensor,
    *,
    config: dict | None = None,
    fresh_w: bool = False,
) -> torch.Tensor:
    """y [R, H, N] = einsum("rhk,hkn->rhn", x_RHK, w_HKN) in x's dtype, fp32 accumulation, one
    launch.

    x_RHK: bf16, fp16 or fp32 (any strides); w_HKN: x's dtype, any strides (made for N or K
    contiguous). Any R, H, K, N (a ragged last K step is masked). Made for few rows (decode);
    correct at any R. `config` (keys of `_CONFIG_KEYS`) overrides the heuristic tiles
    (`head_config`). `fresh_w`: w was just written by a kernel of this stream (a cast or a
    dequantized copy made for this call), so the launch is without PDL (no weight read before
    that kernel completes). On CPU tensors outside the interpreter it runs head_gemv_ref."""
    _check_inputs(x_RHK, w_HKN)
    if not (x_RHK.is_cuda or interpreting()):
        return head_gemv_ref(x_RHK, w_HKN)
    r, h, k = x_RHK.shape
    n = w_HKN.shape[2]
    y = torch.empty((r, h, n), dtype=x_RHK.dtype, device=x_RHK.device)
    if y.numel() == 0:
        return y
    if k == 0:
        return y.zero_()
    n_contiguous = w_HKN.stride(2) == 1 and n > 1
    cfg = (
        config
        if config is not None
        else head_config(r, h, k, n, x_RHK.dtype, n_contiguous, x_RHK.device)
    )
    _check_config(cfg, x_RHK.dtype)
    grid = (cdiv(r, cfg["BLOCK_R"]), cdiv(n, cfg["BLOCK_N"]), h)
    pdl = pdl_launch(x_RHK.device) and not fresh_w
    _head_gemv_kernel[grid](
        x_RHK,
        w_HKN,
        y,
        r,
        n,
        k,
        *x_RHK.stride(),
        *w_HKN.stride(),
        *y.stride(),
        BLOCK_R=cfg["BLOCK_R"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        DOT=cfg["DOT"],
        UPCAST=interpreting(),
        EVEN_K=k % cfg["BLOCK_K"] == 0,
        NUM_STAGES=cfg["num_stages"],
        PDL=pdl,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        launch_pdl=pdl,
    )
    return y


def head_gemv_fits(x: torch.Tensor, w_HKN: torch.Tensor) -> bool:
    """Whether head_gemv takes these tensors as the model's dispatch: MOERAY_FUSED_HEAD_GEMV=1,
    no gradient wanted, x [..., H, K] and w [H, K, N] in one of bf16/fp16/fp32, 1 to
    HEAD_GEMV_MAX_ROWS rows (the product of x's leading dims), Triton able to run on them (CUDA,
    or CPU under the interpreter). `head_gemv_applies` adds the CUDA check."""
    if not switched_on("HEAD_GEMV"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w_HKN.requires_grad):
        return False  # training keeps the einsum and its autograd
    if x.dim() < 3 or w_HKN.dim() != 3 or tuple(x.shape[-2:]) != tuple(w_HKN.shape[:2]):
        return False
    if x.dtype not in HEAD_GEMV_DTYPES or w_HKN.dtype != x.dtype or x.device != w_HKN.device:
        return False
    hk = x.shape[-2] * x.shape[-1]
    return hk > 0 and 0 < x.numel() // hk <= HEAD_GEMV_MAX_ROWS and use_triton(x, w_HKN)


def head_gemv_applies(x: torch.Tensor, w_HKN: torch.Tensor) -> bool:
    """Whether `head_matmul` takes head_gemv: CUDA tensors that `head_gemv_fits`. Opt-in (mixed
    on an H200, module docstring): MOERAY_FUSED_HEAD_GEMV=1 turns it on (the engine bench records
    it)."""
    # the device first: on CPU (training, tests) this runs at every MLA layer
    return x.is_cuda and w_HKN.is_cuda and head_gemv_fits(x, w_HKN)


def head_tile_config(r: int, h: int, k: int, n: int) -> dict:
    """head_gemv's tiles for HEAD_TILE: one row tile holding all r rows (16 to HEAD_TILE_MAX_ROWS),
    so each weight tile is read once (the 16-row tiles of `head_config` read it once per tile),
    HEAD_TILE_BLOCK_N columns, tl.dot over DOT_BLOCK_K."""
    return dict(
        BLOCK_R=max(DOT_ROWS, pow2_at_least(r)),
        BLOCK_N=HEAD_TILE_BLOCK_N,
        BLOCK_K=min(DOT_BLOCK_K, max(16, pow2_at_least(k))),
        DOT=True,
        num_warps=4,
        num_stages=3,
    )


def head_tile_applies(x: torch.Tensor, w_HKN: torch.Tensor, rows: int) -> bool:
    """Whether `head_matmul` takes head_gemv with one row tile (MOERAY_FUSED_HEAD_TILE=1,
    opt-in): CUDA bf16/fp16 tensors of one dtype, HEAD_GEMV_MAX_ROWS < rows <=
    HEAD_TILE_MAX_ROWS, no gradient. Made for MLA's per-head products at decode batches of 17-64,
    where the batched cuBLAS GEMM took ~6.5 us a call for ~2 MB of weight at Moonlight batch 64
    on an H100 (benchmarks/results/engine-nvidia-h100-80gb-hbm3-moonlight-fp8-hbmm.json); not yet
    timed in the engine."""
    return (
        x.is_cuda
        and HEAD_GEMV_MAX_ROWS < rows <= HEAD_TILE_MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and w_HKN.dtype == x.dtype
        and not torch.is_grad_enabled()
        and switched_on("HEAD_TILE")
    )


def head_matmul(x: torch.Tensor, w_HKN: torch.Tensor, *, fresh_w: bool = False) -> torch.Tensor:
    """einsum("...hk,hkn->...hn", x, w_HKN): x [..., H, K], w [H, K, N] -> [..., H, N], computed
    by head_gemv where `head_gemv_applies` (decode rows on CUDA without gradients, opt-in with
    MOERAY_FUSED_HEAD_GEMV=1): the same values up to fp32 summation order; else, outside autograd
    at 2 or more rows, one torch.bmm into a contiguous [..., H, N] (MOERAY_FUSED_HEAD_BMM=0 keeps
    the einsum there); else the einsum. `fresh_w` as in head_gemv."""
    h, k = x.shape[-2:]
    n = w_HKN.shape[2]
    if head_gemv_applies(x, w_HKN):
        y = head_gemv(x.reshape(-1, h, k), w_HKN, fresh_w=fresh_w)
        return y.reshape(*x.shape[:-1], n)
    rows = x.numel() // (h * k)
    if head_tile_applies(x, w_HKN, rows):
        y = head_gemv(x.reshape(-1, h, k), w_HKN, config=head_tile_config(rows, h, k, n),
                      fresh_w=fresh_w)  # fmt: skip
        return y.reshape(*x.shape[:-1], n)
    if rows < 2 or x.dtype != w_HKN.dtype or torch.is_grad_enabled() or switched_off("HEAD_BMM"):
        return torch.einsum("...hk,hkn->...hn", x, w_HKN)
    # One batched GEMM over the heads writing y in [..., H, N] order through a transposed view:
    # einsum's bmm writes [H, rows, N] and hands back a permuted view, which the next reshape
    # (MLA's o_proj input) copies, one launch a layer (~2.5 us at Moonlight batch 64 on an H100).
    # `bench engine --ab HEAD_BMM` there (H100): decode graph 1.0-1.1% faster at batch 16 / 64
    # (Moonlight FP8 and bf16), even at V3 widths; at one row einsum's output is already in order
    # (benchmarks/results/engine-nvidia-h100-80gb-hbm3-{moonlight-fp8,moonlight-bf16,v3-fp8}-
    # hbmm.json).
    y_MHN = x.new_empty(rows, h, n)
    torch.bmm(x.reshape(-1, h, k).transpose(0, 1), w_HKN, out=y_MHN.transpose(0, 1))
    return y_MHN.reshape(*x.shape[:-1], n)
