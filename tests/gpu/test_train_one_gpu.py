"""The one-GPU training bench's fast paths on a GPU (train/bench_one.py): the whole model with
grouped routed experts (`torch._grouped_mm` for BF16, the grouped FP8 kernel for FP8) against the
per-expert loop at odd shapes, with fewer GPU kernels; fused AdamW against torch's foreach one;
the k-grouped FP8 weight gradients against one GEMM per expert; the bench's own numbers on a
tiny-shaped model. Marker gpu."""

import json

import pytest
import torch

from moeray.platform.config import tiny
from moeray.platform.fp8 import enable_fp8_training
from moeray.platform.model.transformer import Transformer
from moeray.platform.parallel.experts_mlp import enable_grouped_experts
from moeray.platform.train import bench_one, bench_run
from moeray.platform.train import step as tstep
from moeray.platform.train.bench_common import BenchConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
DEV = torch.device("cuda", 0)
# tiny with every FP8 GEMM's K a multiple of 128 (the block-scaled kernels' group size)
CFG = tiny().replace(
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    q_lora_rank=128,
    kv_lora_rank=128,
    qk_nope_head_dim=32,
    qk_rope_head_dim=32,
    v_head_dim=32,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _run(
    fp8: bool,
    grouped: bool,
    tokens,
    counts: dict | None = None,
    kgrouped: bool = False,
    bf16_wgrad: bool = False,
):
    model = Transformer(CFG)
    model.reset_parameters(seed=0)
    if fp8:
        enable_fp8_training(model)
    if grouped:
        enable_grouped_experts(
            model, grouped_fp8=True, kgrouped_wgrad=kgrouped, bf16_wgrad=bf16_wgrad
        )
    model.to(DEV).train()
    with bench_run._profiled(counts is not None, DEV, {} if counts is None else counts, "fb"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            parts = tstep.compute_loss(model, tokens, tstep.LossConfig())
        parts.total.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return parts.main, grads


def _run_fp32(tokens):
    """The oracle: the same model and tokens in fp32 without autocast, the per-expert loop."""
    model = Transformer(CFG)
    model.reset_parameters(seed=0)
    model.to(DEV).train()
    parts = tstep.compute_loss(model, tokens, tstep.LossConfig())
    parts.total.backward()
    return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def _assert_no_farther_from_fp32(got: dict, want: dict, oracle: dict) -> None:
    """Every gradient of `got` is at most twice as far (relative) from the fp32 oracle as `want`'s,
    plus 2%. Two bf16 paths that sum in other orders differ from each other by as much as each
    differs from fp32 (2-11% in a random tiny model on the H200, where a bf16 rounding or an
    e4m3 step flips somewhere among 111 tokens), so a fixed bound between them fails on noise;
    a wrong row, expert or weight puts `got` O(1) away."""
    assert got.keys() == want.keys()
    for name, w in want.items():
        e_want, e_got = _rel(w, oracle[name]), _rel(got[name], oracle[name])
        assert e_got <= 2 * e_want + 2e-2, (name, e_got, e_want)


@pytest.mark.parametrize("fp8", [False, True])
def test_grouped_experts_equal_the_loop_with_fewer_kernels(fp8):
    # 3 x 37 tokens, top-4 of 16 experts: row counts not multiples of 16 or 128, some experts empty
    tokens = torch.randint(0, 1024, (3, 38), generator=torch.Generator().manual_seed(2)).to(DEV)
    loop_counts: dict = {}
    grouped_counts: dict = {}
    want = _run(fp8, False, tokens, loop_counts)
    got = _run(fp8, True, tokens, grouped_counts)
    assert got[0] == pytest.approx(want[0], rel=2e-3)
    # bf16 GEMM outputs in both paths, summed in other orders (FP8: re-quantized from them; the
    # activations are bf16 under autocast, model/autocast.py, so an e4m3 step can flip)
    _assert_no_farther_from_fp32(got[1], want[1], _run_fp32(tokens))
    k_loop, k_grouped = loop_counts["fb"]["gpu_kernels"], grouped_counts["fb"]["gpu_kernels"]
    assert 0 < k_grouped < k_loop, (k_grouped, k_loop)


@pytest.mark.parametrize("fp8", [False, True])
def test_fused_moe_combine_equals_torch_with_fewer_kernels(monkeypatch, fp8):
    # The grouped model with the routed experts' combine as kernels (kernels/moe_permute.py)
    # against PyTorch's index_add_
    # (MOERAY_FUSED_MOE_COMBINE=0): the combine adds the K products in k order and the shared
    # experts' output before its one rounding to bf16, PyTorch in row order (by atomic adds) and
    # after, so bf16 activations differ by a rounding step here and there (FP8: an e4m3 step can
    # flip, as in the test above).
    tokens = torch.randint(0, 1024, (3, 38), generator=torch.Generator().manual_seed(4)).to(DEV)
    torch_counts: dict = {}
    fused_counts: dict = {}
    monkeypatch.setenv("MOERAY_FUSED_MOE_COMBINE", "0")
    want = _run(fp8, True, tokens, torch_counts)
    monkeypatch.delenv("MOERAY_FUSED_MOE_COMBINE")
    got = _run(fp8, True, tokens, fused_counts)
    assert got[0] == pytest.approx(want[0], rel=2e-3)
    _assert_no_farther_from_fp32(got[1], want[1], _run_fp32(tokens))
    k_torch, k_fused = torch_counts["fb"]["gpu_kernels"], fused_counts["fb"]["gpu_kernels"]
    assert 0 < k_fused < k_torch, (k_fused, k_torch)


def test_kgrouped_weight_grads_equal_the_per_expert_gemms_with_fewer_kernels(monkeypatch):
    # both runs gather the rows (the per-expert path has no padded layout to permute into), so
    # only the weight gradients' kernels differ
    monkeypatch.setenv("MOERAY_FUSED_MOE_PADFREE", "0")
    tokens = torch.randint(0, 1024, (3, 38), generator=torch.Generator().manual_seed(3)).to(DEV)
    per_expert: dict = {}
    kgrouped: dict = {}
    want = _run(True, True, tokens, per_expert)
    got = _run(True, True, tokens, kgrouped, kgrouped=True)
    # the forward does not depend on it (up to index_add's atomic summation order)
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    for name, w in want[1].items():
        # the same e4m3 products, summed per 128-token block in another order
        assert _rel(got[1][name], w) < 1e-2, name
    k_per, k_grouped = per_expert["fb"]["gpu_kernels"], kgrouped["fb"]["gpu_kernels"]
    assert k_grouped < k_per, (k_grouped, k_per)


def test_fused_adamw_matches_foreach():
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(n, 33, device=DEV)) for n in (7, 130)]
    fused = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opts = [
        torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), foreach=True),
        torch.optim.AdamW(fused, lr=1e-2, betas=(0.9, 0.95), **tstep.adamw_impl(fused)),
    ]
    assert opts[1].defaults["fused"]
    tstep.track_fused_updates(opts[1])  # as build_optimizer and ShardedAdamW do
    version = fused[0]._version
    for _ in range(3):
        g = [torch.randn_like(p) for p in ref]
        for params, opt in zip((ref, fused), opts, strict=True):
            for p, gi in zip(params, g, strict=True):
                p.grad = gi.clone()
            opt.step()
    for a, b in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # fused AdamW alone leaves the version counter that fp8.WeightCache checks for a stale entry;
    # the hook moves it
    assert fused[0]._version > version


def test_bf16_weight_grads_of_fp8_experts_are_the_grouped_wgrad_ones(monkeypatch):
    """FP8 grouped experts with `bf16_wgrad` (the layout planned on the device, grouped_wgrad on
    the bf16 operands) against the per-expert FP8 weight gradients: the forward and every
    non-expert gradient as before; the experts' weight gradients within e4m3's rounding of
    both operands (3.3% on CPU in test_train_bench_one). Both runs gather the rows, as above."""
    monkeypatch.setenv("MOERAY_FUSED_MOE_PADFREE", "0")
    tokens = torch.randint(0, 1024, (3, 38), generator=torch.Generator().manual_seed(3)).to(DEV)
    want = _run(True, True, tokens)
    got = _run(True, True, tokens, bf16_wgrad=True)
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    for name, w in want[1].items():
        assert _rel(got[1][name], w) < (0.06 if ".experts." in name else 1e-2), name


def test_one_gpu_bench_numbers_on_tiny(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf()))
    cfg = BenchConfig(
        model=str(tmp_path / "config.json"),
        device="cuda",
        pp=1,
        steps=4,
        warmup=1,
        seq_len=64,
        microbatches=2,
        micro_batch_size=2,
    )
    res = bench_one.run(cfg)
    n_params = sum(1 for _ in Transformer(CFG).parameters())
    for name, r in res["runs"].items():
        assert r["peak_memory_bytes"] > 0 and r["tokens_per_s"] > 0, name
        assert 0 < r["mfu_measured"] < 1, name
        assert (
            r["gpu_kernels_per_step"]
            == r["gpu_kernels_forward_backward"] + r["gpu_kernels_optimizer"]
        )
        # fused AdamW and foreach clipping: far fewer kernels than parameters
        assert 0 < r["gpu_kernels_optimizer"] < n_params, (name, r["gpu_kernels_optimizer"])
        assert r["optimizer"] == "AdamW(fused=True, moments=float32)"
    assert res["fp8_bf16_loss_rel_diff"] < 2.5e-3 and res["failed_runs"] == {}
    # CUDA: the k-grouped and bf16-wgrad runs too
    assert set(res["runs"]) == {"bf16", "fp8", "fp8-kgrouped", "fp8-bf16wgrad"}
    for name in ("fp8-kgrouped", "fp8-bf16wgrad"):
        assert res["runs"][name]["loss_rel_diff_vs_bf16"] < 2.5e-3, name
