"""scripts/fp8_small_m_sweep.py on the CPU (Triton's interpreter, the timer replaced by a count):
every candidate runs at a small layer, fp8_gemv's rows carry their error against the bf16 product
of the dequantized weight, and the summary line names each kind; so a GPU call does not find a
broken sweep."""

import torch


def test_fp8_small_m_sweep_on_cpu(monkeypatch, capsys, load_script):
    mod = load_script("fp8_small_m_sweep")
    calls = []

    def timed(fn):
        fn()
        calls.append(fn)
        return 1e-3 * len(calls)  # ms: every candidate a different time

    monkeypatch.setattr(mod, "DEVICE", "cpu")
    monkeypatch.setattr(mod, "_graph_ms", timed)
    monkeypatch.setattr(mod, "LAYERS", (("test", 192, 384),))
    monkeypatch.setattr(mod, "TILES", ((64, 4, 4),))
    monkeypatch.setattr(mod, "SPLITS", (None, 2))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    rows = mod.sweep(20, budget_s=600)
    kinds = [r["kind"] for r in rows]
    assert kinds == ["quant_gemm", "quant_gemm_triton", "bf16", "gemv", "gemv", "act", "act"]
    assert all(isinstance(r["us"], float) for r in rows), rows
    for r in rows[3:]:
        # weight-only: fp32 sums of the dequantized weight; e4m3 x: x's rounding too
        assert r["rel_err"] < (0.01 if r["kind"] == "gemv" else 0.05), r
    assert [r["SPLIT_K"] for r in rows if r["kind"] == "gemv"][1] == 2
    out = capsys.readouterr().out
    assert "test" in out and "best gemv" in out and "best act" in out
