"""The Ray Train job (`moeray train`'s entry point) with `use_gpu: true` on one GPU: PP = EP = DP
= 1, NCCL. The step's loss and gradient all-reduces and the loop's statistics run on the GPU (NCCL
has no CPU path); the first step's loss is one CPU process's on the same batch, and the final HF
directory loads. Marker gpu; skipped without CUDA."""

import json

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_one_gpu_job_trains_and_writes_the_model(tmp_path, tiny_train_job, check_first_step):
    import ray

    from moeray.platform.checkpoint import load_model
    from moeray.platform.train.job import run

    # with recompute and the CPU EMA (pinned buffers, non-blocking copies) on the GPU path
    job = tiny_train_job("onegpu", use_gpu=True, recompute=["norm", "mla_up"], ema_decay=0.9)
    try:
        out = run(job)
    finally:
        ray.shutdown()
    run_dir = tmp_path / "onegpu"
    recs = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2]
    check_first_step(job, run_dir, recs[0], rel=1e-3)  # TF32 matmuls on the GPU
    assert recs[-1]["loss"] < recs[0]["loss"]
    cfg, model = load_model(out)
    assert torch.isfinite(model(torch.randint(0, cfg.vocab_size, (1, 9))).logits).all()
    _, ema = load_model(out / "ema")
    assert torch.isfinite(ema(torch.randint(0, cfg.vocab_size, (1, 9))).logits).all()


def test_one_gpu_job_with_cuda_graphs_follows_the_eager_job(tmp_path, tiny_train_job):
    """`cuda_graphs: true`: each step's forward and backward replayed from a CUDA graph gives the
    eager job's losses step for step (gradients zeroed in place, cached weights re-made after
    every update), and writes a model that loads."""
    import ray

    from moeray.platform.checkpoint import load_model
    from moeray.platform.train.job import run

    losses = {}
    for name, graphs in (("eager", False), ("graphed", True)):
        job = tiny_train_job(name, use_gpu=True, bf16=True, cuda_graphs=graphs, steps=4)
        try:
            out = run(job)
        finally:
            ray.shutdown()
        history = (tmp_path / name / "history.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in history]
    assert len(losses["graphed"]) == 4
    assert losses["graphed"] == pytest.approx(losses["eager"], rel=1e-3)
    cfg, model = load_model(out)
    assert torch.isfinite(model(torch.randint(0, cfg.vocab_size, (1, 9))).logits).all()
