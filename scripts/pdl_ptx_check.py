"""Check, without a GPU, that every kernel launched with programmatic dependent launch (PDL,
`moeray.kernels.common.pdl_launch`) follows the rule written there, in the PTX Triton emits for
sm_90: with PDL=True the program's first global store or atomic comes after griddepcontrol.wait,
and so does its first global load, except in the kernels that prefetch their weights before the
wait (gemv, fp8_gemv, head_gemv, the router logits and the norm + router, moe_gemv's early
variants, the MLA merge with W_UV, the MLA write with W_UK, MLA decode's early first page: there
at least one load must come first, or the prefetch was lost); with PDL=False no griddepcontrol
at all (the plain kernel that the interpreter and older GPUs run).

Triton compiles to PTX on any machine (its wheel ships ptxas); each kernel is compiled at a
decode-like specialization. The PTX depends on the Triton version: the device runs 3.6
(`pip install --target /tmp/t36 triton==3.6.0`, then PYTHONPATH=/tmp/t36 in front).

    python scripts/pdl_ptx_check.py          # ~15 s on 2 cores; prints RESULT PASS or FAIL
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: the kernels must be JIT functions, not interpreted")

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeray.kernels import (
    gate,
    gemv,
    head_gemv,
    mla_decode,
    mla_merge,
    mla_write,
    mla_write_absorb,
    moe,
    moe_align,
    moe_common,
    moe_gemv,
    norm,
    norm_router,
    router_logits,
)
from moeray.kernels import swiglu as swiglu_mod
from moeray.kernels.fp8 import gemv as fp8_gemv
from moeray.kernels.fp8 import quant

FLOAT_ARGS = {"eps", "scaling", "sm_scale_log2"}  # every other non-pointer argument is an i32
F8, F32, I32, I64 = "*fp8e4nv", "*fp32", "*i32", "*i64"
# The aligned MoE kernels' K-loop constexprs as their launches set them (64-column tiles lie in
# one 128-row weight block: one scale per tile with FP8).
MOE_K_LOOP = dict(EVEN_K=True, ROW_SCALE=True, NUM_STAGES=4, MASK_ROWS=True)
MOE_K_LOOP_BF16 = dict(EVEN_K=True, ROW_SCALE=False, NUM_STAGES=4, MASK_ROWS=True)

# (kernel, constexprs but PDL, pointer types other than *bf16, options, prefetches weights)
CASES = [
    (
        gemv._gemv_kernel,
        dict(BLOCK_M=1, BLOCK_N=4, BLOCK_K=2048, EVEN_K=False, NUM_STAGES=3),
        {},
        dict(num_warps=4, num_stages=3),
        True,
    ),
    (  # Moonlight W_UK at batch 1 (broadcast), W_UV at 16 rows (tl.dot, K contiguous)
        head_gemv._head_gemv_kernel,
        dict(BLOCK_R=1, BLOCK_N=16, BLOCK_K=128, DOT=False, UPCAST=False, EVEN_K=True)
        | dict(NUM_STAGES=3),
        {},
        dict(num_warps=4, num_stages=3),
        True,
    ),
    (
        head_gemv._head_gemv_kernel,
        dict(BLOCK_R=16, BLOCK_N=16, BLOCK_K=128, DOT=True, UPCAST=False, EVEN_K=True)
        | dict(NUM_STAGES=3),
        {},
        dict(num_warps=4, num_stages=3),
        True,
    ),
    (gemv._gemv_reduce_kernel, dict(SPLIT_K=4, BLOCK=1024), {"p_ptr": F32}, {}, False),
    (
        fp8_gemv._fp8_gemv_kernel,
        # serial split-K (the tile counters' atomics) at both inner products
        dict(BLOCK_M=1, BLOCK_N=16, DOT=False, ACT_FP8=False, IEEE=False, UPCAST=False)
        | dict(EVEN_K=True, NUM_STAGES=6, REDUCE_SPLITS=8, K_BLOCKS=1),
        dict(w_ptr=F8, s_ptr=F32, c_ptr=F32, lock_ptr=I32),
        dict(num_warps=2, num_stages=6),
        True,
    ),
    (  # the wide step (K in one step, or MOERAY_FUSED_FP8_GEMV_WIDE=1): 4 x 16 blocks, pre-wait
        fp8_gemv._fp8_gemv_kernel,
        dict(BLOCK_M=1, BLOCK_N=4, DOT=False, ACT_FP8=False, IEEE=False, UPCAST=False)
        | dict(EVEN_K=True, NUM_STAGES=2, REDUCE_SPLITS=4, K_BLOCKS=16),
        dict(w_ptr=F8, s_ptr=F32, c_ptr=F32, lock_ptr=I32),
        dict(num_warps=4, num_stages=2),
        True,
    ),
    (
        fp8_gemv._fp8_gemv_kernel,
        dict(BLOCK_M=16, BLOCK_N=64, DOT=True, ACT_FP8=False, IEEE=False, UPCAST=False)
        | dict(EVEN_K=False, NUM_STAGES=4, REDUCE_SPLITS=8, K_BLOCKS=1),
        dict(w_ptr=F8, s_ptr=F32, c_ptr=F32, lock_ptr=I32),
        dict(num_warps=4, num_stages=4),
        True,
    ),
    (  # e4m3 x with act_quant's scales (fp8 x fp8 dots): x and its scales after the wait
        fp8_gemv._fp8_gemv_kernel,
        dict(BLOCK_M=16, BLOCK_N=64, DOT=True, ACT_FP8=True, IEEE=False, UPCAST=False)
        | dict(EVEN_K=True, NUM_STAGES=4, REDUCE_SPLITS=8, K_BLOCKS=1),
        dict(x_ptr=F8, xs_ptr=F32, w_ptr=F8, s_ptr=F32, c_ptr=F32, lock_ptr=I32),
        dict(num_warps=4, num_stages=4),
        True,
    ),
    (router_logits._router_logits_kernel, dict(BE=2, BD=2048), {"y_ptr": F32}, {}, True),
    (  # the post-attention add + norm + router logits (the default at decode rows)
        norm_router._norm_router_logits_kernel,
        dict(HAS_RESIDUAL=True, BE=1, BD=2048),
        {"logits_ptr": F32},
        {},
        True,
    ),
    (
        norm._rms_norm_kernel,
        dict(HAS_RESIDUAL=True, STORE_RSTD=False, BLOCK_D=2048, W_EARLY=False),
        {"rstd_ptr": F32},
        {},
        False,
    ),
    (  # MOERAY_FUSED_NORM_W_EARLY=1: the model's weight before the wait
        norm._rms_norm_kernel,
        dict(HAS_RESIDUAL=True, STORE_RSTD=False, BLOCK_D=2048, W_EARLY=True),
        {"rstd_ptr": F32},
        {},
        True,
    ),
    (
        gate._moe_gate_kernel,
        dict(E=64, G=1, PG=64, GP=1, PGP=64, TOPK_GROUP=1, K=6, S=2, KP=8, BLOCK_T=1),
        dict(logits_ptr=F32, bias_ptr=F32, ids_ptr=I64, w_ptr=F32, counts_ptr=I64),
        dict(num_warps=1),
        False,
    ),
    (  # V3's 256 experts (NB 512)
        moe_align._moe_align_kernel,
        dict(BLOCK_M=16, PADB=16, NB=512, CH=1024, QUANT=False, QUANT_M=16, EXACT=False),
        dict(ids_ptr=I64),
        {},
        False,
    ),
    (  # with x's act_quant in the same launch (its quantizing programs read x after the wait)
        moe_align._moe_align_kernel,
        dict(BLOCK_M=16, PADB=16, NB=64, CH=1024, QUANT=True, QUANT_M=16, EXACT=False),
        dict(ids_ptr=I32, sorted_ptr=I32, bexp_ptr=I32, q_ptr=F8, s_ptr=F32),
        {},
        False,
    ),
    (
        moe._moe_gate_up_kernel,
        dict(FP8=True, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, UPCAST=False, **MOE_K_LOOP)
        | dict(QUANT_H=False, H_DTYPE=tl.bfloat16, EXACT=False),
        dict(x_ptr=F8, wg_ptr=F8, wu_ptr=F8, sorted_ptr=I32, bexp_ptr=I32, xs_ptr=F32),
        dict(num_warps=4, num_stages=4),
        False,
    ),
    (  # 128-column FP8 tiles: h quantized in the epilogue (e4m3 h, fp32 scales)
        moe._moe_gate_up_kernel,
        dict(FP8=True, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, UPCAST=False, **MOE_K_LOOP)
        | dict(QUANT_H=True, H_DTYPE=tl.bfloat16, EXACT=False),
        dict(x_ptr=F8, wg_ptr=F8, wu_ptr=F8, h_ptr=F8, sorted_ptr=I32, bexp_ptr=I32)
        | dict(xs_ptr=F32, wsg_ptr=F32, wsu_ptr=F32, hs_ptr=F32),
        dict(num_warps=4, num_stages=4),
        False,
    ),
    (
        moe._moe_down_kernel,
        dict(FP8=False, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, UPCAST=False, **MOE_K_LOOP_BF16),
        dict(sorted_ptr=I32, bexp_ptr=I32, rw_ptr=F32),
        dict(num_warps=4, num_stages=4),
        False,
    ),
    (
        moe._moe_down_kernel,
        dict(FP8=True, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, UPCAST=False, **MOE_K_LOOP),
        dict(h_ptr=F8, w_ptr=F8, hs_ptr=F32, sorted_ptr=I32, bexp_ptr=I32, ws_ptr=F32, rw_ptr=F32),
        dict(num_warps=4, num_stages=4),
        False,
    ),
    (  # FP8 weights with Moonlight's GPU tile; the wait before the expert id's load
        moe_gemv._moe_gemv_gate_up_kernel,
        dict(FP8=True, BLOCK_N=16, EVEN_K=True, NUM_STAGES=6, PRECISE=True)
        | dict(ZERO_CNT=False, CNT_BLOCK=256, EARLY_SHARED=0),
        dict(wg_ptr=F8, wu_ptr=F8, ids_ptr=I32, sg_ptr=F32, su_ptr=F32, cnt_ptr=I32),
        dict(num_warps=2, num_stages=6),
        False,
    ),
    (  # the sum fold (MOERAY_FUSED_MOE_SUM_FOLD=1): its counters zeroed after the wait
        moe_gemv._moe_gemv_gate_up_kernel,
        dict(FP8=False, BLOCK_N=16, EVEN_K=True, NUM_STAGES=4, PRECISE=True)
        | dict(ZERO_CNT=True, CNT_BLOCK=256, EARLY_SHARED=0),
        dict(ids_ptr=I32, cnt_ptr=I32),
        dict(num_warps=2, num_stages=4),
        False,
    ),
    (  # early_shared (MOERAY_FUSED_SHARED_EARLY=1): the shared slots' x and weights before the
        # wait, every store (h, the fold's counters) after it
        moe_gemv._moe_gemv_gate_up_kernel,
        dict(FP8=True, BLOCK_N=16, EVEN_K=True, NUM_STAGES=4, PRECISE=True)
        | dict(ZERO_CNT=True, CNT_BLOCK=256, EARLY_SHARED=2),
        dict(wg_ptr=F8, wu_ptr=F8, ids_ptr=I64, sg_ptr=F32, su_ptr=F32, cnt_ptr=I32),
        dict(num_warps=2, num_stages=4),
        True,
    ),
    (
        moe_gemv._moe_gemv_down_kernel,
        dict(FP8=False, BLOCK_N=16, EVEN_K=False, NUM_STAGES=6, FOLD_SUM=False, KC=8)
        | dict(HAS_ADD=False, EARLY=False),
        dict(ids_ptr=I64, rw_ptr=F32, cnt_ptr=I32),
        dict(num_warps=2, num_stages=6),
        False,
    ),
    (  # the sum fold: the counter's atomic and the last program's sum after the wait
        moe_gemv._moe_gemv_down_kernel,
        dict(FP8=True, BLOCK_N=16, EVEN_K=True, NUM_STAGES=4, FOLD_SUM=True, KC=8)
        | dict(HAS_ADD=True, EARLY=False),
        dict(w_ptr=F8, s_ptr=F32, ids_ptr=I64, rw_ptr=F32, cnt_ptr=I32),
        dict(num_warps=2, num_stages=4),
        False,
    ),
    (  # MOERAY_FUSED_MOE_DOWN_EARLY=1: the ids (two launches back) and the first weight step
        # before the wait; h, the counter and every store after it
        moe_gemv._moe_gemv_down_kernel,
        dict(FP8=True, BLOCK_N=16, EVEN_K=True, NUM_STAGES=4, FOLD_SUM=True, KC=8)
        | dict(HAS_ADD=True, EARLY=True),
        dict(w_ptr=F8, s_ptr=F32, ids_ptr=I64, rw_ptr=F32, cnt_ptr=I32),
        dict(num_warps=2, num_stages=4),
        True,
    ),
    (
        moe_common._moe_sum_kernel,
        dict(K=6, BLOCK=1024, HAS_ADD=True),
        dict(ids_ptr=I64),
        {},
        False,
    ),
    (
        quant._act_quant_kernel,
        dict(BLOCK_M=16, GROUP=128, EXACT=False),
        dict(q_ptr=F8, s_ptr=F32),
        {},
        False,
    ),
    (swiglu_mod._swiglu_kernel, dict(BLOCK=1024, PRECISE=True), {}, {}, False),
    (
        mla_write._mla_write_pack_kernel,
        dict(NORM=True, ROPE=True, HB=8, CP=512, R2P=32),
        dict(slots_ptr=I64, cos_ptr=F32, sin_ptr=F32),
        dict(enable_fp_fusion=False),
        False,
    ),
    *(  # the write with W_UK (mla_write_absorb): the W_UK tile before the wait unless fresh
        (
            mla_write_absorb._mla_write_absorb_kernel,
            dict(NORM=True, ROPE=True, ROWS=4, NP=128, BC=32, CP=512, R2P=32, EARLY=early),
            dict(slots_ptr=I64, cos_ptr=F32, sin_ptr=F32),
            dict(enable_fp_fusion=False),
            early,
        )
        for early in (True, False)
    ),
    *(  # the partials for the merge; half pages (MOERAY_FUSED_MLA_SUBPAGE=1)
        (
            mla_decode._mla_decode_split_kernel,
            dict(BLOCK_H=16, R=512, P=64, RB=512, PB=64, PAGE=page, SUBPAGE=sub, UPCAST=False),
            dict(bt_ptr=I32, len_ptr=I32, o_ptr=F32, lse_ptr=F32),
            dict(num_stages=2),
            False,
        )
        for sub, page in (
            (False, 64),
            (True, 64),
            (False, 16),  # the smallest page the engine takes (tests' 16)
        )
    ),
    (mla_merge._mla_merge_kernel, dict(NS=8, R=512), dict(o_ptr=F32, lse_ptr=F32), {}, False),
    *(  # the merge with W_UV (MOERAY_FUSED_MLA_WUV=1): W's slice before the wait unless fresh
        (
            mla_merge._mla_merge_out_kernel,
            dict(NS=8, R=512, V=128, BV=16, PREFETCH_W=prefetch),
            dict(o_ptr=F32, lse_ptr=F32, lse_out_ptr=F32),
            {},
            prefetch,
        )
        for prefetch in (True, False)
    ),
]
LOAD = re.compile(r"^(@!?%p\d+ )?(ld\.global|cp\.async\.(ca|cg|bulk)(?!.*(commit|wait)))")
STORE = re.compile(r"^(@!?%p\d+ )?(st\.global|red\.|atom\.)")


def compile_ptx(fn, constants: dict, pointers: dict, options: dict) -> str:
    """fn's PTX for sm_90 with `constants` as its constexprs; pointer arguments bf16 unless named
    in `pointers`, other runtime arguments i32 (fp32 for FLOAT_ARGS). Pointers are marked 16-byte
    aligned, as Triton's launcher specializes torch's allocations: without it the PTX has scalar
    loads where the launched kernel has vector ones."""
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, "*bf16")
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    names = list(fn.arg_names)
    src = ASTSource(
        fn,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constants.items()},
        attrs={
            (names.index(n),): [["tt.divisibility", 16]]
            for n, t in signature.items()
            if t.startswith("*")
        },
    )
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def events(ptx: str) -> list[str]:
    """The global loads (L), stores and atomics (S) and griddepcontrol calls (W: wait, D: launch
    dependents) of a PTX text, in program order (Triton emits one straight function)."""
    out = []
    for raw in ptx.split(".section")[0].splitlines():
        line = raw.strip()
        if line.startswith("griddepcontrol.wait"):
            out.append("W")
        elif line.startswith("griddepcontrol.launch_dependents"):
            out.append("D")
        elif LOAD.match(line):
            out.append("L")
        elif STORE.match(line):
            out.append("S")
    return out


def check(fn, constants: dict, pointers: dict, options: dict, prefetch: bool) -> list[str]:
    """What is wrong with fn's PDL and plain PTX (nothing: an empty list)."""
    name = fn.__name__
    plain = events(compile_ptx(fn, {**constants, "PDL": False}, pointers, options))
    pdl = events(compile_ptx(fn, {**constants, "PDL": True}, pointers, options))
    errors = []
    if "W" in plain or "D" in plain:
        errors.append(f"{name}: griddepcontrol in the plain kernel")
    if pdl.count("W") != 1 or pdl.count("D") != 1:
        counts = f"{pdl.count('W')} waits, {pdl.count('D')} launches"
        return [*errors, f"{name}: the PDL kernel has {counts}"]
    wait = pdl.index("W")
    before = pdl[:wait]
    if "S" in before:
        errors.append(f"{name}: a store or atomic before the wait")
    if pdl.index("D") < wait:
        errors.append(f"{name}: launch_dependents before the wait")
    if prefetch and "L" not in before:
        errors.append(f"{name}: no weight load before the wait (the prefetch was lost)")
    if not prefetch and "L" in before:
        errors.append(f"{name}: a load before the wait")
    return errors


def main() -> int:
    print(f"triton {triton.__version__}, sm_90")
    errors = []
    for fn, constants, pointers, options, prefetch in CASES:
        found = check(fn, constants, pointers, options, prefetch)
        print(f"{'FAIL' if found else 'ok  '} {fn.__name__} {constants}")
        errors += found
    for e in errors:
        print(e)
    print("RESULT", "FAIL" if errors else "PASS")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
