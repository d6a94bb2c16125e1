"""The split-KV MLA decode's merge with W_UV folded in (moeray.kernels.mla_merge.mla_merge_out)
under the interpreter: the merge kernel followed by the per-head product, to the bit, at odd shapes
(3 heads x 2 tokens, 3 splits padded to 4, a row whose splits are all empty, W_UV as the model's
transposed view); mla_decode_multi's choice (few query tokens and MOERAY_FUSED_MLA_WUV not 0, the
default: one merge launch; else the latent and head_matmul, the model's own product); the bad W_UV
values it names; the tiny model's greedy tokens through the engine's paged view with the switch on
and off."""

import pytest
import torch

from moeray.kernels import mla_decode as decode_mod
from moeray.kernels import mla_merge
from moeray.kernels.head_gemv import head_matmul
from moeray.kernels.mla_merge import (
    MERGE_OUT_MAX_ROWS,
    check_w_out,
    mla_merge_out,
    mla_merge_out_ref,
)
from moeray.platform.config import tiny
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer
from tests.kernels.test_mla_decode import _paged_case

B, H, S, C, NOPE = 2, 3, 2, 64, 8
SPLITS, NS = 3, 4  # the partials' splits, padded to a power of two in the kernel


def _w_uv(v: int, heads: int = H, c: int = C, dtype=torch.bfloat16, seed: int = 0):
    """W_UV [H, C, V] as MLA takes it: kv_b_proj's weight viewed [H, N + V, C], its V rows
    transposed (C contiguous), each head different."""
    g = torch.Generator().manual_seed(seed)
    kv_b = torch.randn(heads * (NOPE + v), c, generator=g).to(dtype)
    return kv_b.view(heads, NOPE + v, c)[:, NOPE:].transpose(1, 2)


def _partials(seed: int = 1):
    """Split partials o [B, S*H, NS, C] and lse [B, S*H, NS] as the split kernel leaves them, with
    the padding split NS-1 poisoned (a read of it shows), one split of row (0, 2) and all of row
    (1, 4) empty (lse -inf, output 0)."""
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(B, S * H, NS, C, generator=g)
    lse = torch.randn(B, S * H, NS, generator=g) * 3
    o[:, :, SPLITS:] = float("nan")
    lse[:, :, SPLITS:] = 100.0
    lse[0, 2, 1] = float("-inf")
    o[0, 2, 1] = 0.0
    lse[1, 4, :SPLITS] = float("-inf")
    o[1, 4, :SPLITS] = 0.0
    return o, lse


@pytest.mark.parametrize("fresh_w", [False, True])
@pytest.mark.parametrize("v", [16, 32])
def test_merge_out_is_the_merge_then_w_uv(v, fresh_w, nan_empty):
    """mla_merge_out's o_v and lse: mla_merge's latent (rounded to bf16 as it stores it) times
    W_UV[r % H] in fp32, rounded once, to the bit; every output written (NaN-poisoned first)."""
    nan_empty(mla_merge)
    o, lse = _partials()
    w = _w_uv(v)
    assert not w.is_contiguous()
    out, lse_out = mla_merge_out(o, lse, w, torch.bfloat16, SPLITS, NS, fresh_w=fresh_w)
    lat = torch.empty(B, S * H, C, dtype=torch.bfloat16)
    lse_lat = torch.empty(B, S * H)
    mla_merge.mla_merge(o, lse, lat, lse_lat, SPLITS, NS)
    assert out.shape == (B, S * H, v) and out.dtype == torch.bfloat16
    assert torch.equal(out, mla_merge_out_ref(lat, w))
    assert torch.equal(lse_out, lse_lat)
    assert lse_out[1, 4] == float("-inf") and not out[1, 4].any()  # all splits empty: 0
    assert torch.isfinite(lse_out[0, 2]) and out[0].abs().sum(-1).gt(0).all()
    # the ref itself: head r % H (row r = s * H + h)
    lat32 = lat.float()
    assert torch.equal(
        mla_merge_out_ref(lat, w)[0, H + 1], (lat32[0, H + 1] @ w[1].float()).bfloat16()
    )


def test_bad_w_out_is_named():
    w = _w_uv(16)
    check_w_out(w, H, C, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"w_out has dtype torch\.float32; accepted: torch\.bf"):
        check_w_out(w.float(), H, C, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"w_out must have 3 dims, got shape \(3, 64\)"):
        check_w_out(w[:, :, 0], H, C, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"w_out has shape \(2, 64, 16\): need \[3, 64, V >= 1\]"):
        check_w_out(w[:2], H, C, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"w_out has shape \(3, 32, 16\): need \[3, 64"):
        check_w_out(w[:, :32], H, C, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match="w_out is on meta"):
        check_w_out(w.to("meta"), H, C, torch.bfloat16, torch.device("cpu"))
    o, lse = _partials()
    for v in (8, 24):
        with pytest.raises(ValueError, match=f"V = {v}: must be a power of two >= 16"):
            mla_merge_out(o, lse, _w_uv(v), torch.bfloat16, SPLITS, NS)
    q, kv, table, lens = _paged_case([20, 5], heads=H, r=C, p=16, page=16, seed=4)
    with pytest.raises(ValueError, match=r"w_out has shape \(2, 64, 16\)"):
        decode_mod.mla_decode_multi(q, kv, table, lens, 0.3, kv_lora_rank=C, w_out=w[:2])


def _decode_case(lens, s_q, v=16):
    q, kv, table, lens_t = _paged_case(lens, heads=H, r=C, p=16, page=16, seed=5, s_q=s_q)
    return (q, kv, table, lens_t, 0.3), _w_uv(v, seed=6)


@pytest.mark.parametrize(("lens", "s_q"), [([37, 1, 80, 16], 1), ([37, 5], 2)])
def test_decode_folds_w_uv_into_the_merge(lens, s_q, monkeypatch, launch_spy):
    """mla_decode_multi with w_out at B * S = 4 query tokens (MERGE_OUT_MAX_ROWS): with
    MOERAY_FUSED_MLA_WUV=0, the latent then head_matmul, to the bit; by default, one merge launch
    applying W_UV (no plain merge): the same lse, the latent's product to the bit, within a bf16
    rounding of head_matmul's."""
    assert len(lens) * s_q == MERGE_OUT_MAX_ROWS
    args, w = _decode_case(lens, s_q)
    kw = dict(kv_lora_rank=C, num_splits=3, return_lse=True)
    merges = launch_spy(mla_merge, "_mla_merge_kernel")
    folds = launch_spy(mla_merge, "_mla_merge_out_kernel")
    monkeypatch.setenv("MOERAY_FUSED_MLA_WUV", "0")
    lat, lse = decode_mod.mla_decode_multi(*args, **kw)
    off, off_lse = decode_mod.mla_decode_multi(*args, **kw, w_out=w)
    assert torch.equal(off, head_matmul(lat, w)) and torch.equal(off_lse, lse)
    assert (len(merges), len(folds)) == (2, 0)
    monkeypatch.delenv("MOERAY_FUSED_MLA_WUV", raising=False)
    on, on_lse = decode_mod.mla_decode_multi(*args, **kw, w_out=w, fresh_w=True)
    assert (len(merges), len(folds)) == (2, 1)
    b = len(lens)
    assert on.shape == (b, s_q, H, 16) and torch.equal(on_lse, lse)
    assert torch.equal(on, mla_merge_out_ref(lat.view(b, s_q * H, C), w).view(on.shape))
    torch.testing.assert_close(on.float(), off.float(), rtol=2**-7, atol=1e-6)  # an ulp
    # mla_decode (one token) passes it on
    if s_q == 1:
        one, _ = decode_mod.mla_decode(args[0][:, 0], *args[1:], **kw, w_out=w)
        assert torch.equal(one, on[:, 0])


def test_decode_keeps_w_uv_apart_where_the_merge_does_not_fold(monkeypatch, launch_spy):
    """With MLA_WUV on the latent and head_matmul (to the bit) past
    MERGE_OUT_MAX_ROWS query tokens, for a V the kernel does not take, and on the CPU
    reference path."""
    monkeypatch.setenv("MOERAY_FUSED_MLA_WUV", "1")
    folds = launch_spy(mla_merge, "_mla_merge_out_kernel")
    cases = [
        ([37, 1, 80, 16, 9], 1, 16, 3),  # 5 query tokens
        ([37, 1], 1, 8, 3),  # V = 8
    ]
    for lens, s_q, v, splits in cases:
        args, w = _decode_case(lens, s_q, v)
        kw = dict(kv_lora_rank=C, num_splits=splits)
        want = head_matmul(decode_mod.mla_decode_multi(*args, **kw), w)
        assert torch.equal(decode_mod.mla_decode_multi(*args, **kw, w_out=w), want), lens
    assert folds == []
    args, w = _decode_case([37, 1], 1)
    monkeypatch.setattr(decode_mod, "use_triton", lambda *t: False)
    ref = decode_mod.mla_decode_multi(*args, kv_lora_rank=C, w_out=w)
    lat = decode_mod.mla_decode_multi(*args, kv_lora_rank=C)
    assert torch.equal(ref, head_matmul(lat, w)) and folds == []


def test_engine_greedy_same_with_w_uv_in_the_merge(monkeypatch, launch_spy):
    """tiny() in bf16 through the engine's paged view (attention="kernel", the interpreter
    standing in for CUDA; MLA hands the view its W_UV) with MOERAY_FUSED_MLA_WUV=1 and 0:
    the same greedy tokens and their logprobs within bf16 rounding, the merge applying W_UV at
    decode (2 sequences) only when set. Dense layers only: the interpreter's MoE would take most
    of the time."""
    cfg = tiny().replace(
        num_hidden_layers=2, first_k_dense_replace=2, vocab_size=256, eos_token_id=None
    )
    model = Transformer(cfg)
    model.reset_parameters(seed=1)
    with torch.no_grad():  # wide logit margins: greedy choices robust to rounding
        model.lm_head.weight.mul_(30.0)
    model = model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 20)]
    folds = launch_spy(mla_merge, "_mla_merge_out_kernel")
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=0)
    config = EngineConfig(page_size=16, num_pages=8, max_model_len=64, attention="kernel")
    tokens, logprobs, launches = {}, {}, {}
    for on in (False, True):
        monkeypatch.setenv("MOERAY_FUSED_MLA_WUV", "1" if on else "0")
        outs = Engine(model, config).generate(prompts, params)
        tokens[on] = [o.output_token_ids for o in outs]
        logprobs[on] = torch.tensor([[lp.logprob for lp in o.logprobs] for o in outs])
        launches[on] = len(folds)
    # 5 decode steps (the prefill chunk's token, then 5 more) x 2 layers
    assert launches == {False: 0, True: 10}
    assert all(len(t) == 6 for t in tokens[True]) and tokens[True] == tokens[False]
    torch.testing.assert_close(logprobs[True], logprobs[False], rtol=0, atol=0.05)
