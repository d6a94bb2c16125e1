"""paged_positions under the interpreter: positions, lengths (int64 and int32) and slots equal
paged_positions_ref's exactly at odd shapes (5 sequences, 3 new tokens each, 16-token pages,
starts crossing page ends, int32 and int64 inputs, a block table wider than needed, one read
through a transposed view, starts read with a stride), the engine's paged view giving the same
values with the switch on and off, and bad inputs named."""

import pytest
import torch

from moeray.kernels.paged_positions import paged_positions, paged_positions_ref


def _case(dtype: torch.dtype, S: int):
    g = torch.Generator().manual_seed(3)
    starts = torch.tensor([0, 14, 31, 47, 90], dtype=dtype)
    width = (int(starts.max()) + S) // 16 + 3
    table = torch.randperm(200, generator=g)[: 5 * width].view(5, width).to(dtype)
    return table, starts


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("S", [1, 3])
def test_equals_reference(dtype, S):
    table, starts = _case(dtype, S)
    got, want = paged_positions(table, starts, S, 16), paged_positions_ref(table, starts, S, 16)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # by hand: the sequence at 14 with 3 new tokens crosses into its second page
    if S == 3:
        assert got.positions_BS[1].tolist() == [14, 15, 16]
        assert got.slots_T[3:6].tolist() == [
            int(table[1, 0]) * 16 + 14,
            int(table[1, 0]) * 16 + 15,
            int(table[1, 1]) * 16 + 0,
        ]
    assert got.seq_lens_B.tolist() == (starts + S).tolist()
    assert got.seq_lens_i32_B.dtype == torch.int32


def test_prefill_chunk_over_several_programs(monkeypatch):
    """S past the block of new tokens a program takes: the chunk split over programs, the
    lengths written once."""
    from moeray.kernels import paged_positions as mod

    monkeypatch.setattr(mod, "MAX_BLOCK_S", 4)
    table, starts = _case(torch.int64, 11)
    got, want = paged_positions(table, starts, 11, 16), paged_positions_ref(table, starts, 11, 16)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_strided_inputs():
    """A column-major block table, and starts read as the last column of the engine's one
    [B, S + 1] upload of ids and starts (`StepInputs.ids_and_starts`), stride S + 1."""
    table, starts = _case(torch.int64, 3)
    wide_t = table.t().contiguous().t()  # the same values, column-major
    assert wide_t.stride(1) != 1
    both = torch.cat([torch.full((5, 3), 7), starts[:, None]], dim=1)
    col = both[:, -1]
    assert col.stride(0) == 4
    got, want = paged_positions(wide_t, col, 3, 16), paged_positions_ref(table, starts, 3, 16)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_paged_view_same_values_with_the_switch(monkeypatch):
    from moeray.platform.engine.kv_cache import PagedKVStorage
    from moeray.platform.engine.paged_view import KernelPagedView

    table, starts = _case(torch.int64, 2)
    storage = PagedKVStorage.__new__(PagedKVStorage)  # only its page size is read here
    storage.shape = type("Shape", (), {"page_size": 16})()
    views = {}
    for on in ("0", "1"):
        monkeypatch.setenv("MOERAY_FUSED_PAGED_POSITIONS", on)
        views[on] = KernelPagedView(storage, table, starts, 2)
    for name in ("positions_BS", "seq_lens_B", "seq_lens_i32_B", "new_slots"):
        a, b = getattr(views["0"], name), getattr(views["1"], name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_bad_inputs_are_named():
    table, starts = _case(torch.int64, 1)
    with pytest.raises(ValueError, match="starts_B has 4 sequences"):
        paged_positions(table, starts[:4], 1, 16)
    with pytest.raises(ValueError, match="S=0"):
        paged_positions(table, starts, 0, 16)
    with pytest.raises(ValueError, match="block_table_BM"):
        paged_positions(table.float(), starts, 1, 16)
