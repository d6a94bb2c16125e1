"""The decode side of the channel transport: receives, the early receive on the ticket queue, and
the nccl tag order (the design is in `channel/__init__.py`)."""

from __future__ import annotations

import asyncio
import functools
import logging
import pickle
import threading
import time
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from moeray.platform.engine.disagg import KVRows
from moeray.platform.serve.kv_transport.base import (
    ChannelTicket,
    DecodeEndpoint,
    check_timeout,
    device_identity,
    pair_process_group,
)
from moeray.platform.serve.kv_transport.channel import IDLE_POP_S, QUEUE_STOP, TICKET_QUEUE

log = logging.getLogger(__name__)


def _copy_outcome(src: Future, dst: Future) -> None:
    """Give `dst` the result or exception of the finished `src` (unless `dst` was cancelled)."""
    try:
        if src.cancelled():
            dst.cancel()
        elif src.exception() is not None:
            dst.set_exception(src.exception())
        else:
            dst.set_result(src.result())
    except InvalidStateError:  # dst cancelled meanwhile (close)
        pass


@dataclass(eq=False)
class _Expectation:
    """One request's early receive. Mutable (its state moves under ChannelReceiver._lock):
    waiting -> receiving (its ticket came through the queue; the receive is posted) | popped by
    `receive` (the reply's ticket came first), `cancel` or the expiry sweep."""

    request_id: str
    deadline: float  # time.monotonic()
    rows: Future  # KVRows once received; cancelled / TimeoutError if no early receive happens
    state: str = "waiting"
    ticket: ChannelTicket | None = None


class ChannelReceiver:
    name = "channel"

    def __init__(
        self,
        replica_id: str,
        backend: str = "gloo",
        *,
        host: str = "127.0.0.1",
        timeout_s: float = 30.0,
        device: torch.device | str = "cpu",
        device_id: str | None = None,
    ) -> None:
        """device_id: the physical device's identity (default `device_identity(device)`)."""
        import torch.distributed as dist

        if backend not in ("gloo", "nccl"):
            raise ValueError(f"channel backend {backend!r}: accepted gloo, nccl")
        self.backend = backend
        self.timeout_s = check_timeout(timeout_s)
        self.device = torch.device(device)
        self.host = host
        # Port 0: the OS picks a free one; senders learn it from the endpoint.
        self.store = dist.TCPStore(
            host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
        )
        self._endpoint = DecodeEndpoint(
            replica_id=replica_id,
            host=host,
            store_port=self.store.port,
            device_id=device_id if device_id is not None else device_identity(self.device),
        )
        self._groups: dict[str, Any] = {}
        self._group_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        # Receives of both backends: the order condition below serializes nccl's per channel.
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="moeray-kv-recv")
        # gloo first contact: tickets of a channel whose group is being made wait here, unposted,
        # and are all posted by the connecting thread once the group exists (`_connect`).
        self._parked: dict[str, list[tuple[ChannelTicket, Future]]] = {}
        self._connector = ThreadPoolExecutor(max_workers=2, thread_name_prefix="moeray-kv-connect")
        # nccl: receives must be issued in the sender's order (tags ascending per channel).
        self._next_tag: dict[str, int] = {}
        self._order = threading.Condition()
        self._expected: dict[str, _Expectation] = {}
        # Cancelled request -> until when a late ticket of it is received and dropped.
        self._gone: dict[str, float] = {}
        self.early = 0  # transfers received on the queue notice for an expecting request
        self.drained = 0  # transfers received and dropped: their request was cancelled
        self._closed = False
        # The dispatcher pops the ticket queue with its own client (a blocking pop holds a
        # client's socket); its timeout only bounds an idle pop, which then pops again.
        self._queue_client = dist.TCPStore(
            host,
            self.store.port,
            is_master=False,
            timeout=timedelta(seconds=max(timeout_s, IDLE_POP_S)),
        )
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name="moeray-kv-tickets", daemon=True
        )
        self._dispatcher.start()

    def endpoint(self) -> DecodeEndpoint:
        return self._endpoint

    def _group(self, channel: str) -> Any:
        import torch.distributed as dist

        with self._lock:
            lock = self._group_locks.setdefault(channel, threading.Lock())
        with lock:
            pg = self._groups.get(channel)
            if pg is None:
                pg = pair_process_group(
                    self.backend,
                    dist.PrefixStore(f"kv/{channel}", self.store),
                    1,
                    self.timeout_s,
                    self.device,
                )
                self._groups[channel] = pg
            return pg

    def _post(self, t: ChannelTicket, pg: Any) -> tuple[list[Any], KVRows]:
        """gloo: post the two receives (returns at once; gloo matches them by tag) without
        waiting. Posting every ticket as soon as it is known, on the thread that learns it, and
        waiting on the pool keeps a pool thread from being held by a receive whose send sits
        behind a sender thread that waits for a receive queued behind it: with post-and-wait in
        each pool thread, 16 concurrent transfers deadlock until the timeout."""
        dtype = getattr(torch, t.dtype)
        kv_LTC = torch.empty(t.kv_shape, dtype=dtype, device=self.device)
        pe_LTR = torch.empty(t.pe_shape, dtype=dtype, device=self.device)
        return [pg.recv([kv_LTC], 0, t.tag), pg.recv([pe_LTR], 0, t.tag + 1)], KVRows(
            t.start, kv_LTC, pe_LTR
        )

    @staticmethod
    def _wait(works: list[Any], rows: KVRows) -> KVRows:
        for w in works:
            w.wait()
        return rows

    def _start(self, t: ChannelTicket) -> Future:
        """Start receiving `t` on any thread that must not block. gloo: post here when the
        channel's group exists and wait on the pool; otherwise park the ticket until `_connect`
        has made the group and posts every parked ticket at once. A first-contact ticket that
        posted and waited inside a pool thread could hold that thread while its send sat behind
        sends of tickets still queued for a thread (48 concurrent first transfers time out so on
        2 cores). nccl (posts in tag order, under the order condition) goes to the pool."""
        if self.backend != "gloo":
            return self._pool.submit(self._recv_blocking, t)
        with self._lock:
            pg = self._groups.get(t.channel)
            if pg is None:
                fut: Future = Future()
                parked = self._parked.setdefault(t.channel, [])
                parked.append((t, fut))
                if len(parked) == 1:
                    self._connector.submit(self._connect, t.channel)
                return fut
        works, rows = self._post(t, pg)
        return self._pool.submit(self._wait, works, rows)

    def _connect(self, channel: str) -> None:
        """Make `channel`'s gloo group, then post the receives of every ticket parked for it."""
        import torch.distributed as dist

        try:
            pg = pair_process_group(
                self.backend,
                dist.PrefixStore(f"kv/{channel}", self.store),
                1,
                self.timeout_s,
                self.device,
            )
        except Exception as err:
            with self._lock:
                parked = self._parked.pop(channel, [])
            for _, fut in parked:
                if not fut.done():
                    fut.set_exception(err)
            return
        with self._lock:
            self._groups[channel] = pg
            parked = self._parked.pop(channel, [])
        for t, fut in parked:
            try:
                waiting = self._pool.submit(self._wait, *self._post(t, pg))
            except Exception as err:
                if not fut.done():
                    fut.set_exception(err)
                continue
            waiting.add_done_callback(functools.partial(_copy_outcome, dst=fut))

    def _recv_blocking(self, t: ChannelTicket) -> KVRows:
        pg = self._group(t.channel)
        # nccl (not covered by the CPU tests): posted in tag order per channel, as the sends were.
        dtype = getattr(torch, t.dtype)
        kv_LTC = torch.empty(t.kv_shape, dtype=dtype, device=self.device)
        pe_LTR = torch.empty(t.pe_shape, dtype=dtype, device=self.device)
        with self._order:
            ok = self._order.wait_for(
                lambda: self._next_tag.get(t.channel, 0) == t.tag, self.timeout_s
            )
            if not ok:
                raise TimeoutError(
                    f"KV channel {t.channel}: tag {t.tag} not next after {self.timeout_s} s"
                )
        try:
            for w in (pg.recv([kv_LTC], 0, t.tag), pg.recv([pe_LTR], 0, t.tag + 1)):
                w.wait()  # nccl: the current stream waits on the receive; the CPU does not
        finally:
            with self._order:
                self._next_tag[t.channel] = t.tag + 2
                self._order.notify_all()
        return KVRows(t.start, kv_LTC, pe_LTR)

    # ---- early receive ------------------------------------------------------------------------
    def expect(self, request_id: str) -> Future:
        """Receive `request_id`'s rows as soon as its ticket reaches this replica's queue; call
        right before the prefill call. Returns the future of the rows (informational:
        `receive` / `cancel` consume it). Every expect must end in `receive(ticket)` or
        `cancel(request_id)`; one that does neither expires after the transport timeout."""
        if not request_id:
            raise ValueError("expect needs a non-empty request_id")
        now = time.monotonic()
        e = _Expectation(request_id, now + self.timeout_s, Future())
        with self._lock:
            expired = self._sweep(now)
            if request_id in self._expected:
                raise ValueError(f"request {request_id!r} is already expected on this receiver")
            self._gone.pop(request_id, None)
            self._expected[request_id] = e
        self._expire(expired)
        return e.rows

    def _sweep(self, now: float) -> list[_Expectation]:
        """Under self._lock: drop expectations and drain marks past their deadline."""
        expired = [e for e in self._expected.values() if e.state == "waiting" and e.deadline < now]
        for e in expired:
            del self._expected[e.request_id]
        for rid in [rid for rid, until in self._gone.items() if until < now]:
            del self._gone[rid]
        return expired

    def _expire(self, expired: list[_Expectation]) -> None:
        for e in expired:
            # A ticket that comes later is left to `receive` (the reply's copy).
            e.rows.set_exception(
                TimeoutError(
                    f"KV channel: no ticket for {e.request_id} within {self.timeout_s} s of expect"
                )
            )

    def _dispatch_loop(self) -> None:
        import torch.distributed as dist

        while not self._closed:
            try:
                raw = self._queue_client.queue_pop(TICKET_QUEUE)
            except dist.DistStoreError:  # an idle pop timed out
                continue
            except Exception as err:
                if not self._closed:
                    log.warning("KV channel: ticket queue failed, early receives stop: %s", err)
                return
            if raw == QUEUE_STOP:
                return
            try:
                self._dispatch(pickle.loads(raw))
            except Exception as err:
                log.warning("KV channel: dropping a queued ticket: %s", err)

    def _dispatch(self, ticket: ChannelTicket) -> None:
        with self._lock:
            expired = self._sweep(time.monotonic())
            e = self._expected.get(ticket.request_id)
            leave = False
            if e is not None and e.state == "waiting":
                e.state, e.ticket = "receiving", ticket
            elif self._gone.pop(ticket.request_id, None) is not None:
                e = None  # cancelled: receive and drop, so the send completes and tags move on
            else:  # taken by `receive`, expired, or never expected: the reply's copy rules
                leave = True
        self._expire(expired)
        if leave:
            return
        try:
            fut = self._start(ticket)
        except Exception as err:
            fut = Future()
            fut.set_exception(err)
        fut.add_done_callback(lambda f: self._early(e, ticket, f))

    def _early(self, e: _Expectation | None, ticket: ChannelTicket, fut: Future) -> None:
        """On the thread that finished the receive: hand the rows over (or drop them)."""
        err = fut.exception()
        if e is None:
            if err is not None:
                log.warning("KV channel: draining %s failed: %s", ticket.request_id, err)
            else:
                self.drained += 1
            return
        try:
            if err is not None:
                e.rows.set_exception(err)
            else:
                self.early += 1
                e.rows.set_result(fut.result())
        except InvalidStateError:  # close() cancelled it meanwhile
            pass

    def cancel(self, request_id: str) -> None:
        """The prefill call for `request_id` failed or its request went away: no early receive.
        A ticket of it that still reaches the queue within the timeout is received and dropped
        (the send then completes, and nccl's later tags on that channel are not held up)."""
        with self._lock:
            e = self._expected.pop(request_id, None)
            if e is None or e.state != "waiting":
                return  # unknown, or its receive is posted already (the rows are dropped)
            self._gone[request_id] = time.monotonic() + self.timeout_s
        e.rows.cancel()

    async def receive(self, ticket: Any) -> KVRows:
        if isinstance(ticket, KVRows):
            # The prefill replica shares this replica's GPU, so it sent the rows in its reply
            # (the object store) instead of over the channel (ChannelSender.send).
            return ticket
        if not isinstance(ticket, ChannelTicket):
            raise TypeError(f"channel receiver got a {type(ticket).__name__} ticket")
        with self._lock:
            expired = self._sweep(time.monotonic())
            # Popped: a copy of the ticket that reaches the queue later finds no expectation.
            e = self._expected.pop(ticket.request_id, None) if ticket.request_id else None
        self._expire(expired)
        if e is not None and e.state == "receiving":
            if e.ticket == ticket:
                return await asyncio.shield(asyncio.wrap_future(e.rows))
            # Same request id, another transfer (a retried prefill): its rows are dropped.
            log.warning(
                "KV channel: queued ticket %s differs from the reply's %s", e.ticket, ticket
            )
        elif e is not None:
            e.rows.cancel()  # the reply's ticket came first
        # Shielded: once we hold a ticket its receive must happen even if the request is
        # cancelled meanwhile, or the sender's send would wait out its timeout.
        return await asyncio.shield(asyncio.wrap_future(self._start(ticket)))

    def close(self) -> None:
        self._closed = True
        with self._lock:
            pending, self._expected = list(self._expected.values()), {}
        for e in pending:
            e.rows.cancel()
        try:  # wakes the dispatcher (its own client holds the pop)
            self.store.queue_push(TICKET_QUEUE, QUEUE_STOP)
        except Exception:
            pass
        with self._lock:
            parked = [fut for tickets in self._parked.values() for _, fut in tickets]
            self._parked.clear()
        for fut in parked:
            fut.cancel()
        self._connector.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._groups.clear()
