"""Benchmark of mla_decode_block (a decode layer's MLA attention in one persistent launch,
moeray/kernels/mla_block.py) against the chain of launches the engine runs for the same math at
batch 1-4 (`mla_chain`: the merged q + kv_a GEMV, W_UK, mla_write_pack, the MLA split and merge
kernels, W_UV, o_proj), at Moonlight-16B-A3B's attention (hidden 2048, 16 heads of 128 + 64, kv
rank 512, values 128), 1 and 4 tokens, 160 and 1,024 cached tokens a sequence, bf16 weights and
FP8 ones (e4m3 q + kv_a and o_proj, whose chain runs fp8_gemv as FP8Linear does); and
DeepSeek-V3's (hidden 7168, 128 heads, the q LoRA of rank 1536) at one token, 1,024 cached.

Both run from CUDA graphs of back-to-back calls cycling over enough weight copies that every call
reads its weights from HBM (bench/common.py). The floor is the bytes a call must read (weights and
the cached latents) at the H200's 4.8 TB/s. Each row also carries the block's largest difference
from the chain's output (relative to the output's largest value) and the waits it gave up (0)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moeray.kernels import mla_block
from moeray.kernels.bench.common import _copies, _cycling, _graph_ms, _rec
from moeray.kernels.fp8 import fp8_gemv, fp8_gemv_workspace
from moeray.kernels.fp8.quant import weight_quant_ref
from moeray.kernels.gemv import linear
from moeray.kernels.head_gemv import head_matmul
from moeray.kernels.mla_block import (
    COUNTERS,
    GIVEN_UP,
    MAX_TOKENS,
    MLAWeights,
    mla_decode_block,
)
from moeray.kernels.mla_decode import mla_decode_multi
from moeray.kernels.mla_write import mla_write_pack
from moeray.kernels.norm import rms_norm

HBM_TBPS = 4.8  # H200 datasheet
PAGE = 64
MOONLIGHT = dict(D=2048, H=16, N=128, R=64, V=128, C=512)
# DeepSeek-V3's attention: hidden 7168, 128 heads, a q LoRA of rank 1536 (V3_Q_LORA)
V3 = dict(D=7168, H=128, N=128, R=64, V=128, C=512)
V3_Q_LORA = 1536


def mla_chain(
    x_TD, w: MLAWeights, cos_TR2, sin_TR2, cache_PNK, slots_T, block_table, seq_lens,
    softmax_scale, workspaces=None,
):  # fmt: skip
    """The engine's launches for mla_decode_block's math (model/mla.py's absorbed path through
    engine/paged_view.py), on the same arguments: out [T, D]. e4m3 projections run fp8_gemv as
    FP8Linear does at decode rows (`workspaces`: its split-K counters for w_qkv, w_o and w_qb)."""
    w_qkv, kv_norm, w_kvb_HKC, w_o, nope_dim, w_qkv_scale, w_o_scale, q_norm, w_qb, w_qb_scale = w
    T = x_TD.shape[0]
    H, C = w_kvb_HKC.shape[0], w_kvb_HKC.shape[2]
    R = cache_PNK.shape[-1] - C
    Q = w_qkv.shape[0] - C - R  # the kv rows' start: q_proj's rows, or q_a_proj's with a LoRA
    ws = workspaces or (None, None, None)

    def proj(x, wt, sc, workspace):
        return linear(x, wt) if sc is None else fp8_gemv(x, wt, sc, workspace=workspace)

    qkv = proj(x_TD, w_qkv, w_qkv_scale, ws[0])
    q = qkv[:, :Q]
    if w_qb is not None and q_norm is not None:  # q_a_layernorm, then q_b_proj
        q = proj(rms_norm(q.contiguous(), q_norm[0], q_norm[1])[0], w_qb, w_qb_scale, ws[2])
    q_THK = q.view(T, 1, H, -1)
    q_nope, q_pe = q_THK[..., :nope_dim], q_THK[..., nope_dim:]
    q_lat = head_matmul(q_nope, w_kvb_HKC[:, :nope_dim])
    kv, pe = qkv[:, None, Q : Q + C], qkv[:, None, Q + C :]
    rope = (cos_TR2[:, None], sin_TR2[:, None])
    q = mla_write_pack(cache_PNK, slots_T, kv, pe, q_lat, q_pe, norm=kv_norm, rope=rope)
    o_lat = mla_decode_multi(q, cache_PNK, block_table, seq_lens, softmax_scale, C).to(x_TD.dtype)
    v = head_matmul(o_lat, w_kvb_HKC[:, nope_dim:].transpose(1, 2))
    return proj(v.reshape(T, -1), w_o, w_o_scale, ws[1])


def block_case(
    T: int,
    ctx: int | Sequence[int],
    dims: dict = MOONLIGHT,
    device="cuda",
    seed: int = 0,
    page: int = PAGE,
    fp8: bool = False,
    q_lora: int = 0,
) -> dict:
    """Random bf16 weights at `dims` (with `fp8` q + kv_a and o_proj as e4m3 with 128x128 block
    scales, the official checkpoint's format), T sequences of `ctx` cached tokens each (one length
    for all, or one a sequence; the new token included) on shuffled pages of a paged cache:
    mla_decode_block's keyword arguments but `counters` (the weights as `w`, MLAWeights).
    `q_lora` > 0: DeepSeek-V3's query LoRA of that rank (w_qkv holds q_a_proj's rows; q_norm and
    w_qb)."""
    g = torch.Generator(device=device).manual_seed(seed)
    D, H, N, R, V, C = (dims[k] for k in ("D", "H", "N", "R", "V", "C"))
    dt = torch.bfloat16

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    lens = torch.tensor([ctx] * T if isinstance(ctx, int) else list(ctx), device=device)
    per_seq = -(-int(lens.max()) // page)
    pages = torch.randperm(T * per_seq, generator=g, device=device).view(T, per_seq)
    last = (lens - 1)[:, None]
    slots = pages.gather(1, last // page)[:, 0] * page + (lens - 1) % page
    angles = torch.rand(T, R // 2, generator=g, device=device) * 6.0
    w = MLAWeights(
        w_qkv=rnd((q_lora or H * (N + R)) + C + R, D, scale=D**-0.5),
        kv_norm=(rnd(C) + 1.0, 1e-6),
        w_kvb_HKC=rnd(H, N + V, C, scale=N**-0.5),
        w_o=rnd(D, H * V, scale=(H * V) ** -0.5),
        nope_dim=N,
    )
    if q_lora:
        w = w._replace(
            q_norm=(rnd(q_lora) + 1.0, 1e-6), w_qb=rnd(H * (N + R), q_lora, scale=q_lora**-0.5)
        )
    if fp8:
        (qkv, s_qkv), (o, s_o) = weight_quant_ref(w.w_qkv), weight_quant_ref(w.w_o)
        w = w._replace(w_qkv=qkv, w_qkv_scale=s_qkv, w_o=o, w_o_scale=s_o)
        if w.w_qb is not None:
            qb, s_qb = weight_quant_ref(w.w_qb)
            w = w._replace(w_qb=qb, w_qb_scale=s_qb)
    return dict(
        x_TD=rnd(T, D),
        w=w,
        cos_TR2=angles.cos(),
        sin_TR2=angles.sin(),
        cache_PNK=rnd(T * per_seq, page, C + R),
        slots_T=slots,
        block_table=pages.to(torch.int32),
        seq_lens=lens.to(torch.int32),
        softmax_scale=(N + R) ** -0.5,
    )


# (model, tokens, cached tokens a sequence, FP8 projections)
CASES = (
    *(("moonlight", T, ctx, False) for T in (1, 4) for ctx in (160, 1024)),
    *(("moonlight", T, ctx, True) for T, ctx in ((1, 160), (1, 1024), (4, 1024))),
    ("v3", 1, 1024, False),
    ("v3", 1, 1024, True),
)
DEVICE = "cuda"  # the CPU test runs the section under Triton's interpreter
DIMS = {"moonlight": (MOONLIGHT, 0), "v3": (V3, V3_Q_LORA)}  # (dims, q LoRA rank)


def bench_mla_block(ceil: dict) -> list[dict]:
    rows = []
    for model, T, ctx, fp8 in CASES:
        try:
            rows.append(_block_row(ceil, model, T, ctx, fp8))
        except Exception as e:  # one case that fails is a row, not the section's end
            err = f"{type(e).__name__}: {e}"[:500]
            rows.append({"shape": f"{model} T={T} ctx={ctx} fp8={fp8}", "error": err})
        print_mla_block(rows[-1:])
    return rows


def _block_row(ceil: dict, model: str, T: int, ctx: int, fp8: bool) -> dict:
    dims, q_lora = DIMS[model]
    kw = block_case(T, ctx, dims, device=DEVICE, fp8=fp8, q_lora=q_lora)
    counters = torch.zeros(COUNTERS, dtype=torch.int32, device=DEVICE)
    w = kw["w"]
    wbytes = sum(t.numel() * t.element_size() for t in w if isinstance(t, torch.Tensor))
    copies = [(w,)] + [(_cloned(w),) for _ in range(_copies(wbytes) - 1)]  # _cycling's args
    workspaces = tuple(
        fp8_gemv_workspace(t.shape[0], MAX_TOKENS, DEVICE) if fp8 and t is not None else None
        for t in (w.w_qkv, w.w_o, w.w_qb)
    )

    def block(wc):
        return mla_decode_block(**{**kw, "w": wc}, counters=counters)

    def chain(wc):
        return mla_chain(**{**kw, "w": wc}, workspaces=workspaces)

    want, got = chain(w).float(), block(w).float()
    err = float((got - want).abs().max() / want.abs().max())
    t_chain = _graph_ms(_cycling(chain, copies))
    coop_error = None
    try:
        t_block = _graph_ms(_cycling(block, copies))
    except Exception as e:  # a graph that refuses the cooperative node: time the plain launch
        coop_error = f"{type(e).__name__}: {e}"[:300]
        mla_block.COOPERATIVE = False
        try:
            t_block = _graph_ms(_cycling(block, copies))
        finally:
            mla_block.COOPERATIVE = True
    nbytes = wbytes + T * ctx * kw["cache_PNK"].shape[-1] * 2
    floor_us = nbytes / (HBM_TBPS * 1e12) * 1e6
    return {
        "kernel": "mla_decode_block",
        "shape": f"{model} {'fp8' if fp8 else 'bf16'} T={T} ctx={ctx}",
        "weights": "fp8" if fp8 else "bf16",
        "T": T,
        "ctx": ctx,
        "chain_us": round(t_chain * 1e3, 2),
        "block_us": round(t_block * 1e3, 2),
        "speedup": round(t_chain / t_block, 3),
        "floor_us": round(floor_us, 2),
        "block_frac_hbm": round(floor_us / (t_block * 1e3), 3),
        "chain_frac_hbm": round(floor_us / (t_chain * 1e3), 3),
        "block_frac_copy": round(nbytes / (t_block * 1e-3) / 1e12 / ceil["copy_TBps"], 3),
        "max_rel_err_vs_chain": err,
        "waits_given_up": int(counters[GIVEN_UP]),
        "cooperative": coop_error is None,
        "cooperative_error": coop_error,
    }


def _cloned(w: MLAWeights) -> MLAWeights:
    """A copy of the big weights (the norms' stay shared: a few KB)."""
    return MLAWeights._make(v.clone() if isinstance(v, torch.Tensor) else v for v in w)


def print_mla_block(rows: list[dict]) -> None:
    for r in rows:
        if "error" in r:
            print(f"mla_decode_block {r['shape']} failed: {r['error']}")
            continue
        print(
            f"mla_decode_block {r['shape']:28s} chain {r['chain_us']:7.2f} us  block "
            f"{r['block_us']:7.2f} us  x{r['speedup']:.2f}  floor {r['floor_us']:.2f} us "
            f"({r['block_frac_hbm']:.0%} vs {r['chain_frac_hbm']:.0%})  err "
            f"{r['max_rel_err_vs_chain']:.1e}  given up {r['waits_given_up']}"
        )


def mla_block_records(rows: list[dict]) -> list[dict]:
    """The flat `results` records (runner.flat_results): against the copy bandwidth and the
    engine's chain of launches, both from CUDA graphs (failed cases left out)."""
    return [
        _rec(
            "mla_decode_block (CUDA graph)",
            r["shape"],
            r["block_us"] / 1e3,
            r["block_frac_copy"],
            "copy bandwidth",
            "the engine's launches (CUDA graph)",
            r["speedup"],
        )
        for r in rows
        if "error" not in r
    ]
