"""scripts/fp8_train_check.py on the CPU (the emulation itself, the tiny preset): every FP8
projection's output equals the recipe's emulation up to the bf16 rounding of the output, and sits
E4M3's few percent from BF16; the table and the JSON name every projection."""

import json


def test_fp8_train_check_on_cpu(tmp_path, capsys, load_script):
    out = tmp_path / "check.json"
    args = ["--model", "tiny", "--layers", "2", "--seq-len", "64", "--micro-batch-size", "1"]
    assert load_script("fp8_train_check").main([*args, "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    names = {r["name"] for r in rows}
    assert {"model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"} <= names
    for r in rows:
        # the same quantized operands: only the autocast bf16 output rounding (2^-9) between them
        assert r["y_vs_emul"] < 4e-3 and r["dx_vs_emul"] < 4e-3, r
        # E4M3 keeps 3 mantissa bits: a few percent from BF16, never zero, never wild
        assert 0.01 < r["y_emul_vs_bf16"] < 0.08 and 0.01 < r["dx_emul_vs_bf16"] < 0.08, r
        assert r["dw_vs_fp32"] < 4e-3, r  # BF16 weight gradients (the bf16_wgrad runs)
    assert "model.layers.0.mlp.down_proj" in capsys.readouterr().out
