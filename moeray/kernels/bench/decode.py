"""`moeray bench kernels --only decode_glue`: the kernels that replace a decode step's small
PyTorch ops (issue 19: alignment, RoPE, the step's positions and slots, the paged-cache prologue,
SwiGLU, router logits, the post-attention add + norm + router logits in one launch; the EP
layer's load count; greedy's argmax over DeepSeek-V3's and Moonlight's vocabularies, against the
engine's default fp32 copy + torch.argmax) against their PyTorch references at Moonlight-16B-
A3B's widths (the alignment also at DeepSeek-V3's 256 experts), each replayed in a CUDA graph as
a decode step runs them, with whether the outputs agree bit for bit. `norm_router_vs_pair` times
the folded kernel against the two kernels it replaces (rms_norm, then router_logits)."""

from __future__ import annotations

import functools

import torch

from moeray.kernels.argmax import argmax_rows
from moeray.kernels.bench.common import _graph_ms
from moeray.kernels.common import ROUTE_BATCH_MAX_TOKENS
from moeray.kernels.expert_load import count_expert_load, count_expert_load_ref
from moeray.kernels.mla_write import mla_write_pack, mla_write_pack_ref
from moeray.kernels.moe_align import moe_align, moe_align_ref
from moeray.kernels.norm import rms_norm
from moeray.kernels.norm_router import MAX_TOKENS as NORM_ROUTER_MAX_TOKENS
from moeray.kernels.norm_router import norm_router_logits, norm_router_logits_ref
from moeray.kernels.paged_positions import paged_positions, paged_positions_ref
from moeray.kernels.rope import rope, rope_ref
from moeray.kernels.router_logits import router_logits, router_logits_ref
from moeray.kernels.swiglu import swiglu, swiglu_ref

# Moonlight-16B-A3B: width 2048, 16 heads, latent 512 + rope 64, 64 experts top-6, shared width
# 2 x 1408.
D, HEADS, C, R, EXPERTS, TOP_K, SHARED = 2048, 16, 512, 64, 64, 6, 2816
# DeepSeek-V3's routing for moe_align_v3 and router_logits_v3: 256 experts top-8, width 7168
V3_EXPERTS, V3_TOP_K, V3_D = 256, 8, 7168
# Vocabularies: DeepSeek-V3's and Moonlight's (Kimi-K2's too)
V3_VOCAB, MOONLIGHT_VOCAB = 129_280, 163_840


def _bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def _cases(t: int):
    """(name, PyTorch fn, kernel fn, whether the outputs must be bit-equal) at t tokens."""
    ids = torch.rand(t, EXPERTS, device="cuda").topk(TOP_K, dim=1).indices
    ids_v3 = torch.rand(t, V3_EXPERTS, device="cuda").topk(V3_TOP_K, dim=1).indices
    q = _bf16(t, 1, HEADS, 128 + R)[..., 128:]
    ang = torch.rand(t, 1, R // 2, device="cuda") * 1000
    cache = _bf16(t // 64 + 2, 64, C + R)
    slots = torch.randperm(cache.shape[0] * 64, device="cuda")[:t]
    kv = _bf16(t, 1, C + R)
    q_lat = _bf16(HEADS, t, 1, C).permute(1, 2, 0, 3)
    prologue = (slots, kv[..., :C], kv[..., C:], q_lat, q)
    norm, rot = (_bf16(C) * 0.1 + 1, 1e-6), (ang.cos(), ang.sin())
    gate, up = _bf16(t, SHARED), _bf16(t, SHARED)
    x, w_gate = _bf16(t, D), _bf16(EXPERTS, D)
    x_v3, w_gate_v3 = _bf16(t, V3_D), _bf16(V3_EXPERTS, V3_D)
    p = functools.partial
    valid_1 = torch.tensor([max(1, t - 1)], device="cuda")  # one padding row
    load_E, rows_1 = torch.zeros(EXPERTS, dtype=torch.int64, device="cuda"), valid_1.new_zeros(())

    attn, post_norm = _bf16(t, D), (_bf16(D) * 0.1 + 1, 1e-6)

    def norm_then_router():  # the unfolded pair, as the engine ran it before the fold
        y, h = rms_norm(attn, post_norm[0], post_norm[1], x)
        return router_logits(y, w_gate), y, h

    logits_v3, logits_ml = _bf16(t, V3_VOCAB), _bf16(t, MOONLIGHT_VOCAB)
    table = torch.randperm(t * 40, device="cuda", dtype=torch.int32).view(t, 40)  # 64-token pages
    starts = torch.randint(0, 40 * 64 - 1, (t,), device="cuda")
    counters = torch.zeros(t, dtype=torch.int32, device="cuda")

    def counted(fn):  # counts from zero each call: in-place accumulation, compared as outputs
        def run():
            fn(ids, valid_1, load_E.zero_(), rows_1.zero_())
            return load_E.clone(), rows_1.clone()

        return run

    return [
        ("moe_align", p(moe_align_ref, ids, EXPERTS, 16), p(moe_align, ids, EXPERTS, 16), True),
        (
            "moe_align_v3",
            p(moe_align_ref, ids_v3, V3_EXPERTS, 16),
            p(moe_align, ids_v3, V3_EXPERTS, 16),
            True,
        ),
        ("rope", p(rope_ref, q, *rot), p(rope, q, *rot), True),
        (
            "paged_positions",
            p(paged_positions_ref, table, starts, 1, 64),
            p(paged_positions, table, starts, 1, 64),
            True,
        ),
        (
            "mla_prologue",  # the norm's fp32 sum runs in another order: not bit-compared
            p(mla_write_pack_ref, cache, *prologue, norm=norm, rope=rot),
            p(mla_write_pack, cache, *prologue, norm=norm, rope=rot),
            False,
        ),
        ("swiglu", p(swiglu_ref, gate, up), p(swiglu, gate, up), True),
        # the fp32 sum runs in another order: not bit-compared
        ("router_logits", p(router_logits_ref, x, w_gate), p(router_logits, x, w_gate), False),
        (
            "router_logits_v3",
            p(router_logits_ref, x_v3, w_gate_v3),
            p(router_logits, x_v3, w_gate_v3),
            False,
        ),
        (  # the norm's fp32 sum of squares in another order: not bit-compared
            "norm_router",
            p(norm_router_logits_ref, attn, *post_norm, w_gate, x),
            p(norm_router_logits, attn, *post_norm, w_gate, x),
            False,
        ),
        (
            "norm_router_vs_pair",
            norm_then_router,
            p(norm_router_logits, attn, *post_norm, w_gate, x),
            False,
        ),
        ("count_expert_load", counted(count_expert_load_ref), counted(count_expert_load), True),
        (
            "argmax_v3",
            lambda: logits_v3.float().argmax(-1),
            p(argmax_rows, logits_v3, counters),
            True,
        ),
        (
            "argmax_moonlight",
            lambda: logits_ml.float().argmax(-1),
            p(argmax_rows, logits_ml, counters),
            True,
        ),
    ]


def bench_decode_glue(tokens: tuple[int, ...] = (1, 8, 32, 64, 170)) -> list[dict]:
    rows = []
    for t in tokens:
        for name, ref_fn, fused_fn, exact in _cases(t):
            # past the decode batches (prefill) the model keeps cuBLAS's GEMM
            if name.startswith("router_logits") and t > ROUTE_BATCH_MAX_TOKENS:
                continue
            if name.startswith("norm_router") and t > NORM_ROUTER_MAX_TOKENS:
                continue  # the model runs the two kernels there
            with torch.inference_mode():
                ref, out = ref_fn(), fused_fn()
                torch_ms, fused_ms = _graph_ms(ref_fn), _graph_ms(fused_fn)
            pairs = zip(ref, out, strict=True) if isinstance(ref, tuple) else [(ref, out)]
            rows.append(
                {
                    "kernel": name,
                    "tokens": t,
                    "torch_graph_us": round(torch_ms * 1e3, 2),
                    "fused_graph_us": round(fused_ms * 1e3, 2),
                    "graph_speedup": round(torch_ms / fused_ms, 2),
                    "bit_equal": all(torch.equal(a, b) for a, b in pairs) if exact else None,
                }
            )
    return rows
