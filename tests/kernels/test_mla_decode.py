"""Paged MLA decode (split-KV + LSE merge) vs the fp32 reference, under the interpreter; the
one-launch merge (tile counters in a workspace) vs the two-launch one, to the bit."""

import pytest
import torch

from moeray.kernels import mla_decode as mla_mod
from moeray.kernels.mla_decode import (
    mla_decode,
    mla_decode_multi,
    mla_decode_ref,
    mla_decode_workspace,
    mla_decode_workspace_size,
)


def _paged_case(seq_lens, heads, r, p, page, seed, s_q=1, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    b = len(seq_lens)
    max_pages = max(-(-n // page) for n in seq_lens) + 1  # one spare column: tables are padded
    num_pages = b * max_pages + 3
    kv = torch.randn(num_pages, page, r + p, generator=g).to(dtype)
    perm = torch.randperm(num_pages, generator=g)[: b * max_pages]  # scattered pages
    table = perm.reshape(b, max_pages).to(torch.int32)
    q = (torch.randn(b, s_q, heads, r + p, generator=g) * 0.5).to(dtype)
    return q, kv, table, torch.tensor(seq_lens, dtype=torch.int32)


def _poison_empty(monkeypatch):
    """torch.empty hands out NaN-filled float tensors: a merge that read a partial before it was
    written (or one never written) would show, where reused memory could hold the bits of an
    earlier call's partials."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


def _rel(out, ref):
    assert not torch.isnan(out).any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_small_dims(num_splits):
    q, kv, table, lens = _paged_case([37, 1, 80, 16], heads=5, r=64, p=16, page=16, seed=1)
    scale = 0.3
    out, lse = mla_decode(
        q[:, 0], kv, table, lens, scale, kv_lora_rank=64, num_splits=num_splits, return_lse=True
    )
    ref, ref_lse = mla_decode_ref(q, kv, table, lens, scale, kv_lora_rank=64)
    assert out.shape == (4, 5, 64) and out.dtype == torch.bfloat16
    assert _rel(out, ref[:, 0]) < 1e-2
    torch.testing.assert_close(lse, ref_lse[:, 0], atol=2e-2, rtol=0)


@pytest.mark.parametrize("num_splits", [None, 5, 16])
def test_short_sequences_in_a_wide_block_table(num_splits):
    """As the engine's tables are: as wide as the longest sequence allowed (64 columns here), the
    sequences a few pages long, unused columns pointing at a scratch page. The splits share each
    sequence's own pages (5 splits over 1-5 pages, 16 over fewer), none reads past its length."""
    q, kv, table, lens = _paged_case([37, 1, 80, 16], heads=5, r=64, p=16, page=16, seed=4)
    scratch = min(set(range(kv.shape[0])) - set(table.flatten().tolist()))
    wide = torch.full((4, 64), scratch, dtype=torch.int32)
    wide[:, : table.shape[1]] = table
    kv[scratch] = 1e4  # a read of the scratch page would swamp the softmax
    out, lse = mla_decode(
        q[:, 0], kv, wide, lens, 0.3, kv_lora_rank=64, num_splits=num_splits, return_lse=True
    )
    ref, ref_lse = mla_decode_ref(q, kv, table, lens, 0.3, kv_lora_rank=64)
    assert _rel(out, ref[:, 0]) < 1e-2
    torch.testing.assert_close(lse, ref_lse[:, 0], atol=2e-2, rtol=0)


def test_decode_deepseek_dims():
    # 512 latent + 64 rope, 64-token pages; 17 heads spans two head blocks with a ragged second one.
    q, kv, table, lens = _paged_case([130, 64, 3], heads=17, r=512, p=64, page=64, seed=2)
    scale = (192) ** -0.5
    out = mla_decode(q[:, 0], kv, table, lens, scale, num_splits=2)
    ref, _ = mla_decode_ref(q, kv, table, lens, scale)
    assert _rel(out, ref[:, 0]) < 1e-2


def test_multi_token_causal():
    q, kv, table, lens = _paged_case([40, 21, 3], heads=3, r=32, p=16, page=16, seed=3, s_q=3)
    out, lse = mla_decode_multi(
        q, kv, table, lens, 0.25, kv_lora_rank=32, num_splits=2, return_lse=True
    )
    ref, ref_lse = mla_decode_ref(q, kv, table, lens, 0.25, kv_lora_rank=32)
    assert out.shape == (3, 3, 3, 32)
    assert _rel(out, ref) < 1e-2
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)
    # Causality matters: the last query must differ from the first (it sees 2 more tokens).
    assert (out[:, 0] - out[:, 2]).abs().max() > 1e-2


def test_input_errors():
    q, kv, table, lens = _paged_case([20], heads=2, r=32, p=16, page=16, seed=4)
    with pytest.raises(ValueError, match="head dim"):
        mla_decode(q[:, 0, :, :40], kv, table, lens, 0.1, kv_lora_rank=32)
    with pytest.raises(ValueError, match="powers of 2"):
        mla_decode(q[:, 0], kv, table, lens, 0.1, kv_lora_rank=40)
    with pytest.raises(ValueError, match="block_table has dtype"):
        mla_decode(q[:, 0], kv, table.float(), lens, 0.1, kv_lora_rank=32)
    with pytest.raises(ValueError, match="batch mismatch"):
        mla_decode(
            q[:, 0], kv, table, torch.tensor([3, 4], dtype=torch.int32), 0.1, kv_lora_rank=32
        )
    with pytest.raises(ValueError, match="softmax_scale"):
        mla_decode(q[:, 0], kv, table, lens, -1.0, kv_lora_rank=32)


def test_tiny_model_dims_pad_to_dot_minimum():
    # tiny(): 32 latent + 8 rope dims. On a GPU tl.dot needs every dim >= 16, so the kernel pads
    # the rope block to 16 with masked loads; padding must not leak into scores or outputs.
    q, kv, table, lens = _paged_case([70, 5], heads=4, r=32, p=8, page=16, seed=4, s_q=2)
    out, lse = mla_decode_multi(
        q, kv, table, lens, 0.3, kv_lora_rank=32, num_splits=2, return_lse=True
    )
    ref, ref_lse = mla_decode_ref(q, kv, table, lens, 0.3, kv_lora_rank=32)
    assert out.shape == (2, 2, 4, 32)
    assert _rel(out, ref) < 1e-2
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)


@pytest.mark.parametrize(
    "heads,s_q,num_splits,block_h",
    [
        (5, 1, 7, None),  # 7 splits over 1..19 pages: most splits of the short rows are empty
        (20, 1, 4, None),  # 20 rows: a full and a ragged 16-row head block
        (7, 3, 5, None),  # multi-token: 21 query rows s * H + h in two head blocks
        (6, 2, 3, 32),  # one 32-row head block holding both query tokens (12 rows)
        (4, 1, 1, None),  # one split: the only program of its tile merges alone
    ],
)
def test_one_launch_merge_equals_two_launch(
    heads, s_q, num_splits, block_h, launch_spy, monkeypatch
):
    """With a workspace the split kernel's last program per (head block, sequence) merges: the
    same bits as the merge kernel, one launch, the counters back at zero (a second call needs no
    memset)."""
    monkeypatch.setattr(mla_mod, "_MERGE_TILE", 512)  # 16-32 columns at a time: several chunks
    _poison_empty(monkeypatch)
    lens = [max(s_q, n) for n in (1, 63, 64, 65, 300)]
    q, kv, table, seq = _paged_case(lens, heads=heads, r=64, p=16, page=16, seed=5, s_q=s_q)
    kw = dict(kv_lora_rank=64, num_splits=num_splits, block_h=block_h, return_lse=True)
    out2, lse2 = mla_decode_multi(q, kv, table, seq, 0.3, **kw)
    ws = mla_decode_workspace(len(lens), s_q * heads)
    splits = launch_spy(mla_mod, "_mla_decode_split_kernel")
    merges = launch_spy(mla_mod, "_mla_merge_kernel")
    out1, lse1 = mla_decode_multi(q, kv, table, seq, 0.3, workspace=ws, **kw)
    assert len(splits) == 1 and not merges  # one launch
    assert splits[0][1:] == (len(lens), -(-table.shape[1] // -(-table.shape[1] // num_splits)))
    assert out1.dtype == out2.dtype == torch.bfloat16
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    assert not ws.any(), ws  # every tile's last program set its counter back to 0
    ref, ref_lse = mla_decode_ref(q, kv, table, seq, 0.3, kv_lora_rank=64)
    assert _rel(out1, ref) < 1e-2
    torch.testing.assert_close(lse1, ref_lse, atol=2e-2, rtol=0)
    # Again on new queries, the same workspace as it was left: no memset in between.
    q2 = q.flip(0).contiguous()
    again, again_lse = mla_decode_multi(q2, kv, table, seq, 0.3, workspace=ws, **kw)
    two, two_lse = mla_decode_multi(q2, kv, table, seq, 0.3, **kw)
    assert torch.equal(again, two) and torch.equal(again_lse, two_lse) and not ws.any()


def test_one_launch_merge_single_token_api(monkeypatch):
    """mla_decode passes the workspace through; rows of other sequences in a larger workspace
    leave its spare counters alone."""
    _poison_empty(monkeypatch)
    q, kv, table, lens = _paged_case([37, 1, 80, 16], heads=5, r=64, p=16, page=16, seed=6)
    ws = mla_decode_workspace(8, 32)
    assert ws.numel() == mla_decode_workspace_size(8, 32) == 16
    out = mla_decode(q[:, 0], kv, table, lens, 0.3, kv_lora_rank=64, num_splits=3, workspace=ws)
    ref = mla_decode(q[:, 0], kv, table, lens, 0.3, kv_lora_rank=64, num_splits=3)
    assert torch.equal(out, ref) and not ws.any()


def test_workspace_errors():
    q, kv, table, lens = _paged_case([20, 40], heads=20, r=32, p=16, page=16, seed=7)
    assert mla_decode_workspace_size(2, 20) == 4  # 2 sequences x 2 head blocks of 16 rows
    with pytest.raises(ValueError, match="workspace has 3 counters; this call has 4 tiles"):
        mla_decode(q[:, 0], kv, table, lens, 0.1, 32, workspace=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(
        ValueError, match=r"workspace has dtype torch\.int64; accepted: torch\.int32"
    ):
        mla_decode(q[:, 0], kv, table, lens, 0.1, 32, workspace=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="workspace is on meta, expected cpu"):
        ws = torch.zeros(4, dtype=torch.int32, device="meta")
        mla_decode(q[:, 0], kv, table, lens, 0.1, 32, workspace=ws)
    with pytest.raises(ValueError, match="workspace must have 1 dims"):
        mla_decode(
            q[:, 0], kv, table, lens, 0.1, 32, workspace=torch.zeros(2, 2, dtype=torch.int32)
        )
    with pytest.raises(ValueError, match="max_batch=0"):
        mla_decode_workspace(0, 16)


def test_large_tiles_keep_the_merge_kernel(launch_spy, monkeypatch):
    """Partials past _MERGE_MAX_BYTES a tile merge in the second kernel even with a workspace
    (one CTA would read them all); the workspace is left as it was."""
    q, kv, table, lens = _paged_case([37, 1, 80, 16], heads=5, r=64, p=16, page=16, seed=8)
    ws = mla_decode_workspace(4, 5)
    monkeypatch.setattr(mla_mod, "_MERGE_MAX_BYTES", 3 * 5 * 64 * 4 - 1)  # 3 splits x 5 rows
    two = mla_decode(q[:, 0], kv, table, lens, 0.3, 64, num_splits=3)
    merges = launch_spy(mla_mod, "_mla_merge_kernel")
    out = mla_decode(q[:, 0], kv, table, lens, 0.3, 64, num_splits=3, workspace=ws)
    assert len(merges) == 1 and not ws.any() and torch.equal(out, two)
    monkeypatch.setattr(mla_mod, "_MERGE_MAX_BYTES", 3 * 5 * 64 * 4)
    mla_decode(q[:, 0], kv, table, lens, 0.3, 64, num_splits=3, workspace=ws)
    assert len(merges) == 1  # at the limit: merged in the split kernel
