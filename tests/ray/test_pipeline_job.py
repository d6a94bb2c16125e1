"""The Ray Train job with PP=2 (DualPipe, 2 gloo workers): a few steps, a checkpoint, the final HF
directory; the first step's loss is the single-process loss of the same global batch."""

import json

import pytest


@pytest.mark.ray
@pytest.mark.slow
def test_pipeline_job_trains_and_writes_the_model(ray_local, tmp_path, check_first_step):
    import torch

    from moeray.platform.checkpoint import load_model
    from moeray.platform.train.job import run
    from moeray.platform.train.job_config import TrainJobConfig

    job = TrainJobConfig.from_dict(
        {
            "model": "tiny",
            "name": "pptest",
            "storage": str(tmp_path),
            "output": "model",
            "steps": 4,
            "log_every": 1,
            "checkpoint_every": 2,
            "max_failures": 0,
            "seed": 3,
            "router_name": f"router-{tmp_path.name}",
            "parallel": {"pp": 2, "ep": 1, "dp": 1, "schedule": "dualpipe", "microbatches": 4},
            "data": {"max_bytes": 300_000, "seq_len": 32, "global_batch": 4},
            "optim": {"warmup_steps": 1},
        }
    )
    out = run(job)

    run_dir = tmp_path / "pptest"
    recs = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    assert [r["position"] for r in recs] == [0, 4, 8, 12]
    # step 0 runs the initial weights (seed 3, zero biases) on global batch 0: the pipeline's
    # loss equals one process computing the whole batch
    check_first_step(job, run_dir, recs[0])
    assert all(r["grad_norm"] > 0 and r["maxvio"] >= 0 for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"]
    ckpts = sorted(run_dir.glob("step_*"))
    assert [c.name for c in ckpts] == ["step_0000001", "step_0000003"]
    assert all((ckpts[-1] / f"rank{r}.pt").exists() for r in range(2))

    # the final directory merges both stages (and both DualPipe copies agree)
    cfg, model = load_model(out)
    assert cfg.vocab_size == 1024 and (out / "tokenizer.json").exists()
    saved = [torch.load(ckpts[-1] / f"rank{r}.pt", weights_only=False)["model"] for r in range(2)]
    for k, v in saved[0].items():  # DualPipe: every parameter on both ranks, kept identical
        assert torch.equal(v, saved[1][k]), k
    full = model.state_dict()
    assert set(saved[0]) == set(full)
    for k, v in saved[0].items():
        assert torch.equal(full[k].float(), v.float()), k
