"""`moeray bench wide-ep` on CPU (gloo processes, the tiny preset): the result file has decode
tokens/s and all-to-all bandwidth keyed by rank count, the plain engine's tokens/s and the ep=1
ratio to it, and the placement ratios."""

import json

import pytest
import torch.multiprocessing as mp

from moeray import cli
from moeray.platform.engine.ep_bench import WideEPConfig, placement_ratios
from tests.spawn_ranks import spawn


def test_wide_ep_bench_writes_its_numbers(tmp_path, capsys, monkeypatch):
    # the bench's 4 rank processes (ep=1, ep=2, the plain engine) forked from the tests' fork
    # server (tests/spawn_ranks.py), not spawned: each would import torch and moeray first
    monkeypatch.setattr(mp, "spawn", spawn)
    argv = ["bench", "wide-ep", "--preset", "tiny", "--gpus", "1,2", "--device", "cpu"]
    argv += ["--batch", "2", "--prompt-len", "9", "--decode-tokens", "4", "--a2a-mib", "1"]
    argv += ["--repeats", "2"]
    assert cli.main([*argv, "--out-dir", str(tmp_path), "--tag", "tiny"]) == 0
    (f,) = tmp_path.glob("wide-ep-*-tiny.json")
    r = json.loads(f.read_text())
    assert r["command"] and r["device"]
    assert set(r["tokens_per_s"]) == {"1", "2"} and min(r["tokens_per_s"].values()) > 0
    assert all(len(v) == 2 for v in r["tokens_per_s_repeats"].values())
    assert len(r["plain_tokens_per_s_repeats"]) == 2
    assert r["alltoall_gbps"]["1"] is None and r["alltoall_gbps"]["2"] > 0
    assert r["cuda_graphs"] == {"1": "off", "2": "off"} and r["plain_cuda_graphs"] == "off"
    assert r["plain_tokens_per_s"] > 0
    assert r["ep1_over_plain"] == pytest.approx(r["tokens_per_s"]["1"] / r["plain_tokens_per_s"])
    assert r["max_gpu_load_ratio_placed"]["2"] < r["max_gpu_load_ratio_unplaced"]["2"]
    assert "wrote" in capsys.readouterr().out


def test_placement_evens_a_skewed_load():
    placed, unplaced = placement_ratios(4, 16, 4, s=1.2)
    assert 1.0 <= placed < unplaced
    assert placement_ratios(4, 16, 1, s=1.2) == (1.0, 1.0)


def test_bad_settings_are_refused(capsys):
    with pytest.raises(ValueError, match="preset='huge'"):
        WideEPConfig(preset="huge")
    with pytest.raises(ValueError, match="decode_exchange='graphs'"):
        WideEPConfig(decode_exchange="graphs")
    assert cli.main(["bench", "wide-ep", "--gpus", "two"]) == 2
    assert "--gpus 'two'" in capsys.readouterr().err
