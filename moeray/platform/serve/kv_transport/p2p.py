"""The raw send/recv floor of the KV transports, a bare torch.distributed pair of Ray actors
(`moeray bench serve --launch`, `moeray bench kv`)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import torch

from moeray.platform.serve.kv_transport.base import (
    check_timeout,
    device_identity,
    pair_process_group,
)


class P2PPeer:
    """One side of a bare torch.distributed pair (a Ray actor): the floor a KV transport is
    measured against - the same bytes, plain send/recv, no Serve, no tickets."""

    def __init__(self, rank: int, backend: str, device: str, timeout_s: float = 60.0) -> None:
        import torch.distributed as dist

        self.rank, self.backend, self.timeout_s = rank, backend, timeout_s
        self.device = torch.device(device)
        self.store = (
            dist.TCPStore(
                "127.0.0.1",
                0,
                is_master=True,
                wait_for_workers=False,
                timeout=timedelta(seconds=timeout_s),
            )
            if rank == 1
            else None
        )
        # The pair's gloo/nccl group, made by `join` (Any: torch's stubs give its Backend no
        # send/recv).
        self.pg: Any = None

    def device_id(self) -> str | None:
        """This peer's physical GPU (its UUID), None on CPU."""
        return device_identity(self.device)

    def store_port(self) -> int:
        if self.store is None:
            raise RuntimeError(f"P2PPeer rank {self.rank} has no store (rank 1 hosts it)")
        return self.store.port

    def join(self, port: int) -> None:
        import torch.distributed as dist

        store = self.store or dist.TCPStore(
            "127.0.0.1", port, is_master=False, timeout=timedelta(seconds=self.timeout_s)
        )
        self.pg = pair_process_group(
            self.backend, dist.PrefixStore("raw", store), self.rank, self.timeout_s, self.device
        )

    def run(self, nbytes: int, iters: int, warmup: int = 3) -> list[float]:
        """Ping-pong: rank 0 sends `nbytes`, rank 1 answers with one element; rank 0 returns the
        round-trip seconds of each timed iteration (an upper bound on the one-way time)."""
        pg = self.pg
        if pg is None:
            raise RuntimeError(f"P2PPeer rank {self.rank}: run before join")
        buf = torch.empty(max(1, nbytes // 4), dtype=torch.float32, device=self.device)
        ack = torch.zeros(1, dtype=torch.float32, device=self.device)
        times = []
        for i in range(warmup + iters):
            if self.rank == 0:
                t0 = time.perf_counter()
                pg.send([buf], 1, 0).wait()
                pg.recv([ack], 1, 1).wait()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            else:
                pg.recv([buf], 0, 0).wait()
                pg.send([ack], 0, 1).wait()
        return times


def raw_p2p_seconds(
    nbytes: int, *, backend: str = "gloo", iters: int = 20, timeout_s: float = 60.0
) -> list[float]:
    """Round-trip seconds of plain send/recv of `nbytes` between two fresh Ray actors on this node
    (gloo on CPU; nccl needs two GPUs). Ray must be initialized.

    Never hangs: nccl with fewer than two free GPUs is a ValueError at once (an NCCL pair on one
    device hangs in its rendezvous, and a second whole-GPU actor would never be placed), two
    actors that report the same GPU are a ValueError, and every wait ends after `timeout_s`
    (TimeoutError; the run itself gets `iters` times that)."""
    import ray
    from ray.exceptions import GetTimeoutError

    if nbytes < 1 or iters < 1:
        raise ValueError(f"nbytes={nbytes} and iters={iters} must be >= 1")
    check_timeout(timeout_s)
    if backend == "nccl":
        free = ray.available_resources().get("GPU", 0.0)
        if free < 2:
            raise ValueError(
                f"the raw nccl baseline needs 2 free GPUs (one per rank: an NCCL pair cannot "
                f"share a device), this cluster has {free:g} free"
            )
    device = "cuda" if backend == "nccl" else "cpu"
    opts = {"num_cpus": 0, "num_gpus": 1 if backend == "nccl" else 0}
    peer = ray.remote(P2PPeer).options(**opts)
    # Any: Ray types an actor handle's `method.remote` only for methods decorated @ray.method.
    a: Any = peer.remote(0, backend, device, timeout_s)
    b: Any = peer.remote(1, backend, device, timeout_s)
    step = "placing the two actors"
    try:
        ids = ray.get([a.device_id.remote(), b.device_id.remote()], timeout=timeout_s)
        if ids[0] is not None and ids[0] == ids[1]:
            raise ValueError(f"both raw {backend} peers are on GPU {ids[0]}: no NCCL pair there")
        step = f"the {backend} rendezvous"
        port = ray.get(b.store_port.remote(), timeout=timeout_s)
        ray.get([a.join.remote(port), b.join.remote(port)], timeout=timeout_s)
        step = f"{iters} ping-pongs of {nbytes} bytes"
        times, _ = ray.get(
            [a.run.remote(nbytes, iters), b.run.remote(nbytes, iters)],
            timeout=timeout_s * (iters + 3),
        )
        return times
    except GetTimeoutError:
        raise TimeoutError(f"raw {backend} send/recv: {step} took over its timeout") from None
    finally:
        ray.kill(a)
        ray.kill(b)
