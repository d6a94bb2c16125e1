"""graph_capture (moeray/platform/graph_capture.py) against the failure it exists for: a dead
CUDA graph in a reference cycle, destroyed by Python's collector in the middle of another
capture, breaks that capture under plain torch.cuda.graph (torch no longer collects before a
capture) and not under graph_capture. The collector is modelled by a collection that runs only
while automatic collection is enabled, as it does. Marker gpu; skipped without CUDA."""

import gc

import pytest
import torch

from moeray.platform.graph_capture import graph_capture

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _dead_graph_in_a_cycle(x: torch.Tensor) -> None:
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        x.mul_(1.0)
    holder: dict[str, object] = {"graph": g}
    holder["self"] = holder  # only the cyclic collector frees it


def _body(x: torch.Tensor) -> torch.Tensor:
    y = x + 1
    if gc.isenabled():  # what an automatic collection triggered here would do
        gc.collect()
    return y * 2


def test_a_collection_mid_capture_breaks_a_plain_capture_not_graph_capture():
    x = torch.ones(8, device="cuda")
    _dead_graph_in_a_cycle(x)
    plain = torch.cuda.CUDAGraph()
    with pytest.raises(Exception, match="capture"):
        with torch.cuda.graph(plain, capture_error_mode="thread_local"):
            _body(x)
    del plain
    torch.cuda.synchronize()

    _dead_graph_in_a_cycle(x)
    graph = torch.cuda.CUDAGraph()
    assert gc.isenabled()
    with graph_capture(graph):
        y = _body(x)
    assert gc.isenabled()  # restored
    x.fill_(3.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.full_like(x, 8.0))
    gc.collect()  # the second dead graph goes now, outside any capture
