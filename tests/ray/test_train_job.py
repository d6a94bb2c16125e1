"""The Ray Train job end to end on gloo: EP=2 workers, a worker SIGKILLed mid-run, resume from the
last checkpoint with the same data order and no lost step, final HF directory that loads; run
with ZeRO-1, bf16 AdamW moments, the gamma and lambda schedules, recompute and the parameter EMA,
on a storage that is not the local filesystem (as on a cluster with an object store: every file
of the run goes through it)."""

import json

import pytest


@pytest.mark.ray
@pytest.mark.slow
def test_train_job_survives_a_killed_worker(ray_local, tmp_path, monkeypatch):
    import pyarrow.fs as pafs
    import torch

    from moeray.platform.checkpoint import load_model
    from moeray.platform.config import tiny
    from moeray.platform.model.transformer import Transformer
    from moeray.platform.parallel.expert import is_expert_param
    from moeray.platform.train.job import run
    from moeray.platform.train.job_config import TrainJobConfig

    # The run's storage: a filesystem whose paths ("runs/killtest/...") are no paths of this
    # machine, so a read or write that bypassed it (a driver path handed to a worker, a file
    # opened by path) would miss; the driver runs in a directory of its own.
    (tmp_path / "bucket").mkdir()
    (tmp_path / "driver").mkdir()
    monkeypatch.chdir(tmp_path / "driver")
    bucket = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    job = TrainJobConfig.from_dict(
        {
            "model": "tiny",
            "name": "killtest",
            "storage": "runs",
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
            # ZeRO-1 with bf16 moments: the sharded state survives the restart too
            "optim": {"warmup_steps": 2, "zero_stage": 1, "moments_dtype": "bfloat16"},
            # the paper's schedules at 8 steps: gamma 0 from step 6, lambda 0.1 from step 4;
            # recompute in the backward; the parameter EMA, restored over the kill
            "schedule": {"gamma": [[0.75, 0.0]], "mtp_lambda": [[0.5, 0.1]]},
            "recompute": ["norm", "mla_up"],
            "ema_decay": 0.9,
        }
    )
    out = run(job, filesystem=bucket)

    # everything is in the storage: the driver's directory and the test's stay empty
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bucket", "driver"]
    assert list((tmp_path / "driver").iterdir()) == []
    run_dir = tmp_path / "bucket" / "runs" / "killtest"
    assert out.path == "runs/killtest/model" and not out.is_local
    assert (run_dir / "router_state.pt").exists() and (run_dir / "data" / "tokens.pt").exists()
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
    # each rank reports its share of the optimizer state (replicated parameters dealt over the
    # 2 ranks, each rank's experts its own); no peak device memory on the CPU
    state = recs[-1]["optim_state_bytes"]
    named = list(Transformer(tiny()).named_parameters())
    per_rank = sum(p.numel() / (2 if is_expert_param(n) else 1) for n, p in named)
    # unsharded fp32 moments would be 8 bytes per element of the rank's parameters; dealt
    # replicated parameters and bf16 moments: about 2.7 (the experts are half the elements)
    assert len(state) == 2 and all(b < 0.45 * 8 * per_rank for b in state), (state, per_rank)
    assert min(state) > 0.8 * max(state)
    assert recs[-1]["peak_mem_bytes"] == [None, None]
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert [r["gamma"] for r in recs] == [0.001] * 6 + [0.0] * 2  # as the router applied it
    assert [r["mtp_lambda"] for r in recs] == [0.3] * 4 + [0.1] * 4
    # gamma 0: the biases of step 5's checkpoint are those of step 7's (Ray Train keeps 2)
    bias = {
        s: torch.load(run_dir / f"step_{s:07d}" / "router.pt", weights_only=False)["bias_LE"]
        for s in (5, 7)
    }
    assert bias[5].abs().max() > 0 and torch.equal(bias[5], bias[7])
    # the EMA went on from step 2's checkpoint after the kill: 8 updates, not 5
    assert (
        torch.load(run_dir / "step_0000007" / "rank1.pt", weights_only=False)["ema"]["updates"] == 8
    )

    # the final HF directory loads here (and in transformers, checked in the model tests)
    cfg, model = load_model(run_dir / "model")
    assert cfg.vocab_size == 1024 and (run_dir / "model" / "tokenizer.json").exists()
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    assert torch.isfinite(model(ids).logits).all()
    _, ema = load_model(run_dir / "model" / "ema")  # the parameter EMA, an HF directory of its own
    assert torch.isfinite(ema(ids).logits).all()
    weights, averaged = model.state_dict(), ema.state_dict()
    experts = [k for k in weights if is_expert_param(k)]  # [E, ...]: rank 1's half gathered too
    assert experts and all(not torch.equal(weights[k][8:], averaged[k][8:]) for k in experts)
