"""KV transports that need Ray: Ray Direct Transport through a relay pair (gloo on CPU), a relay
that dies (the decode side must see an error, not hang), every rdt wait bounded by its timeout,
and the raw send/recv baseline."""

import asyncio
import threading
import time

import pytest
import torch

from moeray.platform.engine.disagg import KVRows
from moeray.platform.serve.kv_transport.base import RDTTicket
from moeray.platform.serve.kv_transport.p2p import raw_p2p_seconds
from moeray.platform.serve.kv_transport.rdt import RDTReceiver, RDTSender


def _rows(g, start, L, T, C, R):
    return KVRows(start, torch.randn(L, T, C, generator=g), torch.randn(L, T, R, generator=g))


def test_rdt_relay_pair_moves_rows_exactly_then_fails_loudly_without_its_relay(ray_local):
    g = torch.Generator().manual_seed(21)
    rows = [_rows(g, s, L, T, 13, 5) for s, L, T in ((0, 3, 1), (16, 2, 77), (48, 5, 301))]

    async def run():
        recv = RDTReceiver("decode-a")
        send = RDTSender("gloo")
        ep = recv.endpoint()
        assert ep.node_id == ray_local.get_runtime_context().get_node_id()
        tickets = [await send.send(f"r{i}", r, ep) for i, r in enumerate(rows)]
        assert all(
            isinstance(t, RDTTicket) and t.nbytes == r.nbytes
            for t, r in zip(tickets, rows, strict=True)
        )
        got = await asyncio.gather(*[recv.receive(t) for t in tickets])
        assert len(send._pairs) == 1  # one relay pair per decode replica, set up once
        ((src, dst, _name),) = send._pairs.values()
        ray_local.kill(dst)
        with pytest.raises(ray_local.exceptions.RayActorError):
            t = await send.send("dead", rows[0], ep)
            await asyncio.wait_for(recv.receive(t), timeout=30)
        for _ in range(50):  # the failed transfer drops the pair ...
            if not send._pairs:
                break
            await asyncio.sleep(0.1)
        assert not send._pairs
        again = await recv.receive(await send.send("again", rows[1], ep))  # ... and a new one works
        assert torch.equal(again.kv_LTC, rows[1].kv_LTC)
        ((src2, dst2, _name),) = send._pairs.values()
        assert src2 is not src
        with pytest.raises(ray_local.exceptions.RayActorError):  # the orphaned src relay was killed
            await src.ping.remote()
        ray_local.kill(src2)
        ray_local.kill(dst2)
        return got

    got = asyncio.run(run())
    for g_, r in zip(got, rows, strict=True):
        assert g_.start == r.start
        assert torch.equal(g_.kv_LTC, r.kv_LTC) and torch.equal(g_.pe_LTR, r.pe_LTR)


def test_rdt_waits_end_within_the_transfer_timeout(ray_local, monkeypatch):
    """Each wait of the rdt transport ends within kv_transfer_timeout_s with an error that names
    it: the receiver's wait for rows; a pair whose collective group does not come up (its relays
    killed, no pair kept); a transfer not done in time (its pair killed, so the decode side's
    wait fails at once, and the next send builds a new pair that works)."""
    import ray.experimental.collective as collective

    with pytest.raises(ValueError, match="timeout_s=0 must be > 0"):
        RDTSender("gloo", timeout_s=0)
    rows = _rows(torch.Generator().manual_seed(5), 0, 2, 9, 13, 5)

    @ray_local.remote
    def late():
        time.sleep(5)
        return rows.kv_LTC, rows.pe_LTR

    release = threading.Event()
    relays = []

    def stuck(actors, backend, name):
        relays.extend(actors)
        release.wait(30)

    async def run():
        recv = RDTReceiver("decode-b", timeout_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"not received within kv_transfer_timeout_s=0\.5"):
            await recv.receive(RDTTicket(0, late.remote(), rows.nbytes))
        assert time.monotonic() - t0 < 3

        real = collective.create_collective_group
        monkeypatch.setattr(collective, "create_collective_group", stuck)
        send = RDTSender("gloo", timeout_s=0.5)
        ep = recv.endpoint()
        msg = r"relay pair to decode replica decode-b was not up within kv_transfer_timeout_s=0\.5"
        with pytest.raises(TimeoutError, match=msg):
            await send.send("r0", rows, ep)
        release.set()
        assert not send._pairs and len(relays) == 2
        for relay in relays:
            with pytest.raises(ray_local.exceptions.RayActorError):
                await relay.ping.remote()
        monkeypatch.setattr(collective, "create_collective_group", real)

        send.timeout_s = recv.timeout_s = 30.0
        first = await recv.receive(await send.send("r1", rows, ep))  # a pair up, in time
        ((src, _dst, _name),) = send._pairs.values()
        send.timeout_s = 1e-3  # shorter than any transfer over that pair: late
        ticket = await send.send("r2", rows, ep)
        t0 = time.monotonic()
        with pytest.raises(ray_local.exceptions.RayActorError):
            await recv.receive(ticket)
        assert time.monotonic() - t0 < 10 and not send._pairs
        send.timeout_s = 30.0
        again = await recv.receive(await send.send("r3", rows, ep))
        assert send._pairs and next(iter(send._pairs.values()))[0] is not src
        for got in (first, again):
            assert torch.equal(got.kv_LTC, rows.kv_LTC) and torch.equal(got.pe_LTR, rows.pe_LTR)
        for src, dst, _name in send._pairs.values():
            ray_local.kill(src)
            ray_local.kill(dst)

    asyncio.run(run())


def test_raw_send_recv_baseline(ray_local):
    small = raw_p2p_seconds(4096, iters=5)
    assert len(small) == 5 and all(0 < t < 10 for t in small)
    with pytest.raises(ValueError, match="nbytes"):
        raw_p2p_seconds(0)
    # No two free GPUs here (--gpus-per-replica 0.5 on one GPU is the same): a clear error at
    # once, not an NCCL pair that hangs or an actor that is never placed.
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="needs 2 free GPUs"):
        raw_p2p_seconds(4096, backend="nccl", iters=5)
    assert time.monotonic() - t0 < 5
