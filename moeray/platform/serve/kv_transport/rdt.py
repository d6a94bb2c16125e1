"""The "rdt" KV transport: Ray Direct Transport through a pair of relay actors.

Legend: L cached layers, T tokens, C kv_lora_rank, R qk_rope_head_dim (see engine/disagg.py).

Serve creates its replica actors without `enable_tensor_transport`, so replica methods cannot use
`tensor_transport`. Each prefill replica therefore owns, per decode replica it meets, a pair of
small `KVRelay` actors: `src` on its own node and `dst` on the decode replica's node, joined in a
2-actor collective group (gloo on CPU, nccl on GPU; Ray 2.58 lets an actor join one group per
backend, hence one pair per (prefill, decode) replica pair). Rows go replica -> src (object store,
same node), src -> dst (RDT, out of band), dst -> decode replica (object store, same node). The
ticket holds the ObjectRef of dst's copy. On one node the two extra local hops cost more than RDT
saves; the RDT hop is what crosses nodes. The relays are owned by the prefill replica's process,
so Ray removes them with it.

Both ends wait at most `timeout_s` (serve's kv_transfer_timeout_s): the sender for a new pair's
collective group and for each transfer (a pair whose transfer is late is killed and rebuilt), the
receiver for the rows. Ray's own RDT fetch gives up only after 60 s
(RAY_rdt_fetch_fail_timeout_milliseconds), and a transfer can wait that out: the rows never reach
the dst relay's RDT store (benchmarks/notes-serve.md). The decode replica then recomputes the
prefill.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from typing import Any

import torch

from moeray.platform.engine.disagg import KVRows
from moeray.platform.serve.kv_transport.base import DecodeEndpoint, RDTTicket, check_timeout

log = logging.getLogger(__name__)

RELAY_GPUS = 0.01  # per relay on nccl: the relays share their replicas' GPUs


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


class RDTSender:
    name = "rdt"

    def __init__(self, backend: str = "gloo", *, timeout_s: float = 30.0) -> None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"RDT backend {backend!r}: accepted gloo, nccl")
        self.backend = backend
        self.timeout_s = check_timeout(timeout_s)
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
                # Ray's `remote` overloads omit enable_tensor_transport, which it accepts (RDT).
                relay = ray.remote(enable_tensor_transport=True)(KVRelay)  # type: ignore[call-overload]
                gpu = {"num_gpus": RELAY_GPUS} if self.backend == "nccl" else {}

                def on(node: str | None):
                    if node is None:
                        return {}
                    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}

                src = relay.options(num_cpus=0, **gpu, **on(here)).remote()
                dst = relay.options(num_cpus=0, **gpu, **on(dest.node_id)).remote()
                name = f"moeray-kv-{uuid.uuid4().hex[:12]}"
                # create_collective_group blocks on ray.get: keep it off the event loop. A pair
                # that is not up in time is killed (which also ends that ray.get).
                setup = asyncio.to_thread(create_collective_group, [src, dst], self.backend, name)
                try:
                    await asyncio.wait_for(setup, self.timeout_s)
                except TimeoutError:
                    ray.kill(src)
                    ray.kill(dst)
                    raise TimeoutError(
                        f"rdt: the relay pair to decode replica {dest.replica_id} was not up "
                        f"within kv_transfer_timeout_s={self.timeout_s}"
                    ) from None
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
        done = out.future()
        done.add_done_callback(lambda fut: self._check(fut, dest.replica_id, src))
        loop = asyncio.get_running_loop()
        loop.call_later(self.timeout_s, self._expire, done, dest.replica_id, src, dst)
        return RDTTicket(rows.start, out, rows.nbytes)

    def _expire(self, done: Any, replica_id: str, src: Any, dst: Any) -> None:
        """On the event loop, timeout_s after a send: a transfer not done by then takes its pair
        down. Both relays are killed, which fails the decode side's wait at once (it recomputes)
        and with it the sends queued behind the stuck receive on the same dst relay; the next
        send to that replica builds a new pair."""
        import ray

        if done.done():
            return
        with self._dead_lock:
            pair = self._pairs.get(replica_id)
            if pair is not None and pair[0] is src:
                del self._pairs[replica_id]
        ray.kill(src)
        ray.kill(dst)
        log.warning(
            "KV transfer to decode replica %s not done within kv_transfer_timeout_s=%s; its "
            "relay pair is killed and rebuilt on next use",
            replica_id,
            self.timeout_s,
        )

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

    def __init__(
        self, replica_id: str, device: torch.device | str = "cpu", *, timeout_s: float = 30.0
    ) -> None:
        import ray

        self.device = torch.device(device)
        self.timeout_s = check_timeout(timeout_s)
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
        try:
            kv_LTC, pe_LTR = await asyncio.wait_for(ticket.rows_ref, self.timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"rdt: {ticket.nbytes} bytes of KV rows not received within "
                f"kv_transfer_timeout_s={self.timeout_s}"
            ) from None
        return KVRows(ticket.start, kv_LTC.to(self.device), pe_LTR.to(self.device))

    def close(self) -> None:
        pass
