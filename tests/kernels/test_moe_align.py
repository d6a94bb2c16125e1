"""The MoE alignment kernels (moeray.kernels.moe_align: one program, and one program per expert)
against their PyTorch reference under the interpreter: equal tensors at odd sizes, foreign (other
ranks') and out-of-range ids, empty experts, non-power-of-2 expert counts and block rows, many
chunks of assignments with each expert recurring in every chunk (the rank's running count), and
the dispatch by size at `small_kernel_max_tk`."""

import functools

import pytest
import torch

from moeray.kernels import moe_align as align_mod
from moeray.kernels.moe_align import (
    SMALL_KERNEL_MAX_CHUNKS,
    moe_align,
    moe_align_ref,
    small_kernel_max_tk,
)


def _ids(t, k, e, seed, foreign=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(t, e, generator=g).topk(k, dim=1).indices
    if foreign:  # other ranks' experts: below 0 and at or past E
        ids[::3, 0] = -2
        ids[1::4, -1] = e + 5
    return ids


@pytest.mark.parametrize(
    ("t", "k", "e", "bm"),
    [
        (1, 6, 64, 32),
        (3, 2, 5, 16),
        (19, 3, 6, 16),
        (37, 6, 64, 32),
        (70, 8, 256, 16),
        (0, 2, 4, 16),
        # Many chunks, past the quadratic kernel's old 768 limit: 19 and 24 chunks of 64.
        (200, 6, 64, 32),
        (256, 6, 64, 16),
        # Non-power-of-2 E at the limit: 96 experts (EP 128, 24 chunks of 32), 200 (EP 256, 24
        # chunks of 16).
        (96, 8, 96, 16),
        (48, 8, 200, 64),
        # Block rows that are no power of 2 (the wide kernel's padding lanes round up).
        (9, 3, 7, 12),
    ],
)
# int32 and int64 ids, with and without foreign ids: two of the four pairings (the interpreter
# runs the wide kernel's 256 programs one after another, ~2 s a case).
@pytest.mark.parametrize(("dtype", "foreign"), [(torch.int64, True), (torch.int32, False)])
@pytest.mark.parametrize("kernel", ["small", "wide"])
def test_moe_align_kernel_equals_reference(t, k, e, bm, dtype, foreign, kernel):
    ids = _ids(t, k, e, seed=t * 31 + e, foreign=foreign).to(dtype)
    got = moe_align(ids, e, bm, kernel=kernel)
    ref = moe_align_ref(ids, e, bm)
    assert got[0].dtype == ref[0].dtype == torch.int32
    assert got[1].dtype == ref[1].dtype == torch.int32
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize(
    ("counts", "bm"),
    [([1] * 20, 16), ([17, 17, 17, 1], 16), ([33, 1, 1, 1, 1, 31], 32), ([6], 32), ([0, 0, 5], 4)],
)
def test_blocks_bound_holds_at_worst_case_counts(counts, bm):
    """block_expert is max_aligned_blocks long (ceil(TK / BM) + min(E, TK)), and at counts that
    make every run end in a partial block (one assignment each; BM + 1) all assignments still
    land once, in blocks of their own expert: the kernel (under the interpreter) and the
    reference alike."""
    e = len(counts) + 3
    ids = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]
    tk = len(ids)
    small, wide = (functools.partial(moe_align, kernel=k) for k in ("small", "wide"))
    for fn in (small, wide, moe_align_ref):
        sorted_ids, block_expert = fn(ids.view(-1, 1), e, bm)
        assert block_expert.numel() == align_mod.max_aligned_blocks(tk, e, bm)
        assert align_mod.max_aligned_blocks(tk, e, bm) == -(-tk // bm) + min(e, tk)
        real = sorted_ids[sorted_ids < tk].long()
        assert sorted(real.tolist()) == list(range(tk))
        slot_expert = block_expert.repeat_interleave(bm)[: sorted_ids.numel()]
        live = sorted_ids < tk
        assert torch.equal(slot_expert[live].long(), ids[sorted_ids[live].long()])


@pytest.mark.parametrize(
    ("t", "k", "e", "bm", "foreign"),
    [(400, 6, 64, 32, True), (250, 8, 256, 16, False), (130, 8, 200, 32, True)],
)
@pytest.mark.parametrize("kernel", ["small", "wide"])
def test_moe_align_kernels_at_prefill_sizes_equal_reference(t, k, e, bm, foreign, kernel):
    """2,400 assignments over 64 experts (38 chunks of 64 for the one-program kernel, 3 loop steps
    of 1,024 for the wide one), 2,000 over 256 and 1,040 over 200."""
    ids = _ids(t, k, e, seed=t + e, foreign=foreign)
    got, ref = moe_align(ids, e, bm, kernel=kernel), moe_align_ref(ids, e, bm)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize(("tk", "e", "bm"), [(1000, 64, 16), (1000, 256, 32), (77, 3, 4)])
@pytest.mark.parametrize("kernel", ["small", "wide"])
def test_moe_align_kernel_ranks_experts_recurring_in_every_chunk(tk, e, bm, kernel):
    """Six hot experts fill every chunk, each many times (~8 a chunk of 64, ~2 of 16), with
    foreign ids between: a rank off by one within a chunk, or a running count not carried from
    chunk to chunk, moves or overwrites slots."""
    i = torch.arange(tk)
    hot = (i * 5 + i // 13) % 6 * max(e // 6, 1) % e
    ids = torch.where(i % 7 == 3, -1, torch.where(i % 11 == 5, e, hot))
    got = moe_align(ids.view(-1, 1), e, bm, kernel=kernel)
    ref = moe_align_ref(ids.view(-1, 1), e, bm)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # Each expert's run starts with its assignments in order.
    for x in ids[(ids >= 0) & (ids < e)].unique().tolist():
        run = got[0][got[1].repeat_interleave(bm) == x]
        assert torch.equal(run[: int((ids == x).sum())].long(), i[ids == x])


def test_moe_align_wide_kernel_spans_loop_steps(monkeypatch):
    """The wide kernel at a loop step of 16 ids: counts and ranks carried over 13 steps, and the
    tail past the padded total shared out over programs in strided steps."""
    monkeypatch.setattr(align_mod, "_WIDE_CHUNK", 16)
    ids = _ids(50, 4, 9, seed=3, foreign=True)
    got, ref = moe_align(ids, 9, 8, kernel="wide"), moe_align_ref(ids, 9, 8)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize(("e", "ch"), [(8, 64), (64, 64), (96, 32), (256, 16), (300, 16)])
def test_moe_align_dispatch_by_size(e, ch, launch_spy):
    # Up to SMALL_KERNEL_MAX_CHUNKS chunks of CH the one-program kernel runs, past it the wide one.
    limit = small_kernel_max_tk(e)
    assert limit == SMALL_KERNEL_MAX_CHUNKS * ch
    small = launch_spy(align_mod, "_moe_align_kernel")
    wide = launch_spy(align_mod, "_moe_align_wide_kernel")
    at = _ids(limit // 2, 2, e, seed=1)
    got = moe_align(at, e, 16)
    assert (len(small), len(wide)) == (1, 0)
    assert torch.equal(got[0], moe_align_ref(at, e, 16)[0])
    big = _ids(limit // 2 + 1, 2, e, seed=2)
    got = moe_align(big, e, 16)
    assert (len(small), len(wide)) == (1, 1) and wide[0] == (e,)
    assert torch.equal(got[0], moe_align_ref(big, e, 16)[0])


def test_moe_align_rejects_unknown_kernel():
    with pytest.raises(ValueError, match=r"kernel='fast'.*small"):
        moe_align(torch.zeros(2, 2, dtype=torch.long), 4, 16, kernel="fast")


@pytest.mark.parametrize(("experts", "block_m"), [(0, 16), (4, 0)])
def test_moe_align_rejects_bad_sizes(experts, block_m):
    with pytest.raises(ValueError, match="must be >= 1"):
        moe_align(torch.zeros(2, 2, dtype=torch.long), experts, block_m)


def test_moe_align_env_switch_keeps_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(align_mod, "moe_align_ref", lambda *a: calls.append(a) or "ref")
    monkeypatch.setenv("MOERAY_FUSED_ALIGN", "0")
    assert moe_align(_ids(3, 2, 4, seed=0), 4, 16) == "ref" and len(calls) == 1


@pytest.mark.gpu
def test_moe_align_compiled_on_gpu(compiled_check):
    # Equal tensors compiled on CUDA from decode to prefill sizes for both kernels (Moonlight: 64
    # experts top-6, V3: 256 top-8, Kimi-K2: 384 top-8; block rows 16/32/64), under a CUDA
    # graph too, and the time of each path for the record.
    compiled_check(
        """
import torch
from moeray.kernels.moe_align import moe_align, moe_align_ref
bad = 0
for e, k in ((64, 6), (256, 8), (384, 8), (7, 2)):
    for t in (1, 3, 32, 64, 127, 256, 1024):
        for bm in (16, 32, 64):
            ids = torch.rand(t, e, device="cuda").topk(k, dim=1).indices
            ids[::5, 0] = -1  # another rank's expert
            ref = moe_align_ref(ids, e, bm)
            for kernel in ("small", "wide"):
                got = moe_align(ids, e, bm, kernel=kernel)
                ok = torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
                bad += not ok
                if not ok:
                    print("MISMATCH", kernel, e, k, t, bm)
for e, k in ((64, 6), (256, 8)):
    for t in (1, 8, 64, 170, 256):
        ids = torch.rand(t, e, device="cuda").topk(k, dim=1).indices
        ref = moe_align_ref(ids, e, 16)
        for name in ("small", "wide", "ref"):
            if name == "ref":
                fn = lambda: moe_align_ref(ids, e, 16)
            else:
                fn = lambda name=name: moe_align(ids, e, 16, kernel=name)
            fn()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                outs = [fn() for _ in range(20)]
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(10):
                g.replay()
            b.record()
            torch.cuda.synchronize()
            same = all(torch.equal(o[0], ref[0]) and torch.equal(o[1], ref[1]) for o in outs)
            bad += not same
            us = a.elapsed_time(b) / 200 * 1000
            print(f"moe_align {name} E={e} top{k} tokens={t}: {us:.1f} us graph_equal={same}")
print("RESULT PASS" if bad == 0 else f"RESULT FAIL {bad}")
""",
        "moe-align-gpu.log",
    )
