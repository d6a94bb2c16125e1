"""`moeray train` and `moeray serve` refuse a layout that cannot fit before any worker (or Ray)
starts, naming what to change; layouts that fit pass."""

from __future__ import annotations

import json

import pytest
import yaml

from moeray.platform.config import ServeConfig, deepseek_v3, small, tiny
from moeray.platform.plan import check
from moeray.platform.train.job import load_config

REPO_CONFIGS = "configs/train"


def _train_yaml(tmp_path, **changes) -> str:
    raw = yaml.safe_load(open(f"{REPO_CONFIGS}/tiny.yaml").read())
    raw.update(changes)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_train_refuses_v3_on_cpu_workers(tmp_path, capsys, refuse_ray_init):
    from moeray.platform.train import job

    f = _train_yaml(tmp_path, model="deepseek_v3", data={"vocab_size": 129280, "seq_len": 64})
    assert job.main(["--config", f]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "PP1 x EP2 x DP1" in err
    assert "parallel.ep=4" in err and "parallel.pp=2" in err and "RAM" in err


def test_train_check_passes_the_shipped_configs(monkeypatch):
    assert check.check_train(load_config(f"{REPO_CONFIGS}/tiny.yaml")) == []
    monkeypatch.setenv("MOERAY_GPU", "h100")
    assert check.check_train(load_config(f"{REPO_CONFIGS}/small-pp2-ep2-gpu.yaml")) == []


def test_train_gpu_budget_from_moeray_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("MOERAY_GPU", "h800")
    f = _train_yaml(
        tmp_path,
        model="deepseek_v3",
        use_gpu=True,
        parallel={"pp": 2, "ep": 8, "dp": 1, "microbatches": 4},
        data={"vocab_size": 129280, "seq_len": 4096, "global_batch": 32},
    )
    with pytest.raises(ValueError, match=r"a h800 \(\$MOERAY_GPU\) has 80 GB.*parallel.ep=16"):
        check.check_train(load_config(f))
    monkeypatch.setenv("MOERAY_GPU", "a100")
    with pytest.raises(ValueError, match="unknown GPU 'a100'"):
        check.check_train(load_config(f))


def test_train_gpu_without_a_budget_is_noted(monkeypatch, tmp_path):
    monkeypatch.delenv("MOERAY_GPU", raising=False)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    f = _train_yaml(
        tmp_path,
        use_gpu=True,
        parallel={"pp": 2, "ep": 2, "dp": 1, "microbatches": 4},
        data={"vocab_size": 1024, "global_batch": 16},
    )
    (note,) = check.check_train(load_config(f))
    assert "MOERAY_GPU" in note


def test_serve_refuses_v3_on_one_gpu_and_names_ep(monkeypatch, tmp_path, capsys, refuse_ray_init):
    from moeray.platform.serve import cli

    (tmp_path / "config.json").write_text(json.dumps(deepseek_v3().to_hf()))
    monkeypatch.setattr(cli, "check_model_dir", lambda cfg: [])  # no weights in this directory
    monkeypatch.setenv("MOERAY_GPU", "h200")
    argv = ["--model", str(tmp_path), "--gpus-per-replica", "1", "--weights", "fp8"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "141.0 GB" in err and "--ep 8" in err


def test_serve_check_bytes_and_passes_small_models(monkeypatch):
    monkeypatch.setenv("MOERAY_GPU", "h100")
    cfg = ServeConfig(model="x", gpus_per_replica=1.0, dtype="bfloat16")
    assert check.check_serve(cfg, small()) == []
    assert check.check_serve(ServeConfig(model="x"), tiny()) == []  # CPU: this host's RAM
    w1, kv = check.serve_bytes_per_rank(cfg, deepseek_v3())
    w8, _ = check.serve_bytes_per_rank(check._with_ep(cfg, 8), deepseek_v3())
    assert kv == 0 and w1 > 1.2e12 and w8 < w1 / 5  # bf16 V3: 1.34 TB whole, experts / 8
    # A replica holds its share of the GPU (gpu_memory_utilization, or a fractional GPU): Small
    # fits a whole H100, not a twentieth of one, either way.
    assert check.check_serve(cfg.replace(gpu_memory_utilization=0.9), small()) == []
    for share in ({"gpu_memory_utilization": 0.05}, {"gpus_per_replica": 0.05}):
        with pytest.raises(ValueError, match="does not fit"):
            check.check_serve(cfg.replace(**share), small())
    paged = cfg.replace(num_pages=1000)
    assert (
        check.serve_bytes_per_rank(paged, tiny())[1] == 1000 * 64 * tiny().kv_cache_bytes_per_token
    )


def test_train_check_counts_zero1_bf16_moments_recompute_and_cpu_ema(monkeypatch, tmp_path):
    """Moonlight-16B-A3B at EP2 x DP4 on H200s: ~160 GB a worker with the default recipe, ~95 GB
    with ZeRO-1, bf16 moments and recompute, so the check refuses the first and passes the
    second. The EMA counts on a CPU worker only (a GPU job keeps it in host memory)."""
    from moeray.platform.plan.memory import GB, train_memory

    monkeypatch.setenv("MOERAY_GPU", "h200")
    common = dict(
        model="moonlight_16b_a3b",
        use_gpu=True,
        bf16=True,
        parallel={"pp": 1, "ep": 2, "dp": 4},
        data={"vocab_size": 163840, "seq_len": 4096, "global_batch": 8},
    )
    plain = load_config(_train_yaml(tmp_path, **common))
    with pytest.raises(ValueError, match=r"does not fit.*PP1 x EP2 x DP4"):
        check.check_train(plain)
    saving = load_config(
        _train_yaml(
            tmp_path,
            **common,
            optim={"zero_stage": 1, "moments_dtype": "bfloat16"},
            recompute=["norm", "mla_up"],
            ema_decay=0.999,
        )
    )
    assert check.check_train(saving) == []
    recipe = check.job_recipe(saving)
    assert (recipe.zero1, recipe.moment_bytes, recipe.recompute) == (True, 4, ("norm", "mla_up"))

    layout = check.TrainLayout(1, 2, 4, "1f1b", seq_len=4096, global_batch=8)
    cfg = saving.model_config()
    base = train_memory(cfg, layout, check.job_recipe(plain))[0]
    less = train_memory(cfg, layout, recipe)[0]
    # optimizer state: dense parameters over EP x DP = 8 ranks, experts over DP = 4, moments halved
    assert less.optimizer < base.optimizer / 8
    assert less.activations < base.activations
    on_cpu = train_memory(cfg, layout, recipe, ema_bytes=4.0)[0]
    assert on_cpu.total - less.total == pytest.approx(4.0 * less.params)
    assert base.total / GB > 141 > less.total / GB
