"""One way to capture a CUDA graph, shared by the serving engine's step graphs and training's
micro-batch graphs.

torch.cuda.graph no longer runs gc.collect() before a capture (torch 2.11+: only under
torch.compiler.config.force_cudagraph_gc), so a dead object in a reference cycle that holds a
CUDA graph (an engine dropped by a test or a bench, a graph replaced) can be found by Python's
automatic collector in the middle of a capture: its CUDAGraph is reset there, a call the
capturing thread may not make, and the capture fails with "operation failed due to a previous
error during capture" (tests/gpu/test_graph_capture_gpu.py shows both). Collection is paused for
the capture, and the capture is thread-local: other threads' CUDA calls (a process group's
watchdog, a serving process's transfer or telemetry threads) stay legal, which the default global
mode forbids process-wide."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def graph_capture(graph: torch.cuda.CUDAGraph, pool: Any = None) -> Iterator[None]:
    """Capture the block's CUDA work into `graph` (in the memory pool `pool`, None: its own),
    with the cyclic garbage collector paused and thread-local capture errors."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            yield
    finally:
        if was_enabled:
            gc.enable()
