"""The MoE alignment kernel (moeray.kernels.moe_align, one program per expert) against its PyTorch
reference under the interpreter: equal tensors at odd sizes, foreign (other ranks') and
out-of-range ids, empty experts, non-power-of-2 expert counts and block rows, many loop steps of
ids with each expert recurring in every step (the rank's running count). Each check also asserts
that `moe_align` launched the kernel, one program per expert, rather than the reference."""

import pytest
import torch

from moeray.kernels import moe_align as align_mod
from moeray.kernels.fp8 import act_quant_ref
from moeray.kernels.moe_align import moe_align, moe_align_quant, moe_align_ref


def _ids(t, k, e, seed, foreign=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(t, e, generator=g).topk(k, dim=1).indices
    if foreign:  # other ranks' experts: below 0 and at or past E
        ids[::3, 0] = -2
        ids[1::4, -1] = e + 5
    return ids


@pytest.fixture
def align(launch_spy):
    """moe_align, checked to have launched `_moe_align_kernel` once on a grid of (E,)."""
    grids = launch_spy(align_mod, "_moe_align_kernel")

    def run(ids, e, bm):
        before = len(grids)
        out = moe_align(ids, e, bm)
        assert grids[before:] == [(e,)]
        return out

    return run


@pytest.mark.parametrize(
    ("t", "k", "e", "bm"),
    [
        (1, 6, 64, 32),
        (3, 2, 5, 16),
        (19, 3, 6, 16),
        (37, 6, 64, 32),
        (70, 8, 256, 16),
        (0, 2, 4, 16),
        # Past one loop step of 1,024 ids: 1,200 and 1,536 assignments.
        (200, 6, 64, 32),
        (256, 6, 64, 16),
        # Non-power-of-2 E: 96 experts (NB 128), 200 (NB 256); 63 (NB 64), where the bin that
        # takes padding lanes and foreign ids, NB - 1, is E itself.
        (96, 8, 96, 16),
        (48, 8, 200, 64),
        (21, 4, 63, 16),
        # Block rows that are no power of 2 (the padding lanes round up).
        (9, 3, 7, 12),
    ],
)
# int32 and int64 ids, with and without foreign ids: two of the four pairings (the interpreter
# runs the kernel's 256 programs one after another, ~2 s a case).
@pytest.mark.parametrize(("dtype", "foreign"), [(torch.int64, True), (torch.int32, False)])
def test_moe_align_kernel_equals_reference(align, t, k, e, bm, dtype, foreign):
    ids = _ids(t, k, e, seed=t * 31 + e, foreign=foreign).to(dtype)
    got = align(ids, e, bm)
    ref = moe_align_ref(ids, e, bm)
    assert got[0].dtype == ref[0].dtype == torch.int32
    assert got[1].dtype == ref[1].dtype == torch.int32
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize(
    ("counts", "bm"),
    [([1] * 20, 16), ([17, 17, 17, 1], 16), ([33, 1, 1, 1, 1, 31], 32), ([6], 32), ([0, 0, 5], 4)],
)
def test_blocks_bound_holds_at_worst_case_counts(align, counts, bm):
    """block_expert is max_aligned_blocks long (ceil(TK / BM) + min(E, TK)), and at counts that
    make every run end in a partial block (one assignment each; BM + 1) all assignments still
    land once, in blocks of their own expert: the kernel (under the interpreter) and the
    reference alike."""
    e = len(counts) + 3
    ids = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]
    tk = len(ids)
    for fn in (align, moe_align_ref):
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
def test_moe_align_kernel_at_prefill_sizes_equals_reference(align, t, k, e, bm, foreign):
    """2,400 assignments over 64 experts (3 loop steps of 1,024), 2,000 over 256 and 1,040 over
    200 (2 steps each)."""
    ids = _ids(t, k, e, seed=t + e, foreign=foreign)
    got, ref = align(ids, e, bm), moe_align_ref(ids, e, bm)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# Loop steps of 64 at 64 and 3 experts only: at 256 the interpreter takes ~20 s.
@pytest.mark.parametrize(
    ("tk", "e", "bm", "chunk"),
    [
        (1000, 64, 16, 1024),
        (1000, 256, 32, 1024),
        (77, 3, 4, 1024),
        (1000, 64, 16, 64),
        (77, 3, 4, 64),
    ],
)
def test_moe_align_kernel_ranks_experts_recurring_in_every_step(
    align, monkeypatch, tk, e, bm, chunk
):
    """Six hot experts fill every loop step, each many times (~8 a step of 64), with foreign ids
    between, in one step of 1,024 and in 16 of 64: a rank off by one within a step, or a running
    count not carried from step to step, moves or overwrites slots."""
    monkeypatch.setattr(align_mod, "_CHUNK", chunk)
    i = torch.arange(tk)
    hot = (i * 5 + i // 13) % 6 * max(e // 6, 1) % e
    ids = torch.where(i % 7 == 3, -1, torch.where(i % 11 == 5, e, hot))
    got = align(ids.view(-1, 1), e, bm)
    ref = moe_align_ref(ids.view(-1, 1), e, bm)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # Each expert's run starts with its assignments in order.
    for x in ids[(ids >= 0) & (ids < e)].unique().tolist():
        run = got[0][got[1].repeat_interleave(bm) == x]
        assert torch.equal(run[: int((ids == x).sum())].long(), i[ids == x])


def test_moe_align_kernel_spans_loop_steps(align, monkeypatch):
    """The kernel at a loop step of 16 ids: counts and ranks carried over 13 steps, and the tail
    past the padded total shared out over programs in strided steps."""
    monkeypatch.setattr(align_mod, "_CHUNK", 16)
    ids = _ids(50, 4, 9, seed=3, foreign=True)
    got, ref = align(ids, 9, 8), moe_align_ref(ids, 9, 8)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize(
    ("t", "h", "k", "e", "bm"), [(1, 256, 6, 64, 16), (37, 384, 3, 6, 16), (19, 200, 2, 5, 32)]
)
def test_moe_align_quant_equals_align_and_act_quant(launch_spy, t, h, k, e, bm):
    """moe_align_quant: one launch of E aligning programs plus ceil(T/16) x ceil(H/128)
    quantizing ones gives moe_align's tensors and act_quant's (e4m3 values and scales) exactly,
    at a ragged last group (H 200) and rows past one 16-row block."""
    grids = launch_spy(align_mod, "_moe_align_kernel")
    ids = _ids(t, k, e, seed=t + h, foreign=True)
    g = torch.Generator().manual_seed(t)
    x = (torch.randn(t, h, generator=g) * torch.rand(t, 1, generator=g) * 3).bfloat16()
    x[0, :7] = 0  # a group with zeros
    sorted_ids, block_expert, q, scale = moe_align_quant(ids, e, bm, x)
    assert grids == [(e + -(-t // 16) * -(-h // 128),)]
    ref = moe_align_ref(ids, e, bm)
    assert torch.equal(sorted_ids, ref[0]) and torch.equal(block_expert, ref[1])
    q_ref, s_ref = act_quant_ref(x)
    assert q.dtype == torch.float8_e4m3fn and torch.equal(q.float(), q_ref.float())
    assert torch.equal(scale, s_ref)


def test_moe_align_quant_checks_x():
    ids = _ids(3, 2, 4, seed=0)
    with pytest.raises(ValueError, match="unit last-dim stride"):
        moe_align_quant(ids, 4, 16, torch.zeros(8, 3, dtype=torch.bfloat16).t())


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
    # Equal tensors compiled on CUDA from decode to prefill sizes (Moonlight: 64 experts top-6,
    # V3: 256 top-8, Kimi-K2: 384 top-8; block rows 16/32/64), under a CUDA graph too, and the
    # time of the kernel and of the reference for the record.
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
            got = moe_align(ids, e, bm)
            ok = torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
            bad += not ok
            if not ok:
                print("MISMATCH", e, k, t, bm)
for e, k in ((64, 6), (256, 8)):
    for t in (1, 8, 64, 170, 256):
        ids = torch.rand(t, e, device="cuda").topk(k, dim=1).indices
        ref = moe_align_ref(ids, e, 16)
        for name, fn in (
            ("kernel", lambda: moe_align(ids, e, 16)),
            ("ref", lambda: moe_align_ref(ids, e, 16)),
        ):
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
