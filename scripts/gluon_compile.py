"""Compile the Gluon kernels (kernels/mla_decode_wgmma.py, kernels/mla_decode_ws.py) for sm_90a
without a GPU and print their registers, spills and shared memory, as ptxas reports them.

They are written against Triton 3.6's Gluon, the GPU image's (Gluon's API moves between
releases: 3.9 renamed the cp.async copy and dropped thread_barrier), so run this with 3.6 first
on the path and the project's torch after it:

    python3.11 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
    PYTHONPATH=/tmp/t36/lib/python3.11/site-packages:.venv/lib/python3.11/site-packages:. \\
        /tmp/t36/bin/python scripts/gluon_compile.py
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from moeray.kernels.mla_decode_wgmma import STEP_TOKENS, _mla_decode_wgmma_kernel
from moeray.kernels.mla_decode_ws import _mla_decode_ws_kernel

POINTERS = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "bt_ptr": "*i32", "len_ptr": "*i32"}
POINTERS |= {"o_ptr": "*fp32", "lse_ptr": "*fp32"}


def compile_sm90(fn, constants: dict, num_warps: int) -> str:
    """fn compiled for sm_90a at DeepSeek-V3's widths: ptxas's resource line and the shared
    memory Triton allocates."""
    names = list(fn.arg_names)
    signature = {
        n: "constexpr"
        if n in constants
        else POINTERS.get(n, "fp32" if n == "sm_scale_log2" else "i32")
        for n in names
    }
    src = GluonASTSource(
        fn,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constants.items()},
        # as the launcher specializes them (pointers and the cache's strides divisible by 16:
        # cp.async's 16-byte copies need it, `mla_decode_wgmma_fits` checks the strides)
        attrs={
            (i,): [["tt.divisibility", 16]]
            for i, n in enumerate(names)
            if n in POINTERS or n.startswith("stride_kv")
        },
    )
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        info = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(d, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    usage = " ".join(line.split("info    : ")[-1] for line in info.splitlines() if "Used" in line)
    spills = [line.strip() for line in info.splitlines() if "spill" in line]
    return f"{usage}; {spills[0] if spills else ''}; shared {kernel.metadata.shared} B"


def main() -> None:
    print("triton", triton.__version__)
    base = dict(BH=64, R=512, P=64, PAGE=64)
    for stages, bt in STEP_TOKENS.items():
        got = compile_sm90(_mla_decode_wgmma_kernel, base | dict(BT=bt, STAGES=stages), 8)
        print(f"mla_decode_wgmma stages={stages} BT={bt}: {got}")
    print(f"mla_decode_ws BT=64: {compile_sm90(_mla_decode_ws_kernel, base | dict(BT=64), 4)}")


if __name__ == "__main__":
    main()
