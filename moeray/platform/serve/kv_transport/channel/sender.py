"""The prefill side of the channel transport (the design is in `channel/__init__.py`)."""

from __future__ import annotations

import itertools
import logging
import pickle
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch

from moeray.platform.engine.disagg import KVRows
from moeray.platform.serve.kv_transport.base import (
    ChannelTicket,
    DecodeEndpoint,
    device_identity,
    pair_process_group,
)
from moeray.platform.serve.kv_transport.channel import TICKET_QUEUE

log = logging.getLogger(__name__)


class ChannelSender:
    name = "channel"

    def __init__(
        self,
        backend: str = "gloo",
        *,
        timeout_s: float = 30.0,
        device: torch.device | str = "cpu",
        device_id: str | None = None,
    ) -> None:
        """device_id: the physical device's identity (default `device_identity(device)`)."""
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"channel backend {backend!r}: accepted gloo, nccl")
        self.backend = backend
        self.timeout_s = timeout_s
        self.device = torch.device(device)
        self.device_id = device_id if device_id is not None else device_identity(self.device)
        self.same_device: set[str] = set()  # decode replicas on this GPU: rows go in the reply
        self.id = uuid.uuid4().hex[:16]
        self._groups: dict[str, Any] = {}
        # Per decode replica: the client tickets are published with.
        self._stores: dict[str, Any] = {}
        self._group_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._tags = itertools.count()
        # gloo matches by tag, so sends may run concurrently; nccl matches in issue order, so one
        # thread publishes tickets and issues sends in tag order.
        self._pool = ThreadPoolExecutor(
            max_workers=4 if backend == "gloo" else 1, thread_name_prefix="moeray-kv-send"
        )
        self.failures = 0

    def _dest_lock(self, dest: DecodeEndpoint) -> threading.Lock:
        with self._lock:
            return self._group_locks.setdefault(dest.replica_id, threading.Lock())

    def _connect_store(self, dest: DecodeEndpoint) -> Any:
        """A new client of the decode replica's TCPStore."""
        import torch.distributed as dist

        if dest.store_port is None:
            raise ValueError(
                f"decode replica {dest.replica_id} sent no store_port (the channel transport's)"
            )
        return dist.TCPStore(
            dest.host,
            dest.store_port,
            is_master=False,
            timeout=timedelta(seconds=self.timeout_s),
        )

    def _store(self, dest: DecodeEndpoint) -> Any:
        """The client that publishes tickets. Not the process group's: its rendezvous blocks on
        the store while it waits for the decode side, and a publish must not queue behind it."""
        with self._lock:  # not the per-destination lock: `_group` holds that during the rendezvous
            store = self._stores.get(dest.replica_id)
            if store is None:
                store = self._connect_store(dest)
                self._stores[dest.replica_id] = store
            return store

    def _group(self, dest: DecodeEndpoint) -> Any:
        import torch.distributed as dist

        with self._dest_lock(dest):
            pg = self._groups.get(dest.replica_id)
            if pg is None:
                store = self._connect_store(dest)
                # Blocks until the decode replica joins as rank 1 (on our first ticket, which
                # `_publish` put in its store before we got here).
                pg = pair_process_group(
                    self.backend,
                    dist.PrefixStore(f"kv/{self.id}", store),
                    0,
                    self.timeout_s,
                    self.device,
                )
                self._groups[dest.replica_id] = pg
            return pg

    @staticmethod
    def _publish(store: Any, ticket: ChannelTicket) -> None:
        # queue_push does not wait for an answer (7 us on a 2-core CPU host, vs 62 us for a
        # compare_set round trip).
        store.queue_push(TICKET_QUEUE, pickle.dumps(ticket))

    def _send_blocking(
        self,
        dest: DecodeEndpoint,
        ticket: ChannelTicket,
        kv_LTC: torch.Tensor,
        pe_LTR: torch.Tensor,
        published: bool,
    ) -> None:
        if not published:
            try:
                self._publish(self._store(dest), ticket)
            except Exception as e:
                log.warning("KV channel: could not publish ticket of %s: %s", ticket.request_id, e)
        pg = self._group(dest)
        tag = ticket.tag
        works = [pg.send([kv_LTC.contiguous()], 1, tag), pg.send([pe_LTR.contiguous()], 1, tag + 1)]
        for w in works:
            w.wait()

    def _done(self, fut: Future) -> None:
        if fut.exception() is not None:
            self.failures += 1
            log.warning("KV channel send failed: %s", fut.exception())

    async def send(
        self, request_id: str, rows: KVRows, dest: DecodeEndpoint | None
    ) -> ChannelTicket | KVRows:
        if dest is None or dest.store_port is None:
            raise ValueError(
                "channel transport needs the decode replica's endpoint (store host/port)"
            )
        if self.device_id is not None and dest.device_id == self.device_id:
            # Two ranks of one NCCL pair on one GPU hang in the rendezvous (minutes, not the
            # transfer timeout): the rows go in the prefill call's reply (the object store).
            if dest.replica_id not in self.same_device:
                self.same_device.add(dest.replica_id)
                log.warning(
                    "KV channel: decode replica %s is on this prefill replica's GPU %s "
                    "(fractional --gpus-per-replica); NCCL cannot pair two ranks on one device, "
                    "so its KV goes through the object store",
                    dest.replica_id,
                    self.device_id,
                )
            return rows
        tag = 2 * next(self._tags)
        ticket = ChannelTicket(
            rows.start,
            self.id,
            tag,
            tuple(rows.kv_LTC.shape),
            tuple(rows.pe_LTR.shape),
            str(rows.kv_LTC.dtype).removeprefix("torch."),
            rows.nbytes,
            request_id,
        )
        # Published here, before the hop to the send thread (~0.25 ms to wake it on a 2-core CPU
        # host), once the store client exists; the first send to a decode replica connects it
        # (may block) on the send thread and publishes there.
        store = self._stores.get(dest.replica_id)
        published = False
        if store is not None:
            try:
                self._publish(store, ticket)
                published = True
            except Exception as e:
                log.warning("KV channel: could not publish ticket of %s: %s", request_id, e)
        # Not awaited: the send completes once the decode replica posts its receive (on the
        # store notice or, failing that, on the reply's ticket). The future keeps the tensors
        # alive until then.
        fut = self._pool.submit(
            self._send_blocking, dest, ticket, rows.kv_LTC, rows.pe_LTR, published
        )
        fut.add_done_callback(self._done)
        return ticket

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._groups.clear()
        self._stores.clear()
