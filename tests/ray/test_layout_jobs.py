"""The Ray Train job (`moeray train`'s entry point) on the layouts without a pipeline: one device
(one gloo worker) and data parallel only (two); expert parallel only runs in test_train_job.py.
The first step's loss equals one process on the same global batch, the loss falls, and the final
HF directory loads and holds the last checkpoint's weights."""

import json

import pytest


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("layout", [{}, {"dp": 2}], ids=["one-device", "dp2"])
def test_job_trains_without_a_pipeline(
    ray_local, tmp_path, layout, tiny_train_job, check_first_step
):
    import torch

    from moeray.platform.checkpoint import load_model
    from moeray.platform.train.job import run

    job = tiny_train_job("flat", seed=4, parallel=layout)
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
