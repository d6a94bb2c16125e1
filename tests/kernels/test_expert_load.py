"""count_expert_load (moeray.kernels.expert_load) against its PyTorch reference under the
interpreter: equal counts at odd sizes, padding rows past valid_1, foreign ids (other ranks'
experts: negative or past E), several programs, int32 ids; bad inputs named."""

import pytest
import torch

from moeray.kernels.expert_load import count_expert_load, count_expert_load_ref


def _ids(t, k, e, seed, foreign):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(t, e, generator=g).topk(k, dim=1).indices
    if foreign:
        ids[::3, 0] = -1
        ids[1::4, -1] = e + 2
    return ids


@pytest.mark.parametrize(
    ("t", "k", "e", "valid"), [(1, 6, 64, 1), (5, 3, 7, 3), (37, 8, 256, 37), (300, 6, 64, 211)]
)
@pytest.mark.parametrize("foreign", [False, True])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_count_expert_load_equals_reference(t, k, e, valid, foreign, dtype):
    ids = _ids(t, k, e, seed=t + e, foreign=foreign).to(dtype)
    valid_1 = torch.tensor([valid])
    start_E = torch.arange(e, dtype=torch.int64)  # counts add to what is there
    got_E, got_1 = start_E.clone(), torch.tensor(5)
    want_E, want_1 = start_E.clone(), torch.tensor(5)
    count_expert_load(ids, valid_1, got_E, got_1)
    count_expert_load_ref(ids, valid_1, want_E, want_1)
    assert torch.equal(got_E, want_E) and torch.equal(got_1, want_1)
    ok = ids[:valid].long()
    ok = ok[(ok >= 0) & (ok < e)]
    assert int(got_1) == 5 + ok.numel() and int((got_E - start_E).sum()) == ok.numel()


def test_padding_rows_count_nothing():
    ids = torch.tensor([[0, 1], [2, 3]])
    load_E, rows_1 = torch.zeros(4, dtype=torch.int64), torch.zeros((), dtype=torch.int64)
    count_expert_load(ids, torch.tensor([0]), load_E, rows_1)
    assert int(load_E.sum()) == 0 and int(rows_1) == 0


def test_bad_inputs_are_named():
    ids = torch.zeros(2, 2, dtype=torch.int64)
    load_E, rows_1 = torch.zeros(4, dtype=torch.int64), torch.zeros((), dtype=torch.int64)
    with pytest.raises(ValueError, match=r"expert_ids_TK has dtype torch\.float32"):
        count_expert_load(ids.float(), torch.tensor([1]), load_E, rows_1)
    with pytest.raises(ValueError, match=r"load_E has dtype torch\.int32"):
        count_expert_load(ids, torch.tensor([1]), load_E.int(), rows_1)
    with pytest.raises(ValueError, match="valid_1 has 2 and rows_1 1 elements"):
        count_expert_load(ids, torch.tensor([1, 2]), load_E, rows_1)
