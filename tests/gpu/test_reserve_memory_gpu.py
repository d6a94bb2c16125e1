"""A fresh allocation in one thread must not wait for another stream's running kernel: with
torch's native allocator a cudaMalloc does (the deadlock of distributed.reserve_device_memory),
unless the stream's cache was grown beforehand; the stream-ordered allocator the pipeline workers
use (distributed.CUDA_ENV) never waits."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moeray.platform.parallel.distributed import CUDA_ENV, reserve_device_memory

pytestmark = pytest.mark.gpu

# Thread A runs a ~1 s kernel on its stream; thread B then allocates `nbytes` on its own stream and
# fills it. Returns B's seconds. Source text, so that a fresh interpreter can run it too.
ALLOC_WHILE_BUSY = textwrap.dedent("""
    import threading, time
    import torch

    def alloc_while_busy(nbytes, sa, sb):
        torch.cuda._sleep(1000)  # the first launch loads the module
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.cuda._sleep(50_000_000)
        torch.cuda.synchronize()
        cycles = int(50_000_000 / (time.perf_counter() - t0))  # ~1 s
        busy, out = threading.Event(), {}

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
""")


def _alloc_while_busy(nbytes, sa, sb) -> float:
    scope: dict = {}
    exec(ALLOC_WHILE_BUSY, scope)
    return scope["alloc_while_busy"](nbytes, sa, sb)


def test_reserved_allocation_does_not_wait_for_the_gpu():
    if torch.cuda.get_allocator_backend() != "native":
        pytest.skip("this checks torch's native caching allocator")
    sa, sb = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.empty_cache()
    cold = _alloc_while_busy(3 << 28, sa, sb)
    torch.cuda.empty_cache()
    large, small = reserve_device_memory(torch.device("cuda"), 0.2, 0.01, streams=[sb])
    assert large > 3 << 28 and small > 0
    warm_large = _alloc_while_busy(3 << 28, sa, sb)  # carved from sb's reserved block
    warm_small = _alloc_while_busy(1 << 19, sa, sb)  # from one of sb's reserved small-pool segments
    print(
        f"\nB's 768 MiB alloc+fill while another stream runs 1 s: {cold * 1e3:.0f} ms cold, "
        f"{warm_large * 1e3:.1f} ms reserved; 512 KiB reserved {warm_small * 1e3:.1f} ms"
    )
    assert warm_large < 0.25 and warm_small < 0.25
    torch.cuda.empty_cache()


def test_stream_ordered_allocator_does_not_wait_for_the_gpu():
    # a fresh interpreter: torch picks its allocator at import
    script = ALLOC_WHILE_BUSY + textwrap.dedent("""
        backend = torch.cuda.get_allocator_backend()
        assert backend == "cudaMallocAsync", backend
        sa, sb = torch.cuda.Stream(), torch.cuda.Stream()
        print(alloc_while_busy(3 << 28, sa, sb), alloc_while_busy(5 << 28, sa, sb))
    """)
    env = {**os.environ, **CUDA_ENV}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = map(float, done.stdout.split()[-2:])
    print(
        f"\ncudaMallocAsync: B's 768 MiB alloc+fill while another stream runs 1 s: "
        f"{first * 1e3:.1f} ms; then 1.25 GiB (pool grows): {second * 1e3:.1f} ms"
    )
    assert first < 0.25 and second < 0.25


def test_reserve_rejects_bad_fractions():
    with pytest.raises(ValueError, match=r"large_fraction=0.9, small_fraction=0.2"):
        reserve_device_memory(torch.device("cuda"), 0.9, 0.2)
