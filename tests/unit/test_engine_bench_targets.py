"""`moeray.platform.engine.bench.targets`: issue 19's decode targets read from result files."""

import json
from pathlib import Path

from moeray.platform.engine.bench.targets import checks, main

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _run(
    preset,
    weights,
    rates,
    fracs,
    layers=27,
    mtp=None,
    device="NVIDIA H200",
    mtp_ahead=None,
    mtp_drafts=None,
):
    one = {} if mtp_ahead is None else {"async_spec": {"speedup": mtp_ahead}}
    if mtp_drafts:  # {k: (speedup, acceptance)}
        one["drafts"] = {
            str(k): {"speedup": x, "acceptance": a} for k, (x, a) in mtp_drafts.items()
        }
    return {
        "device": device,
        "model": {"preset": preset, "num_hidden_layers": layers, "weights": weights},
        "decode_tokens_per_s": rates,
        "roofline_fraction": fracs,
        "mtp_speedup": mtp,
        "mtp": {"1": one} if one else {},
    }


def test_each_target_from_the_runs_that_measure_it():
    found = {
        c.target: c
        for c in checks(
            {
                "ml-bf16": _run(
                    "moonlight_16b_a3b", "bf16", {"1": 400, "64": 5000}, {"1": 0.51, "64": 0.7}
                ),
                "ml-fp8": _run(
                    "moonlight_16b_a3b", "fp8", {"1": 380, "64": 6000}, {"1": 0.39, "64": 0.61}
                ),
                "v3-bf16": _run(
                    "deepseek_v3", "bf16", {"1": 400, "64": 3000}, {"1": 0.8, "64": 0.9}, 4
                ),
                "v3-fp8": _run(
                    "deepseek_v3",
                    "fp8",
                    {"1": 640, "64": 5000},
                    {"1": 0.6, "64": 0.59},
                    4,
                    1.2,
                    mtp_ahead=1.7,
                    mtp_drafts={3: (1.73, 1.0), 2: (1.47, 0.995)},
                ),
            }
        )
    }
    met = {t: c.met for t, c in found.items()}
    assert met == {
        "moonlight_16b_a3b (27 layers) bf16 batch 1 roofline": True,
        "moonlight_16b_a3b (27 layers) bf16 batch 64 roofline": True,
        "moonlight_16b_a3b (27 layers) fp8 batch 1 roofline": False,  # 0.39 < 0.40
        "moonlight_16b_a3b (27 layers) fp8 batch 64 roofline": True,
        "moonlight_16b_a3b (27 layers) FP8 / bf16 tokens/s at batch 1": False,  # 380 < 400
        "moonlight_16b_a3b (27 layers) FP8 / bf16 tokens/s at batch 64": True,
        "deepseek_v3 (4 layers) fp8 batch 1 roofline": True,  # exactly 0.60
        "deepseek_v3 (4 layers) fp8 batch 64 roofline": False,
        "deepseek_v3 (4 layers) fp8 MTP at batch 1, synchronous steps": False,
        "deepseek_v3 (4 layers) fp8 MTP at batch 1, async scheduling (default)": True,
        "deepseek_v3 (4 layers) fp8 MTP at batch 1, 2 drafts a step (acceptance 0.99)": False,
        "deepseek_v3 (4 layers) fp8 MTP at batch 1, 3 drafts a step (acceptance 1.00)": True,
        "deepseek_v3 (4 layers) FP8 / bf16 tokens/s at batch 1": True,  # 1.6x: V3's own bar
        "deepseek_v3 (4 layers) FP8 / bf16 tokens/s at batch 64": True,
    }
    pair = found["deepseek_v3 (4 layers) FP8 / bf16 tokens/s at batch 1"]
    assert pair.value == 1.6 and pair.needed == 1.6 and pair.files == ("v3-fp8", "v3-bf16")
    assert {c.device for c in found.values()} == {"NVIDIA H200"}
    # a bf16 run alone: no FP8 ratio; another layer count is another shape, another GPU too
    alone = checks({"v3-8": _run("deepseek_v3", "bf16", {"1": 1}, {"1": 0.9}, 8)})
    assert alone == []
    mixed = checks(
        {
            "ml-bf16-h100": _run("moonlight_16b_a3b", "bf16", {"1": 1}, {}, device="NVIDIA H100"),
            "ml-fp8-h200": _run("moonlight_16b_a3b", "fp8", {"1": 2}, {}),
        }
    )
    assert mixed == []


def test_main_reads_files_and_the_eighteenth_sessions_h200_gap(tmp_path, capsys):
    files = sorted(str(p) for p in RESULTS.glob("engine-nvidia-h200-moonlight-*-defaults4.json"))
    assert len(files) == 2
    assert main(files) == 0
    lines = capsys.readouterr().out.splitlines()
    (fp8_b1,) = [ln for ln in lines if "fp8 batch 1 roofline" in ln]
    assert " 0.390 " in fp8_b1 and "NO" in fp8_b1  # the H200 FP8 batch-1 target still open
    empty = tmp_path / "other.json"
    empty.write_text(json.dumps(_run("tiny", "bf16", {"1": 1.0}, {"1": 0.1})))
    assert main([str(empty)]) == 1  # nothing to check
    assert main([]) == 2
