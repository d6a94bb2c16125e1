"""`moeray bench engine` pieces on the GPU: a random FP8 model (built on the device, e4m3 + 128x128
scales) through the FP8 GEMM and fused FP8 MoE against its dequantized bf16 weights, and a short
bench run whose profile sees the kernels of the CUDA-graph replays. Marker gpu."""

import json

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _cfg():
    from moeray.platform.config import small

    # widths multiples of 128, so every FP8 GEMM and the fused FP8 MoE apply (kv_a_proj's 576
    # rows take the dequantizing fallback, as at the real shapes)
    return small().replace(
        num_hidden_layers=3, moe_intermediate_size=256, vocab_size=4096, eos_token_id=None
    )


def test_random_fp8_model_on_gpu_close_to_its_dequantized_weights(tmp_path):
    from moeray.platform.checkpoint import load_model, save_model
    from moeray.platform.engine.bench.model import random_model

    cfg = _cfg()
    fp8 = random_model(cfg, "cuda", torch.bfloat16, fp8=True, seed=1)
    save_model(fp8, cfg, tmp_path)
    _, deq = load_model(tmp_path, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (4, 33), device="cuda")
    with torch.no_grad():
        a = fp8(ids).logits.float()
        b = deq(ids).logits.float()
    assert torch.isfinite(a).all()
    # activations are quantized per 1x128 group on the FP8 path: close, not equal
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1)
    assert (cos > 0.99).all(), cos
    # argmax may flip only where the bf16 model's top-2 margin is within the FP8 error: random
    # weights leave many near-ties (86% overall agreement on an H200)
    top2 = b.topk(2, dim=-1).values
    err = (a - b).pow(2).mean(-1).sqrt()
    sure = (top2[..., 0] - top2[..., 1]) > 4 * err  # ~3 sigma of the difference of two errors
    assert sure.float().mean() > 0.05, sure.float().mean()  # not vacuous: some clear margins
    assert (a.argmax(-1) == b.argmax(-1))[sure].all()


def test_bench_fp8_profile_sees_graph_kernels(tmp_path):
    from moeray.platform.engine import bench

    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(_cfg().to_hf()))
    rc = bench.main(
        [
            "--config", str(cfg_path), "--weights", "fp8", "--mtp-train-steps", "0",
            "--batch-sizes", "1,8", "--decode-tokens", "8", "--profile-steps", "4",
            "--skip", "prefill,router-ab", "--device", "cuda", "--out-dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert rc == 0
    (path,) = tmp_path.glob("engine-*.json")
    r = json.loads(path.read_text())
    assert r["engine"]["cuda_graphs"] == "captured"
    # decode graphs and, by default, the prefill-chunk buckets, all captured at the start
    assert r["engine"]["graphs"]["main"] > 0 and r["engine"]["graphs"]["chunk"] > 0
    assert r["engine"]["engine_build_s"] > 0
    for B in ("1", "8"):
        prof = r["decode_profile"][B]
        # graph replays' kernels, not only the step's few launches outside its graph: after
        # the decode fusions 57 a step at batch 1 (19 a layer) on an H100
        assert prof["kernels_per_step"] > 3 * 10, prof
        assert {"gemm", "moe", "attention"} <= set(prof["by_category"]), prof["by_category"]
        assert 0 < r["roofline_fraction"][B] < 1
        # the forward alone is part of the step: shorter, and nearer the roofline
        graph, step = r["decode_graph_ms"][B], r["decode_step_ms"][B]
        assert 0 < graph < step, (graph, step)
        assert r["decode_outside_graph_ms"][B] == pytest.approx(step - graph)
        assert r["roofline_fraction"][B] < r["roofline_fraction_graph"][B] < 1
