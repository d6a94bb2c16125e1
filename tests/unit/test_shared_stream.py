"""The shared experts beside the routed ones (model/shared_stream.py) on CPU: the transform's
choice, and the MoE forward's path with `SharedStream(None)` (the same steps in order on one
stream; the second CUDA stream and its graphs are tests/gpu/test_shared_stream_gpu.py's): where it
applies, the output is the routed experts' sum plus the shared MLP's, and where it does not, the
MoE runs as before."""

import pytest
import torch
from torch import nn

from moeray.platform.config import tiny
from moeray.platform.model.moe import MoE
from moeray.platform.model.shared_stream import MAX_TOKENS, SharedStream, overlap_shared_experts
from moeray.platform.model.transformer import Transformer


class Recording(SharedStream):
    """SharedStream(None) that counts its forks and joins."""

    def __init__(self, add_in_sum: bool = False) -> None:
        super().__init__(None, add_in_sum)
        self.starts = 0
        self.joins = 0

    def start(self, mlp, x_TD):
        self.starts += 1
        return super().start(mlp, x_TD)

    def join(self, routed_TD, shared_TD):
        self.joins += 1
        return super().join(routed_TD, shared_TD)


class FusedTakesAll(nn.Module):
    """A fused-shared stand-in that applies to every x (as SharedFused does at <= 16 decode
    tokens on CUDA) and returns zeros: the MoE's output where it runs."""

    def applies(self, x_TD):
        return True

    def forward(self, x_TD, r):
        return torch.zeros_like(x_TD)


def _moe(seed=0) -> MoE:
    model = Transformer(tiny())
    model.reset_parameters(seed=seed)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    assert moe.shared_experts is not None
    return moe.eval()


def test_output_is_the_routed_sum_plus_the_shared_mlp():
    moe = _moe()
    side = Recording()
    moe.register_module("shared_stream", side)
    x_TD = torch.randn(20, moe.config.hidden_size)
    with torch.no_grad():
        y = moe(x_TD.view(4, 5, -1))
        r = moe.route(x_TD)
        routed = moe.experts(x_TD, r.expert_ids_TK, r.weights_TK)
        shared = moe.shared_experts(x_TD)
    assert (side.starts, side.joins) == (1, 1)
    assert y.shape == (4, 5, moe.config.hidden_size)
    torch.testing.assert_close(y.view(20, -1), routed + shared, rtol=0, atol=0)
    assert moe.last_routing is not None and moe.last_routing.expert_ids_TK.shape[0] == 20
    # The path it replaces adds the shared output inside the routed sum: the same values here.
    moe.register_module("shared_stream", None)
    with torch.no_grad():
        torch.testing.assert_close(moe(x_TD).view(20, -1), y.view(20, -1))


def test_add_in_the_routed_sum():
    """SHARED_SUM: no join; the routed experts take the shared output as their add_TD (the
    fused MoE adds it in its sum's launch on CUDA; here `_routed` in its combine)."""
    moe = _moe(seed=3)
    side = Recording(add_in_sum=True)
    moe.register_module("shared_stream", side)
    x_TD = torch.randn(20, moe.config.hidden_size)
    with torch.no_grad():
        y = moe(x_TD)
        r = moe.route(x_TD)
        shared = moe.shared_experts(x_TD)
        want = moe.experts(x_TD, r.expert_ids_TK, r.weights_TK, add_TD=shared)
        routed = moe.experts(x_TD, r.expert_ids_TK, r.weights_TK)
    assert (side.starts, side.joins) == (1, 0)
    assert side.ready() is None  # no stream: nothing to wait for
    torch.testing.assert_close(y.view(20, -1), want, rtol=0, atol=0)
    torch.testing.assert_close(y.view(20, -1), routed + shared)


@pytest.mark.parametrize("case", ["grad", "too_many_tokens", "fused_applies"])
def test_runs_in_order_where_it_does_not_apply(case):
    moe = _moe()
    side = Recording()
    moe.register_module("shared_stream", side)
    T = MAX_TOKENS + 1 if case == "too_many_tokens" else 8
    x_TD = torch.randn(T, moe.config.hidden_size)
    if case == "fused_applies":
        moe.register_module("fused_shared", FusedTakesAll())
    with torch.set_grad_enabled(case == "grad"):
        y = moe(x_TD)
    assert (side.starts, side.joins) == (0, 0)
    if case == "fused_applies":
        assert torch.count_nonzero(y) == 0  # the fused stand-in's output


def test_transform_report(monkeypatch):
    monkeypatch.setenv("MOERAY_FUSED_SHARED_STREAM", "0")
    model = Transformer(tiny())
    moe_names = [n for n, m in model.named_modules() if isinstance(m, MoE)]
    assert moe_names
    report = overlap_shared_experts(model)
    assert sorted(report) == sorted(moe_names)
    assert all(why == "MOERAY_FUSED_SHARED_STREAM=0" for why in report.values()), report
    assert all(m._modules["shared_stream"] is None for m in model.modules() if isinstance(m, MoE))


def test_transform_needs_cuda():
    model = Transformer(tiny())  # the switch as shipped: on
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    moe.register_module("shared_stream", Recording())  # set before: taken away
    report = overlap_shared_experts(model)
    assert all("needs CUDA" in why for why in report.values()), report
    assert moe._modules["shared_stream"] is None
