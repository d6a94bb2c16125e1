"""MLA decode's wgmma split kernel (kernels/mla_decode_wgmma.py, MOERAY_FUSED_MLA_WGMMA=1) on a
Hopper GPU: the fp32 reference's output and lse at ragged lengths with NaN in every cache row a
sequence does not own (the kernel must zero-fill, not read them), the Triton split kernel's
output, one launch of the kernel, and a CUDA graph replayed on new queries and lengths."""

import pytest
import torch

from moeray.kernels.mla_decode import mla_decode_multi, mla_decode_ref
from tests.gpu.gemv_checks import captured, cuda_kernels

pytestmark = pytest.mark.gpu

KERNELS = {"0": "_mla_decode_wgmma_kernel", "1": "_mla_decode_ws_kernel"}  # by MLA_WS


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


needs_hopper = pytest.mark.skipif(not _hopper(), reason="wgmma is sm_90 only")


def _case(lens: list[int], heads: int, q_len: int, page: int = 64, seed: int = 0):
    """q [B, S, H, 576] and a shuffled paged cache whose rows past each length, and whose pages
    no sequence owns, hold NaN."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    b = len(lens)
    max_pages = max(-(-n // page) for n in lens) + 1
    n_pages = b * max_pages + 3
    kv = torch.full((n_pages, page, 576), float("nan"), device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(n_pages, device="cuda", generator=g)[: b * max_pages].view(b, max_pages)
    for i, n in enumerate(lens):
        for j in range(-(-n // page)):
            m = min(page, n - j * page)
            kv[table[i, j], :m] = torch.randn(m, 576, device="cuda", generator=g).bfloat16()
    q = torch.randn(b, q_len, heads, 576, device="cuda", generator=g, dtype=torch.bfloat16) * 0.3
    seq = torch.tensor(lens, device="cuda", dtype=torch.int32)
    return q, kv, table.int(), seq


def _rel(out, ref):
    assert torch.isfinite(out).all(), "NaN/inf: a row outside the sequence was read"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@needs_hopper
@pytest.mark.parametrize(
    ("heads", "q_len", "page", "splits", "stages"),
    [
        (128, 1, 64, None, 2),  # DeepSeek-V3 decode
        (128, 2, 64, 3, 3),  # MTP verification, 3 splits of ragged shares, 3 x 32-token stages
        (40, 1, 128, 1, 4),  # 40 rows: the block's last 24 masked; 128-token pages, one split
        (16, 4, 64, 5, 2),  # Moonlight's 16 heads x 4 tokens = 64 rows
    ],
)
@pytest.mark.parametrize("ws", ["0", "1"])  # MOERAY_FUSED_MLA_WS: the warp-specialized form
def test_wgmma_matches_reference(heads, q_len, page, splits, stages, ws, monkeypatch):
    lens = [5000, q_len, 64, 4097, 300, 129]
    q, kv, table, seq = _case(lens, heads, q_len, page)
    scale = 192**-0.5
    ref, ref_lse = mla_decode_ref(q, kv, table, seq, scale)

    def run():
        return mla_decode_multi(
            q, kv, table, seq, scale, num_splits=splits, block_h=64, num_stages=stages,
            return_lse=True,
        )  # fmt: skip

    monkeypatch.setenv("MOERAY_FUSED_MLA_WGMMA", "1")
    monkeypatch.setenv("MOERAY_FUSED_MLA_WS", ws)
    names = cuda_kernels(run)
    assert sum(KERNELS[ws] in n for n in names) == 1, names
    out, lse = run()
    assert _rel(out, ref) < 1e-2
    # fp32 scores of the same bf16 inputs: a token dropped or read twice moves the lse of the
    # 64- to 300-token sequences by > 3e-3
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=0)
    # The Triton kernel: 64-row blocks as above, but 16-row ones over 128-token pages (a 64 x 128
    # block of the 576-wide cache does not fit its shared memory)
    monkeypatch.setenv("MOERAY_FUSED_MLA_WGMMA", "0")
    block_h = 64 if page == 64 else 16

    def triton_run():
        return mla_decode_multi(q, kv, table, seq, scale, num_splits=splits, block_h=block_h)

    assert not any(k in n for n in cuda_kernels(triton_run) for k in KERNELS.values())
    assert _rel(out, triton_run()) < 1e-2


@needs_hopper
@pytest.mark.parametrize("ws", ["0", "1"])
def test_wgmma_graph_replays_new_inputs(ws, monkeypatch):
    monkeypatch.setenv("MOERAY_FUSED_MLA_WGMMA", "1")
    monkeypatch.setenv("MOERAY_FUSED_MLA_WS", ws)
    q, kv, table, seq = _case([700, 2000, 64, 1], 128, 1, seed=1)
    scale = 192**-0.5
    graph, out = captured(lambda: mla_decode_multi(q, kv, table, seq, scale, block_h=64))
    q.copy_(torch.randn_like(q) * 0.3)
    seq.copy_(torch.tensor([650, 1999, 1, 1], device="cuda", dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    ref, _ = mla_decode_ref(q, kv, table, seq, scale)
    assert _rel(out, ref) < 1e-2


@needs_hopper
@pytest.mark.parametrize(
    ("lens", "ws"), [([700, 64, 1, 300, 5000, 129, 2, 64], True), ([20000], False)]
)
def test_wgmma_block_rule(lens, ws, monkeypatch):
    """No block size given, 128 heads: 8 sequences (short ones, in a 2,560-page table as a decode
    graph captures them: most splits empty) take the WS kernel, the reference's output and lse;
    one sequence (even of 20K tokens) and MOERAY_FUSED_MLA_WIDE=0 keep the Triton kernel."""
    q, kv, table, seq = _case(lens, 128, 1)
    table = torch.cat([table, table.new_zeros(len(lens), 2560 - table.shape[1])], dim=1)
    scale = 192**-0.5
    ref, ref_lse = mla_decode_ref(q, kv, table, seq, scale)
    for name in ("MLA_WIDE", "MLA_WGMMA", "MLA_WS"):
        monkeypatch.delenv(f"MOERAY_FUSED_{name}", raising=False)

    def run():
        return mla_decode_multi(q, kv, table, seq, scale, return_lse=True)

    names = cuda_kernels(run)
    assert sum(KERNELS["1"] in n for n in names) == int(ws), names
    out, lse = run()
    assert _rel(out, ref) < 1e-2
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=0)
    monkeypatch.setenv("MOERAY_FUSED_MLA_WIDE", "0")
    assert not any(k in n for n in cuda_kernels(run) for k in KERNELS.values())
