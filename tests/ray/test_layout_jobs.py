"""The Ray Train job (`moeray train`'s entry point) on data parallel only (two gloo workers); one
device runs in test_finetune_job.py, expert parallel only in test_train_job.py.
The first step's loss equals one process on the same global batch, the loss falls, and the final
HF directory loads and holds the last checkpoint's weights."""

import json

import pytest


@pytest.mark.ray
@pytest.mark.slow
def test_job_trains_data_parallel(ray_local, tmp_path, tiny_train_job, check_first_step):
    import torch

    from moeray.platform.checkpoint import load_model
    from moeray.platform.train.job import run

    job = tiny_train_job("flat", seed=4, parallel={"dp": 2})
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
