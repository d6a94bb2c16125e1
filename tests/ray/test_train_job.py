"""The Ray Train job end to end on gloo: EP=2 workers, a worker SIGKILLed mid-run, resume from the
last checkpoint with the same data order and no lost step, final HF directory that loads."""

import json

import pytest


@pytest.mark.ray
@pytest.mark.slow
def test_train_job_survives_a_killed_worker(ray_local, tmp_path):
    import torch

    from moeray.platform.checkpoint import load_model
    from moeray.platform.train.job import run
    from moeray.platform.train.job_config import TrainJobConfig

    job = TrainJobConfig.from_dict(
        {
            "model": "tiny",
            "name": "killtest",
            "storage": str(tmp_path),
            "output": "model",
            "steps": 8,
            "log_every": 1,
            "checkpoint_every": 3,
            "max_failures": 2,
            "kill_at_step": 5,
            "kill_rank": 1,
            "router_name": f"router-{tmp_path.name}",
            "parallel": {"pp": 1, "ep": 2, "dp": 1},
            "data": {"max_bytes": 300_000, "seq_len": 32, "global_batch": 4},
            "optim": {"warmup_steps": 2},
        }
    )
    out = run(job)

    run_dir = tmp_path / "killtest"
    assert (run_dir / "killed-rank1").exists()  # the kill happened
    recs = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    # attempt 1 ran steps 0..4 (checkpoint after step 2), was killed before step 5; attempt 2
    # restored step 2's checkpoint and re-ran 3 and 4 before going on to 7: one record per step,
    # the re-run ones marked, attempt 1's kept aside
    assert [r["step"] for r in recs] == list(range(8))
    assert [r.get("replay", False) for r in recs] == [False] * 3 + [True] * 2 + [False] * 3
    rolled = [
        json.loads(line)
        for line in (run_dir / "history.rolled_back.jsonl").read_text().splitlines()
    ]
    assert [(r["step"], r["rolled_back_at"]) for r in rolled] == [(3, 3), (4, 3)]
    first, second = rolled, recs[3:5]
    assert first[0]["pid"] != second[0]["pid"]  # a new worker group
    for a, b in zip(first, second, strict=True):
        # the same batches (data position) and the same state give the same loss
        assert (a["epoch"], a["position"]) == (b["epoch"], b["position"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["maxvio"] == pytest.approx(b["maxvio"], rel=1e-6)
    assert [r["position"] for r in recs[:5]] == [0, 4, 8, 12, 16]
    assert recs[-1]["loss"] < recs[0]["loss"]

    # the final HF directory loads here (and in transformers, checked in the model tests)
    cfg, model = load_model(out)
    assert cfg.vocab_size == 1024 and (out / "tokenizer.json").exists()
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    assert torch.isfinite(model(ids).logits).all()
