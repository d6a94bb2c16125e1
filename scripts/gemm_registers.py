"""Registers, spills and shared memory of the fp8 GEMM kernels compiled for sm_90, without a GPU.

Triton compiles to a cubin on any machine (its wheel ships ptxas and cuobjdump); this compiles
moeray's `_fp8_gemm_kernel` (64x128 and split-M tiles) and the sweep's `ptr64x128s3` kernels as a
launch at M=4096, N=2112, K=7168 would specialize them (16-divisible pointers and sizes, unit
strides folded), and prints what decides CTAs per SM: 3 CTAs of 128 threads need <= 168
registers per thread. Found the 177-vs-167 register difference behind the port's 0.61x
(benchmarks/notes-kernels.md). The counts depend on the Triton version: the device runs 3.6
(`python3.11 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0 torch==2.13.0`).

    python scripts/gemm_registers.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]

import fp8_gemm_sweep as sweep  # noqa: E402

from moeray.kernels.fp8.gemm import _fp8_gemm_kernel, ctas_per_sm  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
FP8_PTR = "*fp8e4nv"


def compile_sm90(fn, runtime: dict[str, str], constants: dict, options: dict) -> dict:
    """Compile fn for sm_90: `runtime` maps runtime argument names to Triton types; every other
    argument is a constexpr from `constants`. Pointers and i32 sizes get divisibility 16."""
    names = list(fn.arg_names)
    signature = {n: runtime.get(n, "constexpr") for n in names}
    missing = [n for n in names if signature[n] == "constexpr" and n not in constants]
    if missing:
        raise ValueError(f"{fn.__name__}: no type or constant for {missing}")
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if signature[n] in ("i32",) or signature[n].startswith("*")
    }
    src = ASTSource(
        fn,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constants.items()},
        attrs=attrs,
    )
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(
        tok.split(":", 1) for line in usage.splitlines() if "REG:" in line for tok in line.split()
    )
    return {
        "regs": int(fields["REG"]),
        "stack": int(fields["STACK"]),
        "shared": kernel.metadata.shared,
    }


def main() -> int:
    print(f"triton {triton.__version__}, target sm_90, 4 warps, 3 stages")
    opts = dict(num_warps=4, num_stages=3)
    prod_rt = {
        "a_ptr": FP8_PTR,
        "b_ptr": FP8_PTR,
        "c_ptr": "*bf16",
        "as_ptr": "*fp32",
        "bs_ptr": "*fp32",
        "expert_ptr": "*fp32",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "stride_am": "i32",
        "stride_bn": "i32",
        "stride_cm": "i32",
        "stride_ask": "i32",
        "stride_bsn": "i32",
    }
    prod_c = dict(
        stride_ak=1,
        stride_bk=1,
        stride_cn=1,
        stride_asm=1,
        stride_bsk=1,
        stride_be=0,
        stride_bse=0,
        B_SCALE_DIV=128,
        ROW_SCALE=True,
        BLOCK_M=64,
        BLOCK_N=128,
        BLOCK_K=128,
        GROUP_M=8,
        SPLIT_M=False,
        EVEN_K=True,
        UPCAST=False,
        GROUPED=False,
        NUM_STAGES=3,
    )
    sweep_rt = {
        "a_ptr": FP8_PTR,
        "b_ptr": FP8_PTR,
        "c_ptr": "*bf16",
        "as_ptr": "*fp32",
        "bs_ptr": "*fp32",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "stride_am": "i32",
        "stride_bn": "i32",
        "stride_cm": "i32",
        "stride_ask": "i32",
        "stride_bsn": "i32",
        "NUM_PROGS": "i32",
    }
    sweep_c = dict(
        stride_asm=1,
        stride_bsk=1,
        BLOCK_M=64,
        BLOCK_N=128,
        BLOCK_K=128,
        GROUP_M=8,
        NUM_STAGES=3,
        PERSISTENT=False,
        K_PAIR=False,
        SPLIT_M=False,
        UPCAST=False,
        PLAIN_LOOP=False,
    )
    cases = [
        ("moeray 64x128", _fp8_gemm_kernel, prod_rt, prod_c),
        (
            "moeray split-M 128x128",
            _fp8_gemm_kernel,
            prod_rt,
            {**prod_c, "BLOCK_M": 128, "SPLIT_M": True},
        ),
        ("sweep ptr64x128s3", sweep._gemm_ptr_kernel, sweep_rt, sweep_c),
        (
            "sweep ptr64x128s3_range",
            sweep._gemm_ptr_kernel,
            sweep_rt,
            {**sweep_c, "PLAIN_LOOP": True},
        ),
    ]
    for name, fn, rt, consts in cases:
        r = compile_sm90(fn, rt, consts, opts)
        occ = ctas_per_sm(
            SimpleNamespace(
                n_regs=r["regs"],
                n_spills=None,
                metadata=SimpleNamespace(num_warps=opts["num_warps"], shared=r["shared"]),
            )
        )
        print(
            f"{name:26s} regs {r['regs']:3d}  stack {r['stack']:4d} B  shared {r['shared']:6d} B  "
            f"-> {occ['ctas_per_sm']} CTAs/SM"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
