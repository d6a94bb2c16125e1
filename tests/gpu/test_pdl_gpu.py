"""Programmatic dependent launch (PDL, kernels/common.py's `pdl_launch`) on the GPU (marker gpu;
skipped without a CUDA GPU of compute capability >= 9.0). A PDL kernel may start before the kernel
ahead of it ends; these tests would catch one that reads its input before its gdc_wait. Each runs
chains of dependent launches (the output of one kernel is the input of the next) with
MOERAY_FUSED_PDL=1 and =0, eagerly and captured in a CUDA graph replayed on new inputs, and asks
for the same outputs to the bit (torch.equal) as the plain eager chain:
- 20 gemvs (bf16; one launch each, and split-K with its reduce kernel);
- 20 fp8_gemvs sharing one split-K tile-counter workspace (broadcast and dot inner products; at
  one row also the wide step, by default where K is one step and with
  MOERAY_FUSED_FP8_GEMV_WIDE=1 everywhere);
- decode-like MoE layers: fused add + RMSNorm (also with its weight read before its wait,
  MOERAY_FUSED_NORM_W_EARLY=1), router logits, the fused gate, the fused MoE
  (12 assignments: moe_gemv's gate/up, down, sum, down also with MOERAY_FUSED_MOE_DOWN_EARLY=1,
  which reads the gate's ids two launches back before its wait; with MOERAY_FUSED_MOE_GEMV=0 the
  aligned moe_align, gate/up, down, sum, FP8 weights adding act_quant), gemv, SwiGLU, fp8_gemv;
- MLA decode layers: gemv, mla_write_pack (latent norm + rope into the paged cache),
  mla_decode (split kernel + merge; also with W_UV in the merge, MLA_WUV's default), gemv;
  the caches compared too.
And the engine's greedy tokens on test_merge_projections_gpu's model (bf16, FP8; decode in CUDA
graphs) are the same with MOERAY_FUSED_PDL=1 and =0."""

import os
from itertools import pairwise

import pytest
import torch

from tests.gpu import test_merge_projections_gpu as merge_gpu


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not _sm90(), reason="PDL needs compute capability >= 9.0"),
]

# fp32 Triton dots default to TF32 (the engine's other kernels): IEEE keeps fp32 paths comparable.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

REPLAYS = 4  # new inputs per chain: a read before the wait would see the previous ones


def _set_pdl(monkeypatch, on: bool) -> None:
    from moeray.kernels.common import pdl_launch

    monkeypatch.setenv("MOERAY_FUSED_PDL", "1" if on else "0")
    assert pdl_launch(torch.device("cuda")) == on


def _inputs(x0: torch.Tensor) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(7)
    return [
        torch.randn(x0.shape, device="cuda", generator=g).to(x0.dtype) * (1 + i)
        for i in range(REPLAYS)
    ]


def _eager(chain, x0: torch.Tensor, monkeypatch, pdl: bool) -> list[list[torch.Tensor]]:
    """chain()'s outputs (copies) for each of `_inputs(x0)` written into x0, launched eagerly."""
    _set_pdl(monkeypatch, pdl)
    outs = []
    for x in _inputs(x0):
        x0.copy_(x)
        outs.append([t.clone() for t in chain()])
    torch.cuda.synchronize()
    return outs


def _graphed(chain, x0: torch.Tensor, monkeypatch, pdl: bool) -> list[list[torch.Tensor]]:
    """The same from one CUDA graph of chain(), replayed for each input."""
    _set_pdl(monkeypatch, pdl)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # compiles this PDL setting's kernels outside the capture
        chain()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = chain()
    outs = []
    for x in _inputs(x0):
        x0.copy_(x)
        graph.replay()
        outs.append([t.clone() for t in static])
    torch.cuda.synchronize()
    return outs


def _check_chain(chain, x0: torch.Tensor, monkeypatch) -> None:
    """PDL on (eager and graphed) and off (graphed) give the plain eager chain's outputs."""
    want = _eager(chain, x0, monkeypatch, pdl=False)
    for i, outs in enumerate(want):
        assert all(torch.isfinite(t.float()).all() for t in outs), i
        if i:
            assert not torch.equal(outs[-1], want[0][-1]), i  # each input reaches the end
    for name, got in (
        ("pdl eager", _eager(chain, x0, monkeypatch, pdl=True)),
        ("pdl graph", _graphed(chain, x0, monkeypatch, pdl=True)),
        ("plain graph", _graphed(chain, x0, monkeypatch, pdl=False)),
    ):
        for i, (outs, ref) in enumerate(zip(got, want, strict=True)):
            for j, (a, b) in enumerate(zip(outs, ref, strict=True)):
                assert torch.equal(a, b), f"{name}: input {i}, output {j} differs"


def _randn(g, *shape, scale=1.0, dtype=torch.bfloat16):
    return (torch.randn(shape, device="cuda", generator=g) * scale).to(dtype)


@pytest.mark.parametrize(
    "dims",
    [
        [3000] * 21,  # 750 programs, BLOCK_K 2048 (M = 1): the prefetched step, then the loop's
        [3000, 100] * 10 + [3000],  # N = 100 < SMs: split-K + the reduce kernel; ragged K
    ],
    ids=["square", "split"],
)
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_chain(dims, m, monkeypatch):
    from moeray.kernels.gemv import gemv

    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [_randn(g, n, k, scale=k**-0.5) for k, n in pairwise(dims)]
    x0 = torch.empty(m, dims[0], device="cuda", dtype=torch.bfloat16)

    def chain():
        xs = [x0]
        for w in ws:
            xs.append(gemv(xs[-1], w))
        return xs[1:]

    _check_chain(chain, x0, monkeypatch)


@pytest.mark.parametrize(
    # broadcast 1 x 8 and 4 x 16 tiles; dot 16 x 64; at M = 1 the wide step's 4 x 16 blocks:
    # by default at K = 600 (one step) between 1 x 8 tiles at K = 4100, "all" at every K
    # (MOERAY_FUSED_FP8_GEMV_WIDE=1), "none" nowhere (MOERAY_FUSED_FP8_GEMV_ONE_STEP=0)
    "m,wide",
    [(1, "none"), (3, "default"), (8, "default"), (1, "default"), (1, "all")],
)
def test_fp8_gemv_chain(m, wide, monkeypatch):
    from moeray.kernels.fp8 import fp8_gemv, fp8_gemv_workspace, weight_quant

    monkeypatch.setenv("MOERAY_FUSED_FP8_GEMV_WIDE", "1" if wide == "all" else "0")
    monkeypatch.setenv("MOERAY_FUSED_FP8_GEMV_ONE_STEP", "0" if wide == "none" else "1")

    dims = [600, 4100] * 10 + [600]  # serial split-K both ways (11 and 3 splits at M = 1), ragged
    g = torch.Generator(device="cuda").manual_seed(1)
    ws = [weight_quant(_randn(g, n, k, scale=k**-0.5)) for k, n in pairwise(dims)]
    # One workspace for all: each launch's counters must be back at zero before the next uses
    # them, which with PDL holds only if every counter access comes after the wait.
    workspace = fp8_gemv_workspace(max(dims), 16, device="cuda")
    x0 = torch.empty(m, dims[0], device="cuda", dtype=torch.bfloat16)

    def chain():
        xs = [x0]
        for wq, s in ws:
            xs.append(fp8_gemv(xs[-1], wq, s, workspace=workspace))
        return xs[1:]

    _check_chain(chain, x0, monkeypatch)
    assert not workspace.any()


@pytest.mark.parametrize(
    "moe_gemv,down_early,norm_early",  # MOE_DOWN_EARLY: down's ids and first step before the
    [("1", "0", "0"), ("0", "0", "0"), ("1", "1", "0"), ("1", "0", "1")],  # wait; NORM_W_EARLY:
)  # the norm's weight before its wait
@pytest.mark.parametrize("fp8_moe", [False, True])
def test_decode_moe_layer_chain(fp8_moe, moe_gemv, down_early, norm_early, monkeypatch):
    from moeray.kernels.fp8 import fp8_gemv, fp8_gemv_workspace, weight_quant
    from moeray.kernels.gate import moe_gate
    from moeray.kernels.gemv import gemv
    from moeray.kernels.moe import fused_moe_gate_up
    from moeray.kernels.norm import rms_norm
    from moeray.kernels.router_logits import router_logits
    from moeray.kernels.swiglu import swiglu

    monkeypatch.setenv("MOERAY_FUSED_MOE_GEMV", moe_gemv)
    monkeypatch.setenv("MOERAY_FUSED_MOE_DOWN_EARLY", down_early)
    monkeypatch.setenv("MOERAY_FUSED_NORM_W_EARLY", norm_early)
    t, h, i, e, inter = 3, 384, 256, 16, 300  # tokens, hidden, expert width, experts, MLP width
    g = torch.Generator(device="cuda").manual_seed(2)
    layers = []
    for _ in range(4):
        p = {
            "norm": 1 + _randn(g, h, scale=0.1),
            "router": _randn(g, e, h, scale=h**-0.5),
            "bias": torch.rand(e, device="cuda", generator=g) * 0.1,
            "w1": _randn(g, e, i, h, scale=h**-0.5),
            "w3": _randn(g, e, i, h, scale=h**-0.5),
            "w2": _randn(g, e, h, i, scale=i**-0.5),
            "gu": _randn(g, 2 * inter, h, scale=h**-0.5),
            "down": weight_quant(_randn(g, h, inter, scale=inter**-0.5)),
        }
        if fp8_moe:  # [E, N, K] as one [E * N, K] matrix: N is a multiple of 128 (whole blocks)
            for name in ("w1", "w3", "w2"):
                w = p[name]
                q, s = weight_quant(w.reshape(-1, w.shape[-1]))
                p[name], p[f"{name}_scale"] = q.view(w.shape), s.view(e, -1, s.shape[-1])
        layers.append(p)
    workspace = fp8_gemv_workspace(h, 16, device="cuda")
    x0 = torch.empty(t, h, device="cuda", dtype=torch.bfloat16)
    res0 = _randn(g, t, h)

    def chain():
        x, res, outs = x0, res0, []
        for p in layers:
            y, res = rms_norm(x, p["norm"], 1e-6, res)
            r = moe_gate(
                router_logits(y, p["router"]),
                p["bias"],
                top_k=4,
                n_group=4,
                topk_group=2,
                routed_scaling_factor=2.5,
            )
            scales = {k: p.get(f"{k}_scale") for k in ("w1", "w3", "w2")}
            moe = fused_moe_gate_up(
                y,
                p["w1"],
                p["w3"],
                p["w2"],
                r.expert_ids_TK,
                r.weights_TK,
                w1_scale=scales["w1"],
                w3_scale=scales["w3"],
                w2_scale=scales["w2"],
            )
            gu = gemv(moe, p["gu"])
            x = fp8_gemv(swiglu(gu[:, :inter], gu[:, inter:]), *p["down"], workspace=workspace)
            outs += [r.expert_ids_TK, r.weights_TK, moe, x, res]
        return outs

    _check_chain(chain, x0, monkeypatch)


@pytest.mark.parametrize("mode", ["latent", "wuv"])
def test_mla_decode_layer_chain(monkeypatch, mode):
    """wuv: mla_decode takes W_UV with MOERAY_FUSED_MLA_WUV on (3 query tokens, within
    MERGE_OUT_MAX_ROWS): its merge launch applies it, reading W's slice before its wait."""
    from moeray.kernels import mla_decode as decode_mod
    from moeray.kernels.gemv import gemv
    from moeray.kernels.mla_decode import mla_decode
    from moeray.kernels.mla_merge import MERGE_OUT_MAX_ROWS
    from moeray.kernels.mla_write import mla_write_pack

    wuv = mode == "wuv"
    b, d, heads, c, r, page = 3, 96, 4, 64, 16, 16  # sequences, width, heads, latent, rope, page
    v = 32 if wuv else c  # value dims a head after W_UV (o_proj's input), or the latent's
    assert b <= MERGE_OUT_MAX_ROWS
    folds = []
    if wuv:
        monkeypatch.setenv("MOERAY_FUSED_MLA_WUV", "1")
        real_fold = decode_mod.mla_merge_out
        monkeypatch.setattr(
            decode_mod, "mla_merge_out", lambda *a, **k: folds.append(1) or real_fold(*a, **k)
        )
    lens = [37, 5, 70]  # cached tokens including the new one
    max_pages, num_pages = 8, 24
    g = torch.Generator(device="cuda").manual_seed(3)
    block_table = torch.randperm(num_pages, device="cuda", generator=g)[: b * max_pages]
    block_table = block_table.view(b, max_pages).to(torch.int32)
    seq_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    pos = seq_lens.long() - 1
    slots = block_table.long().gather(1, (pos // page)[:, None]).squeeze(1) * page + pos % page
    angles = pos[:, None].float() * torch.arange(1, r // 2 + 1, device="cuda")[None, :] * 0.1
    rope = (angles.cos().view(b, 1, r // 2), angles.sin().view(b, 1, r // 2))
    layers = [
        {
            "q": _randn(g, heads * (c + r), d, scale=d**-0.5),
            "kv": _randn(g, c + r, d, scale=d**-0.5),
            "o": _randn(g, d, heads * v, scale=(heads * v) ** -0.5),
            "norm": 1 + _randn(g, c, scale=0.1),
            "cache": _randn(g, num_pages, page, c + r),
            # W_UV [heads, c, v] as MLA passes it: kv_b_proj's rows [heads, 8 + v, c] transposed
            "w_uv": _randn(g, heads, 8 + v, c, scale=c**-0.5)[:, 8:].transpose(1, 2)
            if wuv
            else None,
        }
        for _ in range(4)
    ]
    x0 = torch.empty(b, d, device="cuda", dtype=torch.bfloat16)

    def chain():
        x, outs = x0, []
        for p in layers:
            q = gemv(x, p["q"]).view(b, 1, heads, c + r)
            kv = gemv(x, p["kv"]).view(b, 1, c + r)
            packed = mla_write_pack(
                p["cache"],
                slots,
                kv[..., :c],
                kv[..., c:],
                q[..., :c],
                q[..., c:],
                norm=(p["norm"], 1e-6),
                rope=rope,
            )
            o = mla_decode(
                packed[:, 0], p["cache"], block_table, seq_lens, (c + r) ** -0.5, c, w_out=p["w_uv"]
            )
            x = gemv(o.reshape(b, heads * v), p["o"])
            outs += [packed, o, x, p["cache"]]
        return outs

    _check_chain(chain, x0, monkeypatch)
    assert bool(folds) == wuv


@pytest.mark.parametrize("fp8,spec", [(False, 0), (True, 0), (False, 1)])
def test_engine_greedy_unchanged_by_pdl(fp8, spec, monkeypatch):
    from moeray.platform.engine.engine import Engine, EngineConfig
    from moeray.platform.engine.sampler import SamplingParams

    model = merge_gpu._model(torch.bfloat16, fp8)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    tokens, logprobs = {}, {}
    for pdl in (True, False):
        _set_pdl(monkeypatch, pdl)
        eng = Engine(
            model,
            EngineConfig(
                page_size=16, num_pages=64, max_model_len=256, num_speculative_tokens=spec
            ),
        )
        assert eng.runner.graph_status.startswith("captured"), eng.runner.graph_status
        outs = eng.generate(merge_gpu._prompts(), params)
        tokens[pdl] = [o.output_token_ids for o in outs]
        logprobs[pdl] = [[lp.logprob for lp in o.logprobs] for o in outs]
        del eng
    assert all(len(t) == 10 for t in tokens[True])
    assert tokens[True] == tokens[False]
    # the same kernels' numbers (report only: the tokens are the contract)
    diff = max(
        (
            abs(a - b)
            for pa, pb in zip(logprobs[True], logprobs[False], strict=True)
            for a, b in zip(pa, pb, strict=True)
        ),
        default=0.0,
    )
    print(f"fp8={fp8} spec={spec}: sampled-token logprobs differ by at most {diff:.3g}")
