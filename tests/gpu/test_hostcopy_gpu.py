"""hostcopy.ints on the GPU: right values, and a wait inside it leaves other threads free.

The DualPipe F&B overlap runs a forward in one host thread and a backward in another; a host read
in one (per-expert token counts) must not stop the other from allocating and launching, or two
NCCL ranks deadlock (hostcopy.py says how). Here thread A reads counts from behind a ~1 s kernel
while thread B allocates fresh memory and launches work on its own stream.
"""

import threading
import time

import pytest
import torch

from moeray.platform import hostcopy

pytestmark = pytest.mark.gpu


def test_ints_equals_tolist():
    t = torch.randint(-5, 1 << 40, (37,), device="cuda")
    assert hostcopy.ints(t) == t.tolist()
    assert hostcopy.ints(t[:0]) == []
    with pytest.raises(ValueError, match="1-D integer"):
        hostcopy.ints(t.float())


def _other_thread_latency(read) -> tuple[float, float]:
    """(seconds thread B needed for its alloc + launch + own-stream sync, seconds A's read took)."""
    # calibrate a ~1 s busy kernel on this GPU (the first launch also pays for module loading)
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(100_000_000)
    torch.cuda.synchronize()
    cycles = int(100_000_000 / (time.perf_counter() - t0))
    sa, sb = torch.cuda.Stream(), torch.cuda.Stream()
    counts = torch.arange(64, device="cuda")
    started = threading.Event()
    out: dict = {}

    def a():
        with torch.cuda.stream(sa):
            torch.cuda._sleep(cycles)
            c = counts + 1  # ready only after the sleep
            started.set()
            t = time.perf_counter()
            out["values"] = read(c)
            out["a"] = time.perf_counter() - t

    def b():
        torch.cuda.set_device(counts.device)
        started.wait()
        time.sleep(0.05)  # A is inside its read now
        t = time.perf_counter()
        with torch.cuda.stream(sb):
            fresh = torch.empty(3 << 28, dtype=torch.uint8, device="cuda")  # 768 MiB: a new cudaMalloc
            fresh.fill_(1)
            sb.synchronize()
        out["b"] = time.perf_counter() - t

    ta, tb = threading.Thread(target=a), threading.Thread(target=b)
    ta.start(), tb.start()
    ta.join(), tb.join()
    assert out["values"] == list(range(1, 65))
    torch.cuda.empty_cache()
    return out["b"], out["a"]


def test_ints_wait_does_not_block_other_threads():
    b_fixed, a_fixed = _other_thread_latency(hostcopy.ints)
    b_page, a_page = _other_thread_latency(lambda c: c.tolist())
    print(f"\nthread B alloc+launch+sync while A reads behind a ~1 s kernel: hostcopy.ints "
          f"{b_fixed * 1e3:.1f} ms (A {a_fixed * 1e3:.0f} ms); pageable .tolist() {b_page * 1e3:.1f} ms "
          f"(A {a_page * 1e3:.0f} ms)")
    assert a_fixed > 0.5, "A's read should have waited for the ~1 s kernel"
    assert b_fixed < 0.25, f"thread B waited {b_fixed:.3f} s behind A's hostcopy.ints"
