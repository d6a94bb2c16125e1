"""KV transports that need Ray: Ray Direct Transport through a relay pair (gloo on CPU), a relay
that dies (the decode side must see an error, not hang), and the raw send/recv baseline."""

import asyncio
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
