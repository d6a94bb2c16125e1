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


def test_one_gpu_job_trains_and_writes_the_model(tmp_path):
    import ray

    from moeray.platform.checkpoint import load_model
    from moeray.platform.model.transformer import Transformer
    from moeray.platform.train import data as tdata
    from moeray.platform.train import step as tstep
    from moeray.platform.train.job import run
    from moeray.platform.train.job_config import TrainJobConfig

    job = TrainJobConfig.from_dict(
        {
            "model": "tiny",
            "name": "onegpu",
            "storage": str(tmp_path),
            "output": "model",
            "steps": 3,
            "log_every": 1,
            "checkpoint_every": 3,
            "max_failures": 0,
            "use_gpu": True,
            "router_name": f"router-{tmp_path.name}",
            "data": {"max_bytes": 300_000, "seq_len": 32, "global_batch": 4},
            "optim": {"warmup_steps": 1},
        }
    )
    try:
        out = run(job)
    finally:
        ray.shutdown()
    run_dir = tmp_path / "onegpu"
    recs = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2]
    ds = tdata.PackedDataset(torch.load(run_dir / "data" / "tokens.pt"), 32)
    ref = Transformer(job.model_config())
    ref.reset_parameters(seed=job.seed)
    parts = tstep.compute_loss(ref, tdata.BatchLoader(ds, 4, seed=0).next_batch(), job.loss)
    # TF32 matmuls on the GPU: within 1e-3 of fp32 on the CPU
    assert recs[0]["loss"] == pytest.approx(parts.main, rel=1e-3)
    assert recs[-1]["loss"] < recs[0]["loss"]
    cfg, model = load_model(out)
    assert torch.isfinite(model(torch.randint(0, cfg.vocab_size, (1, 9))).logits).all()
