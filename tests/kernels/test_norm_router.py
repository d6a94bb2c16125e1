"""The add + RMSNorm + router-logits kernel (moeray.kernels.norm_router) against its PyTorch
reference under the interpreter at odd shapes (rows past one 2,048-feature step, experts past one
row a program); its input checks and switch; the compiled kernel on the GPU (marker gpu)."""

import pytest
import torch

from moeray.kernels import norm_router as norm_router_mod
from moeray.kernels.norm_router import (
    MAX_TOKENS,
    norm_router_logits,
    norm_router_logits_applies,
    norm_router_logits_ref,
)
from moeray.kernels.router_logits import router_logits_ref
from moeray.platform.config import tiny
from moeray.platform.model import moe as model_moe
from moeray.platform.model.block import DecoderLayer
from moeray.platform.model.rope import RotaryEmbedding


def _inputs(T, E, D, dtype, residual, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, D, generator=g) * 2).to(dtype)
    r = torch.randn(T, D, generator=g).to(dtype) if residual else None
    nw = (1 + 0.2 * torch.randn(D, generator=g)).to(dtype)
    w = (torch.randn(E, D, generator=g) * 0.05).to(dtype)
    return x, r, nw, w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(
    ("T", "E", "D"),
    # one step (D <= 2,048), one row a program; three steps with a ragged last one (4,437 =
    # 2 x 2,048 + 341) and two rows a program with the last half masked (E = 257)
    [(1, 1, 1), (3, 7, 100), (2, 64, 2048), (1, 257, 4437), (MAX_TOKENS, 5, 130)],
)
def test_norm_router_logits_match_reference(dtype, residual, T, E, D):
    x, r, nw, w = _inputs(T, E, D, dtype, residual, seed=T * 1000 + E + D)
    logits, y, h = norm_router_logits(x, nw, 1e-6, w, r)
    logits_ref, y_ref, h_ref = norm_router_logits_ref(x, nw, 1e-6, w, r)
    assert logits.dtype == torch.float32 and logits.shape == (T, E)
    assert y.dtype == dtype and y.shape == (T, D)
    assert torch.equal(h, h_ref)  # the add rounds once, as PyTorch's
    if r is None:
        assert h is x
    # y: rms_norm's formula; the fp32 sum of squares in another order moves at most a couple of
    # rounding steps (tests/kernels/test_norm.py's bound)
    step = torch.finfo(dtype).eps * y_ref.float().abs() + torch.finfo(dtype).tiny
    assert ((y.float() - y_ref.float()).abs() <= 2.02 * step).all()
    assert (y != y_ref).float().mean() < 0.01  # almost every feature bit-equal
    # the logits are the router's dot products of the kernel's own y (fp32 sum order only) ...
    scale = y.float().abs() @ w.float().abs().t()
    tol = 8 * torch.finfo(torch.float32).eps * scale + 1e-30
    assert ((logits - router_logits_ref(y, w)).abs() <= tol).all()
    # ... and close to the reference's, whose y may differ by those rounding steps
    assert torch.allclose(logits, logits_ref, rtol=1e-2, atol=1e-2 * float(scale.max()))


def test_norm_router_logits_inputs_and_applies(monkeypatch):
    x, r, nw, w = _inputs(2, 4, 8, torch.bfloat16, True, seed=0)
    with pytest.raises(ValueError, match=r"expected \[8\] and \[E, 8\]"):
        norm_router_logits(x, nw, 1e-6, w[:, :7], r)
    with pytest.raises(ValueError, match="norm_weight has dtype"):
        norm_router_logits(x, nw.float(), 1e-6, w, r)
    with pytest.raises(ValueError, match="residual has shape"):
        norm_router_logits(x, nw, 1e-6, w, r[:1])
    most = norm_router_mod.WIDE_MAX_TOKENS  # a small router's bound
    with pytest.raises(ValueError, match=f"at most {most} rows"):
        big = torch.zeros(most + 1, 8).bfloat16()
        norm_router_logits(big, nw, 1e-6, w, big)
    monkeypatch.setenv("MOERAY_FUSED_NORM_ROUTER", "0")
    assert not norm_router_logits_applies(x, nw, w, r)  # the A/B switch
    monkeypatch.delenv("MOERAY_FUSED_NORM_ROUTER", raising=False)
    assert norm_router_logits_applies(x, nw, w, r)  # the default
    assert norm_router_logits_applies(x, nw, w)
    assert not norm_router_logits_applies(x, nw.float(), w, r)  # autocast's fp32 weight: no
    assert not norm_router_logits_applies(x.float(), nw.float(), w.float(), r.float())
    assert not norm_router_logits_applies(torch.zeros(most + 1, 8).bfloat16(), nw, w)
    assert not norm_router_logits_applies(x, nw, w, r[:1])
    assert not norm_router_logits_applies(x.t().contiguous().t(), nw, w, r)  # strided features


@pytest.mark.parametrize(("T", "E"), [(33, 5), (64, 6)])
def test_norm_router_wide_takes_64_rows_of_a_small_router(monkeypatch, T, E):
    """NORM_ROUTER_WIDE (the default): 33-64 rows fold too, WIDE_ROWS expert rows a program (the
    last program's rows past E masked), the same numbers as the per-token tiles; a router past
    WIDE_MAX_ROUTER_BYTES keeps the 32-row bound, and so does MOERAY_FUSED_NORM_ROUTER_WIDE=0."""
    x, r, nw, w = _inputs(T, E, 130, torch.bfloat16, True, seed=T + E)
    monkeypatch.setenv("MOERAY_FUSED_NORM_ROUTER_WIDE", "0")
    assert not norm_router_logits_applies(x, nw, w, r)  # the A/B switch
    with pytest.raises(ValueError, match=f"at most {MAX_TOKENS} rows"):
        norm_router_logits(x, nw, 1e-6, w, r)
    monkeypatch.delenv("MOERAY_FUSED_NORM_ROUTER_WIDE")
    assert norm_router_mod.max_tokens(w) == norm_router_mod.WIDE_MAX_TOKENS == 64
    assert norm_router_logits_applies(x, nw, w, r)
    launches = []
    real = norm_router_mod._norm_router_logits_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append((grid, kw["BE"]))
                return real[grid](*args, **kw)

            return launch

    monkeypatch.setattr(norm_router_mod, "_norm_router_logits_kernel", Spy())
    logits, y, h = norm_router_logits(x, nw, 1e-6, w, r)
    wide = norm_router_mod.WIDE_ROWS
    assert launches == [((-(-E // wide), T), wide)]
    # the same per-row numbers as 32-row launches of the per-token tiles
    parts = [norm_router_logits(x[i : i + 16], nw, 1e-6, w, r[i : i + 16]) for i in range(0, T, 16)]
    assert torch.equal(logits, torch.cat([p[0] for p in parts]))
    assert torch.equal(y, torch.cat([p[1] for p in parts]))
    assert torch.equal(h, torch.cat([p[2] for p in parts]))
    logits_ref, _, h_ref = norm_router_logits_ref(x, nw, 1e-6, w, r)
    assert torch.equal(h, h_ref)
    assert torch.allclose(logits, logits_ref, rtol=1e-2, atol=1e-2 * float(logits_ref.abs().max()))
    with pytest.raises(ValueError, match="at most 64 rows"):
        big = torch.zeros(65, 130).bfloat16()
        norm_router_logits(big, nw, 1e-6, w, big)
    # a router of more than WIDE_MAX_ROUTER_BYTES (DeepSeek-V3's 3.7 MB) keeps 32 rows
    large = torch.zeros(norm_router_mod.WIDE_MAX_ROUTER_BYTES // (2 * 130) + 1, 130).bfloat16()
    assert norm_router_mod.max_tokens(large) == MAX_TOKENS
    assert not norm_router_logits_applies(x, nw, large, r)


@pytest.mark.parametrize("defer", [False, True])
def test_moe_decoder_layer_folds_its_norm_into_the_router(monkeypatch, launch_spy, defer):
    """A tiny() MoE decoder layer at 3 decode rows in bf16 (the interpreter stands in for CUDA):
    one norm_router launch, the post-attention norm not run, the same experts chosen and the
    output equal to the unfolded layer's (MOERAY_FUSED_NORM_ROUTER=0) up to the norm's rounding;
    with `defer` the residual sum bit-equal. A dense layer keeps the norm."""
    cfg = tiny()
    torch.manual_seed(0)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(1).expand(3, 1))
    x = torch.randn(3, 1, cfg.hidden_size).bfloat16()
    delta = torch.randn(3, 1, cfg.hidden_size).bfloat16()
    launches = launch_spy(norm_router_mod, "_norm_router_logits_kernel")
    monkeypatch.delenv("MOERAY_FUSED_NORM_ROUTER", raising=False)
    monkeypatch.setattr(
        model_moe, "use_norm_router", lambda *a: norm_router_mod.norm_router_logits_applies(*a)
    )
    for idx, moe in ((1, True), (0, False)):
        layer = DecoderLayer(cfg, idx)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.1)
        with torch.no_grad():
            layer.post_attention_layernorm.weight.add_(1)
        layer = layer.bfloat16().eval()
        norm_calls: list = []

        def counted(*a, calls=norm_calls, real=layer.post_attention_layernorm.add_forward):
            return calls.append(1) or real(*a)

        monkeypatch.setattr(layer.post_attention_layernorm, "add_forward", counted)
        with torch.no_grad():
            out = layer(x, cos, sin, delta_BSD=delta, defer=defer)
            ids = None if not moe else layer.mlp.last_routing.expert_ids_TK.clone()
            monkeypatch.setenv("MOERAY_FUSED_NORM_ROUTER", "0")
            ref = layer(x, cos, sin, delta_BSD=delta, defer=defer)
            monkeypatch.delenv("MOERAY_FUSED_NORM_ROUTER")
        assert len(launches) == int(moe) and len(norm_calls) == 2 - int(moe)
        if moe:
            assert torch.equal(ids, layer.mlp.last_routing.expert_ids_TK)
        if defer:
            assert torch.equal(out[0], ref[0])
            out, ref = out[1], ref[1]
        torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)
        launches.clear()


def test_the_model_folds_only_for_cuda_inference(monkeypatch):
    """`moe.use_norm_router`: CUDA tensors (the property stands in for them), no gradient wanted."""
    x, r, nw, w = _inputs(2, 4, 8, torch.bfloat16, True, seed=1)
    assert not model_moe.use_norm_router(x, nw, w, r)  # CPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert model_moe.use_norm_router(x, nw, w, r)
    assert model_moe.use_norm_router(x, nw, w, None)
    nw.requires_grad_(True)
    assert not model_moe.use_norm_router(x, nw, w, r)  # training
    with torch.no_grad():
        assert model_moe.use_norm_router(x, nw, w, r)


@pytest.mark.gpu
def test_norm_router_logits_compiled_on_gpu(compiled_check):
    compiled_check(
        """
import torch
from moeray.kernels.norm_router import max_tokens, norm_router_logits, norm_router_logits_ref
from moeray.kernels.router_logits import router_logits_ref
bad = 0
for E, D in ((64, 2048), (256, 7168), (7, 100), (257, 4437)):
    for T in (1, 5, 32, 48, 64):
        if T > max_tokens(torch.empty(E, D, dtype=torch.bfloat16)):
            continue
        for res in (False, True):
            x = torch.randn(T, D, device="cuda").bfloat16()
            r = torch.randn(T, D, device="cuda").bfloat16() if res else None
            nw = (1 + 0.2 * torch.randn(D, device="cuda")).bfloat16()
            w = (torch.randn(E, D, device="cuda") * 0.02).bfloat16()
            logits, y, h = norm_router_logits(x, nw, 1e-6, w, r)
            lr, yr, hr = norm_router_logits_ref(x, nw, 1e-6, w, r)
            step = 2 ** -7 * yr.float().abs() + 1e-30
            y_ok = bool(((y.float() - yr.float()).abs() <= 2.02 * step).all())
            scale = y.float().abs() @ w.float().abs().t()
            err = (logits - router_logits_ref(y, w)).abs()
            l_ok = bool((err <= 8 * 1.2e-7 * scale + 1e-30).all())
            ok = y_ok and l_ok and torch.equal(h, hr)
            bad += not ok
            print(E, D, T, res, "ok" if ok else "MISMATCH", "y bit-equal share",
                  round(float((y == yr).float().mean()), 4), "top-6 same:",
                  torch.equal(logits.topk(min(6, E)).indices, lr.topk(min(6, E)).indices))
print("RESULT PASS" if bad == 0 else f"RESULT FAIL {bad}")
""",
        "norm-router-gpu.log",
    )
