"""The Ray Train job (`moeray train`'s entry point) on the layouts without a pipeline: one device
(one gloo worker) and data parallel only (two); expert parallel only runs in test_train_job.py.
The first step's loss equals one process on the same global batch, the loss falls, and the final
HF directory loads."""

import json

import pytest


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("layout", [{}, {"dp": 2}], ids=["one-device", "dp2"])
def test_job_trains_without_a_pipeline(ray_local, tmp_path, layout, check_first_step):
    import torch

    from moeray.platform.checkpoint import load_model
    from moeray.platform.train.job import run
    from moeray.platform.train.job_config import TrainJobConfig

    job = TrainJobConfig.from_dict(
        {
            "model": "tiny",
            "name": "flat",
            "storage": str(tmp_path),
            "output": "model",
            "steps": 3,
            "log_every": 1,
            "checkpoint_every": 3,
            "max_failures": 0,
            "seed": 4,
            "router_name": f"router-{tmp_path.name}",
            "parallel": layout,
            "data": {"max_bytes": 300_000, "seq_len": 32, "global_batch": 4},
            "optim": {"warmup_steps": 1},
        }
    )
    out = run(job)

    run_dir = tmp_path / "flat"
    recs = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2]
    check_first_step(job, run_dir, recs[0])
    assert recs[-1]["loss"] < recs[0]["loss"]

    cfg, model = load_model(out)
    assert cfg.vocab_size == 1024 and (out / "tokenizer.json").exists()
    saved = torch.load(run_dir / "step_0000002" / "rank0.pt", weights_only=False)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v.float(), saved[k].float()), k
