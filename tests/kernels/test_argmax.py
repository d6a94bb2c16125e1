"""kernels/argmax.py under the interpreter: torch.argmax's ids (ties to the first column, a NaN
above any number) at published vocabularies and odd widths, ties planted across chunk boundaries,
counters left zero; the sampler's choice of it."""

import pytest
import torch

from moeray.kernels import argmax as mod
from moeray.kernels.argmax import BLOCK, MAX_ROWS, argmax_rows, argmax_rows_applies


def _rows(V, dtype, seed):
    """Six rows: random, ties from a chunk's first column on (chunk 0 without one), the first
    maximum in chunk 0 with a tie beside it, the last column alone, NaNs after a maximum, every
    column equal (-inf)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, V, generator=g).to(dtype)
    top = x.max() + 1
    x[1, BLOCK] = x[1, BLOCK + 1] = x[1, V - 1] = top
    x[2, 700] = x[2, 701] = x[2, BLOCK + 3] = top
    x[3, V - 1] = top
    x[4, 5] = top
    x[4, BLOCK + 9] = x[4, V - 2] = float("nan")
    x[5] = float("-inf")
    return x


# Every dtype at the odd widths (C 2, 3: chunks padded to 4, and 4); the published vocabularies
# (V3's 32 chunks, Kimi K2's 40 padded to 64) once each, in bf16 and fp32: the same loads and
# compares as the narrow rows of their dtype, at 8-10 times the interpreter's time (~15 s).
_CASES = [
    (V, dtype)
    for V in (2 * BLOCK, 2 * BLOCK + 1, 12_295)
    for dtype in (torch.bfloat16, torch.float16, torch.float32)
] + [(129_280, torch.bfloat16), (163_840, torch.float32)]


@pytest.mark.parametrize(("V", "dtype"), _CASES)
def test_argmax_rows_is_torch_argmax(V, dtype):
    x = _rows(V, dtype, seed=V)
    want = x.float().argmax(-1)
    assert want.tolist()[1:] == [BLOCK, 700, V - 1, BLOCK + 9, 0]
    counters = torch.zeros(8, dtype=torch.int32)
    for _ in range(2):  # the second launch finds the counters the first one left
        assert torch.equal(argmax_rows(x, counters), want)
        assert counters.tolist() == [0] * 8
    flipped = x.flip(-1).contiguous()
    assert torch.equal(argmax_rows(flipped, counters), flipped.float().argmax(-1))


def test_argmax_rows_reads_a_row_stride():
    x = _rows(3 * BLOCK + 5, torch.bfloat16, seed=1)
    wide = torch.zeros(6, 4 * BLOCK, dtype=torch.bfloat16)
    wide[:, : x.shape[1]] = x
    view = wide[:, : x.shape[1]]  # row stride 4 * BLOCK, unit stride over V
    counters = torch.zeros(6, dtype=torch.int32)
    assert torch.equal(argmax_rows(view, counters), x.float().argmax(-1))


def test_argmax_rows_rejects_bad_inputs():
    x = torch.zeros(2, 2 * BLOCK)
    counters = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"x has dtype torch\.int64"):
        argmax_rows(x.long(), counters)
    with pytest.raises(ValueError, match="unit stride over V"):
        argmax_rows(torch.zeros(2 * BLOCK, 2).t(), counters)
    with pytest.raises(ValueError, match=r"1048577 columns: expected 1 to 1048576"):
        argmax_rows(torch.zeros(1, mod.MAX_CHUNKS * BLOCK + 1), counters)
    with pytest.raises(ValueError, match="counters has 1 entries for 2 rows"):
        argmax_rows(x, counters[:1])
    with pytest.raises(ValueError, match=r"counters has dtype torch\.int64"):
        argmax_rows(x, counters.long())


def test_argmax_rows_applies_to_vocabulary_rows_only():
    assert argmax_rows_applies(torch.zeros(1, 129_280, dtype=torch.bfloat16))
    assert argmax_rows_applies(torch.zeros(MAX_ROWS, mod.MIN_COLUMNS))
    assert not argmax_rows_applies(torch.zeros(1, mod.MIN_COLUMNS - 1))  # torch's block suffices
    assert not argmax_rows_applies(torch.zeros(MAX_ROWS + 1, mod.MIN_COLUMNS))
    assert not argmax_rows_applies(torch.zeros(1, mod.MIN_COLUMNS, dtype=torch.int32))
    assert not argmax_rows_applies(torch.zeros(mod.MIN_COLUMNS, 2).t())


def test_sampler_greedy_ids_takes_the_kernel(monkeypatch, launch_spy):
    from moeray.platform.engine.sampler import Sampler

    calls = launch_spy(mod, "_argmax_rows_kernel")
    monkeypatch.delenv("MOERAY_FUSED_ARGMAX", raising=False)
    x = _rows(129_280, torch.bfloat16, seed=3)
    sampler = Sampler()
    assert torch.equal(sampler.greedy_ids(x), x.float().argmax(-1))
    assert calls == []  # opt-in: torch.argmax unless MOERAY_FUSED_ARGMAX=1
    monkeypatch.setenv("MOERAY_FUSED_ARGMAX", "1")
    assert torch.equal(sampler.greedy_ids(x), x.float().argmax(-1))
    assert torch.equal(sampler.greedy_ids(x[:2]), x[:2].float().argmax(-1))
    assert calls == [(6, 32), (2, 32)]
