"""Count the launches of one decode forward (batch 1 unless --batch; bf16 or --weights fp8) by
source line, on CPU, with the GPU's fast-path choices: PyTorch ops (each about one CUDA kernel)
through a TorchDispatchMode that records the innermost moeray frame, and Triton kernels by name.
The GPU profiler gave no Python stacks for the decode-sources recipe; this gives them for the
glue ops, without a GPU.

How the GPU path is emulated: TRITON_INTERPRET=1 runs the Triton kernels on CPU, and
`torch.Tensor.is_cuda` reads True while the engine runs, so every `x.is_cuda` choice (model/norm.py,
rope.py, moe.py, routing) takes its GPU branch; the runner gets attention="kernel" (the paged MLA
kernel through `cache.attend`), FP8 GEMMs the Triton kernel (one launch, as cuBLASLt's). Shapes are
Moonlight-16B-A3B's structure at small widths (the op count depends on widths only where a width
picks a path: FP8 layers off the 128-grid run fp8_gemv, and the first FP8 decode step dequantizes
kv_b once per layer). The MoE-layer figure is the difference between two depths.

    .venv/bin/python scripts/decode_ops.py            # 2 and 3 layers, the table of the latter
    .venv/bin/python scripts/decode_ops.py --batch 64 --weights fp8     # ~2 minutes
"""

import argparse
import collections
import dataclasses
import os
import sys
import traceback
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

import torch
import triton.runtime.interpreter as interpreter
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeray.kernels import router_logits as router_logits_mod
from moeray.kernels.fp8 import dispatch as fp8_dispatch
from moeray.platform.config import moonlight_16b_a3b
from moeray.platform.engine import runner as runner_mod
from moeray.platform.engine.bench.model import quantize_fp8_
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer

# Ops that launch nothing: views, allocations, host scalars.
NO_KERNEL = {
    *("view", "view_as", "_unsafe_view", "reshape", "slice", "select", "unsqueeze", "squeeze"),
    *("expand", "t", "transpose", "permute", "unbind", "split", "split_with_sizes", "alias"),
    *("as_strided", "detach", "unflatten", "flatten", "lift_fresh", "empty", "empty_like"),
    *("empty_strided", "scalar_tensor", "_local_scalar_dense", "item", "promote_types"),
}


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        stack = traceback.extract_stack()
        if any("triton" in f.filename for f in stack) or name in NO_KERNEL:
            return out  # the interpreter's own tensor handling, or no kernel
        if name in ("to", "contiguous") and args and out is args[0]:
            return out  # a no-op conversion
        frames = [f for f in stack if "/moeray/" in f.filename]
        where = (
            f"{frames[-1].filename.split('/moeray/')[-1]}:{frames[-1].lineno}" if frames else "?"
        )
        self.ops[(name, where)] += 1
        return out


def count(
    layers: int, batch: int = 1, fp8: bool = False
) -> tuple[collections.Counter, collections.Counter]:
    """(PyTorch ops by (op, line), Triton launches by kernel) of one decode forward of `batch`
    sequences, with e4m3 block-scaled projections when `fp8` (as `bench engine --weights fp8`)."""
    cfg = dataclasses.replace(
        moonlight_16b_a3b(),
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=layers,
        vocab_size=512,
        kv_lora_rank=64,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=None,
    )
    model = Transformer(cfg)
    model.reset_parameters(seed=1)
    model = model.to(torch.bfloat16).eval()
    if fp8:
        quantize_fp8_(model)
    rec, launches, state = _Recorder(), collections.Counter(), {"on": False, "done": False}
    real_getitem = interpreter.InterpretedFunction.__getitem__
    real_forward = runner_mod.ModelRunner._forward_model
    real_layout = fp8_dispatch.native_blockscaled_layout
    real_mm_fp32 = router_logits_mod._mm_fp32

    def mm_fp32(x, w):  # cuBLAS's fp32-output GEMM (ROUTE_BATCH) has no CPU kernel: one mm here
        with _disable_current_modes():
            x, w = x.float(), w.float()
        return torch.mm(x, w.t())

    def getitem(self, grid):
        if state["on"]:
            launches[self.fn.__name__] += 1
        return real_getitem(self, grid)

    def forward(self, ids, view, keep):
        if ids.shape[1] != 1 or state["done"]:
            return real_forward(self, ids, view, keep)
        state["on"] = True
        with rec:
            out = real_forward(self, ids, view, keep)
        state.update(on=False, done=True)
        return out

    interpreter.InterpretedFunction.__getitem__ = getitem
    # No cuBLASLt on CPU: FP8 GEMMs take the Triton kernel (one launch, as _scaled_mm's on sm_90).
    fp8_dispatch.native_blockscaled_layout = lambda *a: None
    router_logits_mod._mm_fp32 = mm_fp32
    runner_mod.ModelRunner._forward_model = forward
    torch.Tensor.is_cuda = property(lambda self: True)  # type: ignore[method-assign,assignment]
    try:
        eng = Engine(
            model,
            EngineConfig(
                page_size=16,
                num_pages=2 * batch + 8,
                max_num_seqs=batch,
                max_model_len=64,
                attention="kernel",
                use_cuda_graphs=False,
                enable_prefix_caching=False,
            ),
        )
        prompts = [[1 + (i + j) % 500 for j in range(4)] for i in range(batch)]
        eng.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    finally:
        torch.Tensor.is_cuda = torch._C.TensorBase.is_cuda  # type: ignore[method-assign]
        interpreter.InterpretedFunction.__getitem__ = real_getitem
        runner_mod.ModelRunner._forward_model = real_forward
        fp8_dispatch.native_blockscaled_layout = real_layout
        router_logits_mod._mm_fp32 = real_mm_fp32
    return rec.ops, launches


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=3, help="depth of the table (1 dense + MoE)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    p.add_argument("--weights", choices=("bf16", "fp8"), default="bf16")
    a = p.parse_args()
    if a.layers < 2:
        raise ValueError(f"--layers={a.layers}: needs >= 2 (one dense layer, then MoE layers)")
    fp8 = a.weights == "fp8"
    small_ops, small_k = count(a.layers - 1, a.batch, fp8)
    ops, kernels = count(a.layers, a.batch, fp8)
    total = sum(ops.values()) + sum(kernels.values())
    moe = total - sum(small_ops.values()) - sum(small_k.values())
    print(
        f"one batch-{a.batch} {a.weights} decode forward, {a.layers} layers "
        f"(1 dense + {a.layers - 1} MoE):"
    )
    print(f"  {sum(ops.values())} PyTorch ops + {sum(kernels.values())} Triton launches = {total}")
    print(
        f"  per MoE layer: {moe}; the rest (dense layer, embedding, rope angles, head): "
        f"{total - (a.layers - 1) * moe}"
    )
    for (op, where), n in sorted(ops.items(), key=lambda kv: kv[0][1]):
        print(f"{n:5d}  {op:20s} {where}")
    for name, n in kernels.most_common():
        print(f"{n:5d}  {name:20s} (Triton)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
