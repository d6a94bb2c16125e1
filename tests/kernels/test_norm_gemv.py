"""GEMVs with the input's RMSNorm (and residual add) in their prologue (kernels/prenorm.py):
norm_gemv and norm_fp8_gemv against their references under the interpreter at odd shapes (rows
in partial tiles, widths past one 2,048-feature prologue step, ragged K steps, split K), their
input checks."""

import pytest
import torch

from moeray.kernels import fp8
from moeray.kernels import gemv as gemv_module
from moeray.kernels.fp8.gemv_wide import INTERPRET_WIDE_ROWS, wide_config
from moeray.kernels.fp8.norm_gemv import norm_fp8_gemv, norm_fp8_gemv_fits, norm_fp8_gemv_ref
from moeray.kernels.gemv import bcast_config, norm_gemv, norm_gemv_ref
from moeray.kernels.prenorm import PreNorm
from moeray.platform.config import tiny
from moeray.platform.model.block import DecoderLayer
from moeray.platform.model.merge import merge_projections
from moeray.platform.model.quant import FP8Linear
from moeray.platform.model.rope import RotaryEmbedding

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _case(m, n, k, dtype, residual, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-1, 1, m)[:, None]).to(dtype)
    r = torch.randn(m, k, generator=g).to(dtype) if residual else None
    nw = (1 + 0.2 * torch.randn(k, generator=g)).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    return x, w, PreNorm(nw, 1e-6, r)


def assert_norm_gemv_close(y, h, x, w, norm):
    """h bit-equal to the reference's (one rounding of the add); y within the reference's y by
    what the normed rows' couple of rounding steps (the fp32 sum of squares in another order)
    and the output's own rounding allow."""
    y_ref, h_ref = norm_gemv_ref(x, w, norm)
    assert torch.equal(h, h_ref)
    if norm.residual is None:
        assert h is x
    normed = norm.ref(x)[0].double()
    u = ULP[x.dtype]
    bound = 2.02 * u * (normed.abs() @ w.double().abs().t()) + 2 * u * y_ref.double().abs()
    assert ((y.double() - y_ref.double()).abs() <= bound + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("m,n,k", [(1, 7, 200), (3, 576, 2048 + 64), (5, 100, 130)])
def test_norm_gemv_matches_reference(dtype, residual, m, n, k):
    x, w, norm = _case(m, n, k, dtype, residual, seed=m * 100 + n + k)
    y, h = norm_gemv(x, w, norm)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_norm_gemv_close(y, h, x, w, norm)


def test_norm_gemv_with_split_k_writes_h_once():
    # three K splits and two N tiles: only the first tile's first split stores h, every program
    # normalizes the whole rows
    x, w, norm = _case(3, 40, 700, torch.bfloat16, True, seed=3)
    cfg = dict(bcast_config(3, 40, 700, x.device), BLOCK_N=32, BLOCK_K=128, SPLIT_K=3)
    y, h = norm_gemv(x, w, norm, config=cfg)
    assert_norm_gemv_close(y, h, x, w, norm)


def test_norm_gemv_rejects_bad_input():
    x, w, norm = _case(2, 8, 64, torch.bfloat16, True, seed=0)
    with pytest.raises(ValueError, match=r"norm weight has shape \(63,\); expected \[64\]"):
        norm_gemv(x, w, PreNorm(norm.weight[:63], 1e-6))
    with pytest.raises(ValueError, match="residual has shape"):
        norm_gemv(x, w, PreNorm(norm.weight, 1e-6, norm.residual[:1]))
    with pytest.raises(ValueError, match="norm weight has dtype"):
        norm_gemv(x, w, PreNorm(norm.weight.float(), 1e-6))
    with pytest.raises(ValueError, match="x has stride 2 over K"):
        wide = torch.zeros(2, 128, dtype=torch.bfloat16)
        norm_gemv(wide[:, ::2], w, PreNorm(norm.weight, 1e-6))
    with pytest.raises(ValueError, match="x has dtype"):
        norm_gemv(x.float(), w.float(), PreNorm(norm.weight.float(), 1e-6))


@pytest.mark.parametrize("k", [130, 2048 + 64])
def test_norm_gemv_with_an_identity_weight_gives_the_normed_rows(k):
    # w = I: each output is one exact product, so y is the kernel's normed row itself, which
    # must be rms_norm's up to the sum of squares' fp32 order (almost every value bit-equal)
    x, _, norm = _case(3, k, k, torch.bfloat16, True, seed=k)
    y, _ = norm_gemv(x, torch.eye(k, dtype=torch.bfloat16), norm)
    normed = norm.ref(x)[0]
    assert ((y.float() - normed.float()).abs() <= 2.02 * ULP[x.dtype] * normed.float().abs()).all()
    assert (y != normed).float().mean() < 0.01


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(
    ("n", "k", "splits"), [(7, 200, 1), (100, 1000, 1), (64, 2048, 1), (100, 2048, 4)]
)
def test_norm_fp8_gemv_matches_reference(residual, n, k, splits):
    # one row, K one wide step of 2 / 8 / 16 blocks (ragged at 200 and 1,000), N past one
    # interpreter tile (32 rows) at 100; four K splits of 4 blocks summed serially (workspace)
    x, w, norm = _case(1, n, k, torch.bfloat16, residual, seed=n + k)
    wq, ws = fp8.weight_quant_ref(w.float() * 40)
    kb = -(-k // 128)
    cfg = dict(wide_config(n, kb, 1, INTERPRET_WIDE_ROWS), SPLIT_K=splits)
    cfg["K_BLOCKS"] = -(-kb // splits)
    workspace = fp8.fp8_gemv_workspace(n, 1) if splits > 1 else None
    y, h = norm_fp8_gemv(x, wq, ws, norm, config=cfg, workspace=workspace)
    if workspace is not None:
        assert not workspace.any()  # the counters back at zero
    y_ref, h_ref = norm_fp8_gemv_ref(x, wq, ws, norm)
    assert y.dtype == torch.bfloat16 and y.shape == (1, n)
    assert torch.equal(h, h_ref) and (residual or h is x)
    wd = fp8.weight_dequant_ref(wq, ws, out_dtype=torch.float32).double()
    normed = norm.ref(x)[0].double()
    u = ULP[x.dtype]
    bound = 2.02 * u * (normed.abs() @ wd.abs().t()) + 2 * u * y_ref.double().abs()
    assert ((y.double() - y_ref.double()).abs() <= bound + 1e-6).all()


def test_norm_fp8_gemv_takes_one_row_of_one_wide_step():
    # by the heuristic's tiles: many rows (one program a 32-row tile under the interpreter)
    x, w, norm = _case(2, 32 * 132, 256, torch.bfloat16, True, seed=9)
    wq, ws = fp8.weight_quant_ref(w.float())
    assert not norm_fp8_gemv_fits(x, wq)  # two rows
    with pytest.raises(ValueError, match=r"x \(2, 256\): norm_fp8_gemv takes one row"):
        norm_fp8_gemv(x, wq, ws, norm)
    assert norm_fp8_gemv_fits(x[:1].contiguous(), wq)
    assert not norm_fp8_gemv_fits(x[:1].contiguous(), wq[:7])  # few tiles: K split to 1 block
    wide_x, wide_w, _ = _case(1, 64, 17 * 128, torch.bfloat16, False, seed=9)
    assert not norm_fp8_gemv_fits(wide_x, fp8.weight_quant_ref(wide_w.float())[0])  # 17 blocks
    small_x, small_w, _ = _case(1, 64, 128, torch.bfloat16, False, seed=9)
    assert not norm_fp8_gemv_fits(small_x, fp8.weight_quant_ref(small_w.float())[0])  # 1 block


@pytest.mark.parametrize("q_lora", [True, False])
def test_decoder_layer_folds_its_input_norm_into_the_merged_projection(monkeypatch, q_lora):
    """A tiny() decoder layer (merged q / kv_a projection) at 3 decode rows in bf16 with
    MOERAY_FUSED_NORM_GEMV=1, gemv standing in for CUDA's dispatch under the interpreter: the
    input norm does not run, the deferred residual sum is bit-equal and the output equal to the
    unfolded layer's up to the norm's rounding; with and without a q LoRA (Moonlight has none)."""
    cfg = tiny() if q_lora else tiny().replace(q_lora_rank=None)
    torch.manual_seed(0)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(4, 5).expand(3, 1))
    x = torch.randn(3, 1, cfg.hidden_size).bfloat16()
    delta = torch.randn(3, 1, cfg.hidden_size).bfloat16()
    layer = DecoderLayer(cfg, 1)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        layer.input_layernorm.weight.add_(1)
    layer = layer.bfloat16().eval()
    assert merge_projections(layer)["self_attn"] is None
    real_applies = gemv_module.gemv_applies
    monkeypatch.setattr(
        gemv_module,
        "gemv_applies",
        lambda x, w, b: real_applies(x, w, b) or (b is None and x.numel() // x.shape[-1] <= 4),
    )
    calls: list = []
    norm = layer.input_layernorm
    monkeypatch.setattr(
        norm, "add_forward", lambda *a, f=norm.add_forward: calls.append(a) or f(*a)
    )
    with torch.no_grad():
        monkeypatch.setenv("MOERAY_FUSED_NORM_GEMV", "1")
        h, out = layer(x, cos, sin, delta_BSD=delta, defer=True)
        assert not calls
        monkeypatch.setenv("MOERAY_FUSED_NORM_GEMV", "0")
        h_ref, ref = layer(x, cos, sin, delta_BSD=delta, defer=True)
        assert len(calls) == 1
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)


def test_fp8_linear_folds_the_norm_for_one_decode_row(monkeypatch):
    """FP8Linear.norm_forward: the wide-step fp8_gemv with the norm in its prologue for one row on
    CUDA (the property stands in under the interpreter), None for two rows, on CPU, or with the
    switch off."""
    n, k = 32 * 132, 256  # enough 32-row interpreter tiles that K is one wide step unsplit
    x, w, norm = _case(1, n, k, torch.bfloat16, True, seed=4)
    layer = FP8Linear(*fp8.weight_quant_ref(w.float()))
    monkeypatch.setenv("MOERAY_FUSED_NORM_GEMV", "1")
    assert layer.norm_forward(x, norm) is None  # CPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    y, h = layer.norm_forward(x, norm)
    ref = norm_fp8_gemv_ref(x, layer.weight, layer.weight_scale_inv, norm)
    assert torch.equal(h, ref[1])
    torch.testing.assert_close(y, ref[0], rtol=2e-2, atol=2e-2)
    x2, _, norm2 = _case(2, n, k, torch.bfloat16, True, seed=4)
    assert layer.norm_forward(x2, norm2) is None
    monkeypatch.setenv("MOERAY_FUSED_NORM_GEMV", "0")
    assert layer.norm_forward(x, norm) is None


@pytest.mark.gpu
def test_norm_gemvs_compiled_on_gpu(compiled_check):
    compiled_check(
        """
import torch
from moeray.kernels import fp8
from moeray.kernels.fp8.norm_gemv import norm_fp8_gemv, norm_fp8_gemv_fits, norm_fp8_gemv_ref
from moeray.kernels.gemv import norm_gemv, norm_gemv_ref
from moeray.kernels.prenorm import PreNorm
bad = 0
# Moonlight's merged q + kv_a (3,648 x 2,048), V3's q_a + kv_a (2,112 x 7,168), odd shapes
for n, k in ((3648, 2048), (2112, 7168), (1000, 200), (576, 2048)):
    for m in (1, 3, 4):
        for res in (False, True):
            x = torch.randn(m, k, device="cuda").bfloat16()
            r = torch.randn(m, k, device="cuda").bfloat16() if res else None
            nw = (1 + 0.2 * torch.randn(k, device="cuda")).bfloat16()
            w = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16()
            norm = PreNorm(nw, 1e-6, r)
            normed = norm.ref(x)[0].double()
            for name in ("gemv", "fp8"):
                if name == "gemv":
                    (y, h), (yr, hr) = norm_gemv(x, w, norm), norm_gemv_ref(x, w, norm)
                    wd = w.double()
                else:
                    wq, ws = fp8.weight_quant(w)
                    if not norm_fp8_gemv_fits(x, wq):
                        continue
                    ws_c = fp8.fp8_gemv_workspace(n, 1, "cuda")
                    y, h = norm_fp8_gemv(x, wq, ws, norm, workspace=ws_c)
                    yr, hr = norm_fp8_gemv_ref(x, wq, ws, norm)
                    wd = fp8.weight_dequant(wq, ws).double()
                u = 2 ** -7
                bound = 2.02 * u * (normed.abs() @ wd.abs().t()) + 2 * u * yr.double().abs()
                err = (y.double() - yr.double()).abs()
                ok = torch.equal(h, hr) and bool((err <= bound + 1e-6).all())
                bad += not ok
                print(name, n, k, m, res, "ok" if ok else "MISMATCH",
                      "y bit-equal share", round(float((y == yr).float().mean()), 4))
print("RESULT PASS" if bad == 0 else f"RESULT FAIL {bad}")
""",
        "norm-gemv-gpu.log",
    )
