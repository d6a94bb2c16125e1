"""The "channel" KV transport: a persistent torch.distributed group of two ranks between a
prefill and a decode replica process (see kv_transfer.py for the transports side by side).

Legend: L cached layers, T tokens, C kv_lora_rank, R qk_rope_head_dim (see engine/disagg.py).

Set up once per (prefill, decode) pair: the decode replica hosts a TCPStore for the rendezvous,
then the rows move by plain send/recv under a per-transfer tag, and Ray carries only the ticket
(shapes, dtype, tag). gloo on CPU (tested); nccl on GPU is the same code with the tensors on the
device and sends issued in tag order (NCCL matches point-to-point calls in issue order, not by tag).

Receive posted on the queue notice (issue #7). Waiting for the ticket in the prefill's
Serve reply cost ~1.6 ms per transfer on 2x H200 (raw NCCL moves 288 MB in 0.8 ms) and 1.7-2.6 ms
on CPU: the receive could only be posted once the reply had crossed Ray. So the ticket also goes
through a queue in the decode replica's TCPStore:
  * `ChannelSender.send` pushes the ticket (TCPStore queue_push, which does not wait for an
    answer: 7 us on the dev box) in `send` itself, before the send thread posts the send; the
    first send to a decode replica connects its store client on the send thread and pushes
    there, before the rendezvous (else the sender would wait in the rendezvous for a decode side
    that waits for the ticket).
  * The decode replica calls `receiver.expect(request_id)` just before it calls the prefill. One
    dispatcher thread per receiver pops the queue (blocking pop, its own client); a ticket whose
    request is expected gets its receive posted at once, and the rows land in the expectation's
    future. Waiting costs no thread and no connection per request.
  * The ticket still rides in the reply: it is the source of truth. `receive(ticket)` returns the
    expectation's rows when the queued ticket was the same (channel, tag, shapes, ... all equal);
    otherwise (the reply came first, the expectation expired, nothing was expected) it receives as
    before, and a queued copy that comes later is ignored.
  * `cancel(request_id)` (the prefill call failed, or the decode request went away) ends the
    expectation; a ticket of that request that still comes within the transport timeout is
    received and dropped, so the send completes instead of waiting out its timeout.
  * An expectation that gets neither `receive` nor `cancel` expires after the transport timeout
    (checked on every expect / receive / cancel / queued ticket).
Ordering (nccl: receives must be posted in the sender's tag order per channel). The sender
allocates tags and pushes tickets on its event loop, and posts its sends from one thread, both in
tag order (only the order of the sends matters for correctness). On the decode side every
receive, whether posted for a queued ticket or by `receive(ticket)`, waits in `_recv_blocking` on
the `_next_tag` condition until its tag is the channel's next (tags are per sender, so ascending
per channel). An expectation owns no tag until its ticket arrives and waits in no thread, so one
whose ticket never comes holds up nothing. Receives run on 8 threads for both backends (was 1 for
nccl): with one thread, a receive for tag k+2 whose reply came first held the only thread while
tag k queued behind it until the timeout (8 such inversions at once would still do that; queued
tickets arrive in push order, which is tag order). What can still hold a channel up is a tag that
was sent and never received: its ticket reached neither the queue in time nor a `receive`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from moeray.platform.engine.disagg import KVRows
from moeray.platform.serve.kv_transfer import DecodeEndpoint

log = logging.getLogger(__name__)


# ---- persistent pairwise channel (torch.distributed send/recv) ----------------------------------
@dataclass(frozen=True)
class ChannelTicket:
    start: int
    channel: str  # the sender's id: names the pair's rendezvous prefix in the decode's store
    tag: int  # kv rows travel under `tag`, rope rows under `tag + 1`
    kv_shape: tuple[int, ...]
    pe_shape: tuple[int, ...]
    dtype: str
    nbytes: int
    request_id: str = ""  # names the store key the ticket is also published under


# The decode replica's ticket queue (TCPStore queue_push / queue_pop): every sender pushes every
# ticket; one dispatcher thread per receiver pops them. A pop removes the item, so nothing is left
# to clean up, and one client serves any number of pending requests (a client per waiting request
# does not scale: on the dev box, 32 clients connecting at once stalled 5 s in connect).
_QUEUE = "kvq"
_STOP = b"stop"  # pushed by close() to end the dispatcher; pickled tickets start with b"\x80"
_IDLE_POP_S = 3600.0  # an idle pop times out (and logs a socket warning) at most once an hour


def pair_process_group(backend: str, store: Any, rank: int, timeout_s: float, device: torch.device):
    """A 2-rank gloo or nccl group on `store` (also the raw send/recv baseline's, kv_transfer.py)."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, timeout)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    pg = dist.ProcessGroupNCCL(store, rank, 2, opts)
    return pg


class ChannelSender:
    name = "channel"

    def __init__(
        self, backend: str = "gloo", *, timeout_s: float = 30.0, device: torch.device | str = "cpu"
    ) -> None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"channel backend {backend!r}: accepted gloo, nccl")
        self.backend = backend
        self.timeout_s = timeout_s
        self.device = torch.device(device)
        self.id = uuid.uuid4().hex[:16]
        self._groups: dict[str, Any] = {}
        self._stores: dict[
            str, Any
        ] = {}  # per decode replica: the client tickets are published with
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

    def _store(self, dest: DecodeEndpoint) -> Any:
        """The client that publishes tickets. Not the process group's: its rendezvous blocks on
        the store while it waits for the decode side, and a publish must not queue behind it."""
        import torch.distributed as dist

        with self._lock:  # not the per-destination lock: `_group` holds that during the rendezvous
            store = self._stores.get(dest.replica_id)
            if store is None:
                store = dist.TCPStore(
                    dest.host,
                    dest.store_port,
                    is_master=False,
                    timeout=timedelta(seconds=self.timeout_s),
                )
                self._stores[dest.replica_id] = store
            return store

    def _group(self, dest: DecodeEndpoint) -> Any:
        import torch.distributed as dist

        with self._dest_lock(dest):
            pg = self._groups.get(dest.replica_id)
            if pg is None:
                store = dist.TCPStore(
                    dest.host,
                    dest.store_port,
                    is_master=False,
                    timeout=timedelta(seconds=self.timeout_s),
                )
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
        import pickle

        # queue_push does not wait for an answer (7 us on the dev box, vs 62 us for a
        # compare_set round trip).
        store.queue_push(_QUEUE, pickle.dumps(ticket))

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
    ) -> ChannelTicket:
        if dest is None or dest.store_port is None:
            raise ValueError(
                "channel transport needs the decode replica's endpoint (store host/port)"
            )
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
        # Published here, before the hop to the send thread (~0.25 ms to wake it on the dev box),
        # once the store client exists; the first send to a decode replica connects it (may
        # block) on the send thread and publishes there.
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


def _copy_outcome(src: Future, dst: Future) -> None:
    """Give `dst` the result or exception of the finished `src` (unless `dst` was cancelled)."""
    from concurrent.futures import InvalidStateError

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
    ) -> None:
        import torch.distributed as dist

        if backend not in ("gloo", "nccl"):
            raise ValueError(f"channel backend {backend!r}: accepted gloo, nccl")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self.backend = backend
        self.timeout_s = timeout_s
        self.device = torch.device(device)
        self.host = host
        # Port 0: the OS picks a free one; senders learn it from the endpoint.
        self.store = dist.TCPStore(
            host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
        )
        self._endpoint = DecodeEndpoint(
            replica_id=replica_id, host=host, store_port=self.store.port
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
        self._gone: dict[
            str, float
        ] = {}  # cancelled request -> until when a late ticket is drained
        self.early = 0  # transfers received on the queue notice for an expecting request
        self.drained = 0  # transfers received and dropped: their request was cancelled
        self._closed = False
        # The dispatcher pops the ticket queue with its own client (a blocking pop holds a
        # client's socket); its timeout only bounds an idle pop, which then pops again.
        self._queue_client = dist.TCPStore(
            host,
            self.store.port,
            is_master=False,
            timeout=timedelta(seconds=max(timeout_s, _IDLE_POP_S)),
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
        each pool thread, 16 concurrent transfers deadlocked (until the timeout) on the dev box."""
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
        sends of tickets still queued for a thread: 48 concurrent first transfers timed out so in
        a fresh-clone CI run (2 cores, 2026-11-27). nccl (posts in tag order, under the order
        condition) goes to the pool."""
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
            waiting.add_done_callback(lambda w, fut=fut: _copy_outcome(w, fut))

    def _recv_blocking(self, t: ChannelTicket) -> KVRows:
        pg = self._group(t.channel)
        # nccl (unchanged; not run here): posted in tag order per channel, as the sends were.
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
        import time

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
        import pickle

        import torch.distributed as dist

        while not self._closed:
            try:
                raw = self._queue_client.queue_pop(_QUEUE)
            except dist.DistStoreError:  # an idle pop timed out
                continue
            except Exception as err:
                if not self._closed:
                    log.warning("KV channel: ticket queue failed, early receives stop: %s", err)
                return
            if raw == _STOP:
                return
            try:
                self._dispatch(pickle.loads(raw))
            except Exception as err:
                log.warning("KV channel: dropping a queued ticket: %s", err)

    def _dispatch(self, ticket: ChannelTicket) -> None:
        import time

        with self._lock:
            expired = self._sweep(time.monotonic())
            e = self._expected.get(ticket.request_id)
            if e is not None and e.state == "waiting":
                e.state, e.ticket = "receiving", ticket
            elif self._gone.pop(ticket.request_id, None) is not None:
                e = None  # cancelled: receive and drop, so the send completes and tags move on
            else:
                e = False  # taken by `receive`, expired, or never expected: the reply's copy rules
        self._expire(expired)
        if e is False:
            return
        try:
            fut = self._start(ticket)
        except Exception as err:
            fut = Future()
            fut.set_exception(err)
        fut.add_done_callback(lambda f: self._early(e, ticket, f))

    def _early(self, e: _Expectation | None, ticket: ChannelTicket, fut: Future) -> None:
        """On the thread that finished the receive: hand the rows over (or drop them)."""
        from concurrent.futures import InvalidStateError

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
        import time

        with self._lock:
            e = self._expected.pop(request_id, None)
            if e is None or e.state != "waiting":
                return  # unknown, or its receive is posted already (the rows are dropped)
            self._gone[request_id] = time.monotonic() + self.timeout_s
        e.rows.cancel()

    async def receive(self, ticket: Any) -> KVRows:
        import time

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
            self.store.queue_push(_QUEUE, _STOP)
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
