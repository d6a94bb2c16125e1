"""reserve_device_memory: after it, a fresh allocation in one thread no longer waits for another
stream's running kernel (a cudaMalloc does: the deadlock of pipeline.reserve_device_memory)."""

import threading
import time

import pytest
import torch

from moeray.platform.parallel.pipeline import reserve_device_memory

pytestmark = pytest.mark.gpu


def _alloc_while_busy(nbytes: int) -> float:
    """Seconds thread B needs to allocate `nbytes` and fill it on its own stream while thread A's
    stream runs a ~1 s kernel."""
    torch.cuda._sleep(1000)  # the first launch loads the module
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(50_000_000)
    torch.cuda.synchronize()
    cycles = int(50_000_000 / (time.perf_counter() - t0))  # ~1 s
    sa, sb = torch.cuda.Stream(), torch.cuda.Stream()
    busy = threading.Event()
    out: dict = {}

    def a():
        with torch.cuda.stream(sa):
            torch.cuda._sleep(cycles)
            busy.set()
            sa.synchronize()

    def b():
        busy.wait()
        time.sleep(0.05)
        t = time.perf_counter()
        with torch.cuda.stream(sb):
            x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            x.fill_(1)
            sb.synchronize()
        out["b"] = time.perf_counter() - t
        del x

    ta, tb = threading.Thread(target=a), threading.Thread(target=b)
    ta.start(), tb.start()
    ta.join(), tb.join()
    return out["b"]


def test_reserved_allocation_does_not_wait_for_the_gpu():
    torch.cuda.empty_cache()
    cold = _alloc_while_busy(3 << 28)
    torch.cuda.empty_cache()
    large, small = reserve_device_memory(torch.device("cuda"), 0.2, 0.01)
    assert large > 3 << 28 and small > 0
    warm_large = _alloc_while_busy(3 << 28)  # carved from the reserved block
    warm_small = _alloc_while_busy(1 << 19)  # from a reserved small-pool segment
    print(f"\nB's 768 MiB alloc+fill while another stream runs 1 s: {cold * 1e3:.0f} ms cold, "
          f"{warm_large * 1e3:.1f} ms reserved; 512 KiB reserved {warm_small * 1e3:.1f} ms")
    assert warm_large < 0.25 and warm_small < 0.25
    torch.cuda.empty_cache()


def test_reserve_rejects_bad_fractions():
    with pytest.raises(ValueError, match="large_fraction=0.9, small_fraction=0.2"):
        reserve_device_memory(torch.device("cuda"), 0.9, 0.2)
