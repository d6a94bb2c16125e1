"""Device -> host reads that never hold the CUDA driver while they wait.

`tensor.tolist()` on a CUDA tensor copies into pageable host memory. The driver stages such a
copy and holds a process-wide lock until the device has drained the stream up to it: other host
threads of the process then block in their next cudaMalloc, module load or even kernel launch.
With NCCL that is a deadlock, not a stall: the stream being drained may wait on a receive whose
peer waits, in turn, for a message that one of the blocked threads was about to send. Two ranks of
the threaded DualPipe F&B overlap hung so (2x and 4x H200, 2026-11-27: one thread inside
`counts.tolist()`, the other blocked in a cuBLAS or Triton launch; benchmarks/notes-train.md).
The same failure is described for XLA (pageable copy vs cudaMalloc in NCCL init).

`ints(t)` copies into pinned memory asynchronously and waits on an event recorded after the copy:
only the calling thread waits, and only for its own stream.
"""

from __future__ import annotations

import torch


def ints(t: torch.Tensor) -> list[int]:
    """The values of a 1-D integer tensor as Python ints (what `t.tolist()` returns)."""
    if t.dim() != 1 or t.is_floating_point():
        raise ValueError(f"ints() takes a 1-D integer tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if not t.is_cuda:
        return t.tolist()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return host.tolist()
