"""The kernel benches' timers on the GPU (marker gpu; skipped without CUDA): `device_ms` counts a
call's kernels and leaves the host's gaps out, the property that makes it the stable baseline of
a host-bound loop."""

import time

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_device_ms_leaves_host_gaps_out():
    from moeray.kernels.bench.common import _bench, _bench_slow, device_ms

    a = torch.randn(4096, 4096, device="cuda")
    one = _bench(lambda: a @ a)

    def loop():  # five matmuls with 10 ms of host time after each
        for _ in range(5):
            a @ a
            time.sleep(0.01)

    gpu = device_ms(loop)
    assert gpu is not None, "the profiler saw no CUDA kernels"
    assert 0.5 * 5 * one < gpu < 2.0 * 5 * one, (gpu, one)
    # the 50 ms of sleeps are not in it: at least half of them is missing from the GPU time
    # (_bench_slow is the loop's wall time a call: its 5 matmuls and 50 ms of sleeps)
    assert gpu < _bench_slow(loop) - 25.0
