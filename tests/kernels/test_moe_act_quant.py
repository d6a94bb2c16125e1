"""FP8 fused MoE with the activations quantized inside its GEMM kernels (QUANT_A, decode shapes)
under the interpreter: the same bits as with act_quant launched before each GEMM
(MOERAY_FUSED_ACT_QUANT=0), at odd shapes (T 1, 3, 17; 7 experts; top-k 2 and 6; H 384, I 640;
ids of other ranks' experts; an all-zero 1x128 group; with and without add_TH; 2 shared experts
stacked as extra experts with weight 1, as model/shared_fuse.py runs them). At decode shapes no
act_quant is launched; at prefill shapes, or with BLOCK_K 64, act_quant quantizes x and h (2
launches)."""

import pytest
import torch

from moeray.kernels import moe
from moeray.kernels.fp8.quant import weight_quant_ref

HID, WIDTH, E = 384, 640, 7  # multiples of 128, not powers of 2; an odd expert count
# Wide N blocks: 3 gate/up and 2 down programs a row block (the last one ragged), where the
# interpreter's default 32 takes 20 and 12 (~4x the time: each program quantizes its A tiles).
WIDE = dict(BLOCK_M=16, BLOCK_N=256, BLOCK_K=128, num_warps=4, num_stages=1)


def _experts(e: int, h: int, i: int, g: torch.Generator) -> tuple:
    """FP8 experts as fused_moe_gate_up takes them: (gate, up, down) with gate and up views of one
    [E, 2I, H] stack (as fused_moe passes them), and their 128x128 scale_inv as keywords."""
    w13 = torch.randn(e, 2 * i, h, generator=g) / h**0.5
    w2 = torch.randn(e, h, i, generator=g) / i**0.5
    q13, s13 = map(torch.stack, zip(*[weight_quant_ref(w) for w in w13], strict=True))
    q2, s2 = map(torch.stack, zip(*[weight_quant_ref(w) for w in w2], strict=True))
    ib = i // 128
    scales = dict(w1_scale=s13[:, :ib], w3_scale=s13[:, ib:], w2_scale=s2)
    return (q13[:, :i], q13[:, i:], q2), scales


def _routing(t: int, k: int, e: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct experts a token, some of them another rank's (ids e + 2 and -1)."""
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids[::3, 0] = e + 2
    if t > 1:
        ids[1, -1] = -1
    return ids.to(torch.int32), torch.rand(t, k, generator=g).bfloat16()


def _run(
    monkeypatch, in_kernel: bool | None, x, weights, ids, wts, **kw
) -> tuple[torch.Tensor, int]:
    """fused_moe_gate_up with MOERAY_FUSED_ACT_QUANT on, off or unset (None): (output, act_quant
    calls)."""
    if in_kernel is None:
        monkeypatch.delenv("MOERAY_FUSED_ACT_QUANT", raising=False)
    else:
        monkeypatch.setenv("MOERAY_FUSED_ACT_QUANT", "1" if in_kernel else "0")
    real, calls = moe.act_quant, []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(moe, "act_quant", counted)
    try:
        out = moe.fused_moe_gate_up(x, *weights, ids, wts, **kw)
    finally:
        monkeypatch.setattr(moe, "act_quant", real)
    return out, len(calls)


@pytest.mark.parametrize(
    ("t", "k", "add", "shared"), [(1, 6, False, 0), (17, 2, True, 0), (3, 6, False, 2)]
)
def test_in_kernel_quant_is_bit_equal_at_decode(monkeypatch, t, k, add, shared):
    g = torch.Generator().manual_seed(100 * t + k)
    weights, scales = _experts(E + shared, HID, WIDTH, g)
    ids, wts = _routing(t, k, E, g)
    if shared:  # model/shared_fuse.py: the S shared experts E .. E+S-1 after the routed ones
        ids = torch.cat([ids, torch.arange(E, E + shared, dtype=ids.dtype).expand(t, -1)], 1)
        wts = torch.cat([wts, torch.ones(t, shared, dtype=wts.dtype)], 1)
    x = (torch.randn(t, HID, generator=g) * torch.rand(t, 1, generator=g) * 4).bfloat16()
    x[0, 128:256] = 0  # an all-zero group: scale from AMAX_FLOOR, q = 0
    kw = dict(scales, config=WIDE)
    kw["add_TH"] = torch.randn(t, HID, generator=g).bfloat16() if add else None
    assert moe._decode_shape(ids.numel(), E + shared)
    fused, fused_calls = _run(monkeypatch, True, x, weights, ids, wts, **kw)
    launched, launched_calls = _run(monkeypatch, False, x, weights, ids, wts, **kw)
    assert fused_calls == 0 and launched_calls == 2
    assert not torch.isnan(fused).any() and fused.abs().sum() > 0
    assert torch.equal(fused, launched)


def test_the_config_decides(monkeypatch):
    """At a decode shape with the interpreter's own config (`_moe_config`) the kernels quantize;
    past DECODE_ROWS_PER_EXPERT rows an expert (here 40), or with BLOCK_K 64 (a group spans two K
    steps), act_quant runs before each GEMM and the switch changes nothing."""
    g = torch.Generator().manual_seed(7)
    weights, scales = _experts(2, 128, 256, g)
    t, k = 40, 2
    ids = torch.tensor([[0, 1]] * t, dtype=torch.int32)
    wts = torch.rand(t, k, generator=g).bfloat16()
    x = torch.randn(t, 128, generator=g).bfloat16()
    assert not moe._decode_shape(t * k, 2)
    on, on_calls = _run(monkeypatch, True, x, weights, ids, wts, **scales)
    off, off_calls = _run(monkeypatch, False, x, weights, ids, wts, **scales)
    assert on_calls == off_calls == 2 and torch.equal(on, off)
    decode = (x[:3], weights, ids[:3], wts[:3])
    assert moe._decode_shape(3 * k, 2)
    on, on_calls = _run(monkeypatch, True, *decode, **scales)
    off, off_calls = _run(monkeypatch, False, *decode, **scales)
    assert (on_calls, off_calls) == (0, 2) and torch.equal(on, off)
    # unset, the default: act_quant launches (the in-kernel path measured 2x slower on an H200)
    default, calls = _run(monkeypatch, None, *decode, **scales)
    assert calls == 2 and torch.equal(default, off)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=1)
    k64, calls = _run(monkeypatch, True, *decode, config=cfg, **scales)
    assert calls == 2 and not torch.isnan(k64).any()
