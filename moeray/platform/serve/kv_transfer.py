"""KV transfer from a prefill replica to a decode replica, behind one interface.

Legend: L cached layers, T tokens, C kv_lora_rank, R qk_rope_head_dim (see engine/disagg.py).

The decode replica sends its `DecodeEndpoint` with each prefill call; the prefill replica's
`KVSender.send` turns the exported rows into a *ticket* that rides back in the call's return value;
the decode replica's `KVReceiver.receive(ticket)` turns the ticket back into rows. Only the rows the
decode side lacks travel (the decode replica asks for rows from the end of its cached prefix).

Transports (`ServeConfig.kv_transport`):
  * "object_store": the ticket *is* the rows; Ray carries them in the call's reply. Works everywhere;
    the default.
  * "rdt": Ray Direct Transport. Serve creates its replica actors without
    `enable_tensor_transport`, so replica methods cannot use `tensor_transport`. Each prefill
    replica therefore owns, per decode replica it meets, a pair of small `KVRelay` actors: `src` on
    its own node and `dst` on the decode replica's node, joined in a 2-actor collective group
    (gloo on CPU, nccl on GPU; Ray 2.58 lets an actor join one group per backend, hence one pair
    per (prefill, decode) replica pair). Rows go replica -> src (object store, same node),
    src -> dst (RDT, out of band), dst -> decode replica (object store, same node). The ticket holds
    the ObjectRef of dst's copy. On one node the two extra local hops cost more than RDT saves; the
    RDT hop is what crosses nodes.
  * "channel": a persistent torch.distributed group of two ranks between the prefill and the decode
    replica *processes* (no relay): set up once per pair (the decode replica hosts a TCPStore for
    the rendezvous), then plain send/recv of the rows under a per-transfer tag; Ray carries only
    the ticket (shapes, dtype, tag). gloo on CPU (tested); nccl on GPU is the same code with the
    tensors on the device and sends issued in tag order (NCCL matches point-to-point calls in
    issue order, not by tag). It lives in `kv_channel.py` (with how its receive is posted early).

If any step fails (relay or peer gone, timeout), the decode replica recomputes the prefill itself
(`serve/worker.py`), so the request still completes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from moeray.platform.engine.disagg import KVRows

log = logging.getLogger(__name__)

TRANSPORTS = ("object_store", "rdt", "channel")


@dataclass(frozen=True)
class DecodeEndpoint:
    """Where a decode replica receives KV: sent with every prefill call."""

    replica_id: str
    node_id: str | None = None  # Ray node id (rdt: where the dst relay must live)
    host: str = "127.0.0.1"  # channel: the TCPStore host
    store_port: int | None = None  # channel: the TCPStore port


def backend_for(device: torch.device | str) -> str:
    """gloo for CPU tensors, nccl for CUDA tensors."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


# ---- object store -----------------------------------------------------------------------------
class ObjectStoreSender:
    name = "object_store"

    async def send(self, request_id: str, rows: KVRows, dest: DecodeEndpoint | None) -> KVRows:
        return rows

    def close(self) -> None:
        pass


class ObjectStoreReceiver:
    name = "object_store"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def endpoint(self) -> DecodeEndpoint:
        return DecodeEndpoint(replica_id="local")

    def expect(self, request_id: str) -> None:
        """No early receive: the rows come in the prefill call's reply."""
        return None

    def cancel(self, request_id: str) -> None:
        pass

    async def receive(self, ticket: Any) -> KVRows:
        if not isinstance(ticket, KVRows):
            raise TypeError(
                f"object_store receiver got a {type(ticket).__name__} ticket, not KVRows "
                "(prefill and decode configured with different kv_transport?)"
            )
        return ticket

    def close(self) -> None:
        pass


# ---- Ray Direct Transport through relay actors ------------------------------------------------
class KVRelay:
    """One end of a relay pair (a plain Ray actor, created with enable_tensor_transport)."""

    def take(self, kv_LTC: torch.Tensor, pe_LTR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Called with .options(tensor_transport=...): the returned tensors stay here until the
        # dst relay pulls them over the collective group.
        return kv_LTC, pe_LTR

    def receive(self, rows: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # `rows` arrived out of band; returning them puts them in this node's object store.
        kv_LTC, pe_LTR = rows
        return kv_LTC, pe_LTR

    def ping(self) -> bool:
        return True


@dataclass(frozen=True)
class RDTTicket:
    start: int
    rows_ref: Any  # ObjectRef of (kv_LTC, pe_LTR), produced by the dst relay on the decode node
    nbytes: int


class RDTSender:
    name = "rdt"

    def __init__(self, backend: str = "gloo") -> None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"RDT backend {backend!r}: accepted gloo, nccl")
        self.backend = backend
        self._pairs: dict[str, tuple[Any, Any, str]] = {}
        self._lock = asyncio.Lock()
        self._dead_lock = threading.Lock()  # _check runs on Ray's callback thread
        self._orphans: list[Any] = []  # src relays whose dst died: killed on the next _pair

    async def _pair(self, dest: DecodeEndpoint) -> tuple[Any, Any]:
        import ray

        async with self._lock:
            with self._dead_lock:
                orphans, self._orphans = self._orphans, []
            for relay in orphans:
                ray.kill(relay)
            with self._dead_lock:
                pair = self._pairs.get(dest.replica_id)
            if pair is None:
                from ray.experimental.collective import create_collective_group
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                here = ray.get_runtime_context().get_node_id()
                relay = ray.remote(enable_tensor_transport=True)(KVRelay)
                gpu = {"num_gpus": 0.01} if self.backend == "nccl" else {}

                def on(node: str | None):
                    if node is None:
                        return {}
                    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}

                src = relay.options(num_cpus=0, **gpu, **on(here)).remote()
                dst = relay.options(num_cpus=0, **gpu, **on(dest.node_id)).remote()
                name = f"moeray-kv-{uuid.uuid4().hex[:12]}"
                # create_collective_group blocks on ray.get: keep it off the event loop.
                await asyncio.to_thread(create_collective_group, [src, dst], self.backend, name)
                pair = (src, dst, name)
                with self._dead_lock:
                    self._pairs[dest.replica_id] = pair
            return pair[0], pair[1]

    async def send(self, request_id: str, rows: KVRows, dest: DecodeEndpoint | None) -> RDTTicket:
        if dest is None or dest.replica_id == "local":
            raise ValueError("rdt transport needs the decode replica's endpoint (node id)")
        src, dst = await self._pair(dest)
        ref = src.take.options(tensor_transport=self.backend).remote(rows.kv_LTC, rows.pe_LTR)
        out = dst.receive.remote(ref)
        out.future().add_done_callback(lambda fut: self._check(fut, dest.replica_id, src))
        return RDTTicket(rows.start, out, rows.nbytes)

    def _check(self, fut: Any, replica_id: str, src: Any) -> None:
        """A relay that died takes its pair with it: the next send to that decode replica builds
        a new pair instead of failing (and recomputing) forever. Runs on Ray's callback thread,
        where calling Ray (ray.kill) would deadlock: the orphaned src relay is killed later, on
        the event loop, by the next `_pair`."""
        import ray

        if not isinstance(fut.exception(), ray.exceptions.RayActorError):
            return
        with self._dead_lock:
            pair = self._pairs.get(replica_id)
            if pair is not None and pair[0] is src:
                del self._pairs[replica_id]
                self._orphans.append(src)
                log.warning(
                    "KV relay pair for decode replica %s died; rebuilding on next use", replica_id
                )

    def close(self) -> None:
        from ray.experimental.collective import destroy_collective_group

        for _src, _dst, name in self._pairs.values():
            try:
                destroy_collective_group(name)
            except Exception:
                pass
        self._pairs.clear()


class RDTReceiver:
    name = "rdt"

    def __init__(self, replica_id: str, device: torch.device | str = "cpu") -> None:
        import ray

        self.device = torch.device(device)
        self._endpoint = DecodeEndpoint(
            replica_id=replica_id, node_id=ray.get_runtime_context().get_node_id()
        )

    def endpoint(self) -> DecodeEndpoint:
        return self._endpoint

    def expect(self, request_id: str) -> None:
        """No early receive: the dst relay's ObjectRef exists only once the prefill has sent."""
        return None

    def cancel(self, request_id: str) -> None:
        pass

    async def receive(self, ticket: Any) -> KVRows:
        if not isinstance(ticket, RDTTicket):
            raise TypeError(f"rdt receiver got a {type(ticket).__name__} ticket")
        kv_LTC, pe_LTR = await ticket.rows_ref
        return KVRows(ticket.start, kv_LTC.to(self.device), pe_LTR.to(self.device))

    def close(self) -> None:
        pass


def make_sender(transport: str, device: torch.device | str = "cpu", *, timeout_s: float = 30.0):
    if transport == "object_store":
        return ObjectStoreSender()
    if transport == "rdt":
        return RDTSender(backend_for(device))
    if transport == "channel":
        from moeray.platform.serve.kv_channel import ChannelSender

        return ChannelSender(backend_for(device), timeout_s=timeout_s, device=device)
    raise ValueError(f"kv_transport={transport!r}: accepted {TRANSPORTS}")


def make_receiver(
    transport: str,
    replica_id: str,
    device: torch.device | str = "cpu",
    *,
    host: str = "127.0.0.1",
    timeout_s: float = 30.0,
):
    if transport == "object_store":
        return ObjectStoreReceiver(device)
    if transport == "rdt":
        return RDTReceiver(replica_id, device)
    if transport == "channel":
        from moeray.platform.serve.kv_channel import ChannelReceiver

        return ChannelReceiver(
            replica_id, backend_for(device), host=host, timeout_s=timeout_s, device=device
        )
    raise ValueError(f"kv_transport={transport!r}: accepted {TRANSPORTS}")


# ---- raw point-to-point baseline ----------------------------------------------------------------
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
        self.pg = None

    def store_port(self) -> int:
        return self.store.port

    def join(self, port: int) -> None:
        import torch.distributed as dist

        from moeray.platform.serve.kv_channel import pair_process_group

        store = self.store or dist.TCPStore(
            "127.0.0.1", port, is_master=False, timeout=timedelta(seconds=self.timeout_s)
        )
        self.pg = pair_process_group(
            self.backend, dist.PrefixStore("raw", store), self.rank, self.timeout_s, self.device
        )

    def run(self, nbytes: int, iters: int, warmup: int = 3) -> list[float]:
        """Ping-pong: rank 0 sends `nbytes`, rank 1 answers with one element; rank 0 returns the
        round-trip seconds of each timed iteration (an upper bound on the one-way time)."""
        import time

        buf = torch.empty(max(1, nbytes // 4), dtype=torch.float32, device=self.device)
        ack = torch.zeros(1, dtype=torch.float32, device=self.device)
        times = []
        for i in range(warmup + iters):
            if self.rank == 0:
                t0 = time.perf_counter()
                self.pg.send([buf], 1, 0).wait()
                self.pg.recv([ack], 1, 1).wait()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            else:
                self.pg.recv([buf], 0, 0).wait()
                self.pg.send([ack], 0, 1).wait()
        return times


def raw_p2p_seconds(nbytes: int, *, backend: str = "gloo", iters: int = 20) -> list[float]:
    """Round-trip seconds of plain send/recv of `nbytes` between two fresh Ray actors on this node
    (gloo on CPU; nccl needs two GPUs). Ray must be initialized."""
    import ray

    if nbytes < 1 or iters < 1:
        raise ValueError(f"nbytes={nbytes} and iters={iters} must be >= 1")
    device = "cuda" if backend == "nccl" else "cpu"
    opts = {"num_cpus": 0, "num_gpus": 1 if backend == "nccl" else 0}
    peer = ray.remote(P2PPeer)
    a, b = (
        peer.options(**opts).remote(0, backend, device),
        peer.options(**opts).remote(1, backend, device),
    )
    try:
        port = ray.get(b.store_port.remote())
        ray.get([a.join.remote(port), b.join.remote(port)])
        times, _ = ray.get([a.run.remote(nbytes, iters), b.run.remote(nbytes, iters)])
        return times
    finally:
        ray.kill(a)
        ray.kill(b)
