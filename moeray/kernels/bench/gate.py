"""`moeray bench kernels --only router`: the MoE gate kernel (`kernels/gate.py`) against its
PyTorch reference, eager and replayed in a CUDA graph. The section keeps the key "router" so that
results stay comparable with the runs recorded before the kernel was renamed."""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton

from moeray.kernels.gate import moe_gate, moe_gate_ref

# The gate shapes: small(), DeepSeek-V3's and Moonlight-16B-A3B's expert counts.
BENCH_SHAPES = (  # (name, E, n_group, topk_group, top_k, routed_scaling_factor)
    ("small", 64, 8, 4, 8, 2.5),
    ("v3", 256, 8, 4, 8, 2.5),
    ("moonlight", 64, 1, 1, 6, 2.446),
)
# Rows per program tried at decode batches (`gate.gate_block_t` chose its default from these): the
# graph time of each; 8 rows is one program by default, the case not yet decided by numbers.
SWEEP_TOKENS = (8, 16, 64, 256)
SWEEP_BLOCK_T = (1, 2, 4, 8, 16, 32)


def bench_moe_gate(tokens: tuple[int, ...] = (1, 8, 16, 32, 64, 256, 4096)) -> list[dict]:
    """Per shape and token count: `moe_gate_ref` vs `moe_gate`, eager and replayed in a CUDA graph
    (the engine's decode path), plus whether ids, counts and scores agree exactly."""

    def timed(fn) -> float:
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def graphed(fn, calls: int = 20) -> float:
        """ms per call inside a CUDA graph of `calls` back-to-back calls, as a decode step runs
        one gate per MoE layer: the replay's own launch cost (~10 us) is spread over 20 gates."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        return timed(graph.replay) / calls

    rows = []
    for name, e, ng, tg, k, rsf in BENCH_SHAPES:
        bias = torch.randn(e, device="cuda") * 0.1
        for t in tokens:
            logits = torch.randn(t, e, device="cuda")
            kw: dict[str, Any] = dict(top_k=k, n_group=ng, topk_group=tg, routed_scaling_factor=rsf)
            ref_fn = functools.partial(moe_gate_ref, logits, bias, **kw)
            fused_fn = functools.partial(moe_gate, logits, bias, **kw)
            with torch.no_grad():
                ref = ref_fn()
                out = fused_fn()
                torch_ms = timed(ref_fn)
                fused_ms = timed(fused_fn)
                torch_graph_ms = graphed(ref_fn)
                fused_graph_ms = graphed(fused_fn)
                sweep = {
                    str(bt): round(graphed(functools.partial(fused_fn, block_t=bt)) * 1e3, 2)
                    for bt in (SWEEP_BLOCK_T if t in SWEEP_TOKENS else ())
                    if bt <= t
                }
            rows.append(
                {
                    "shape": name,
                    "E": e,
                    "n_group": ng,
                    "topk_group": tg,
                    "top_k": k,
                    "tokens": t,
                    "torch_ms": round(torch_ms, 4),
                    "fused_ms": round(fused_ms, 4),
                    "torch_graph_us": round(torch_graph_ms * 1e3, 2),
                    "fused_graph_us": round(fused_graph_ms * 1e3, 2),
                    "graph_speedup": round(torch_graph_ms / fused_graph_ms, 2),
                    "fused_graph_us_by_block_t": sweep,
                    "ids_equal": bool(torch.equal(ref.expert_ids_TK, out.expert_ids_TK)),
                    "counts_equal": bool(torch.equal(ref.counts_E, out.counts_E)),
                    "scores_bit_equal": bool(torch.equal(ref.scores_TE, out.scores_TE)),
                    "weights_max_abs_diff": float((ref.weights_TK - out.weights_TK).abs().max())
                    if t
                    else 0.0,
                }
            )
    return rows
