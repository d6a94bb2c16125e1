"""The RouterActor's state file (the plain class, no Ray): every report is in the file before
`report` returns, writes run one at a time off the event loop, and reports that arrive during a
write share the next one (an object store's PUT takes tens of ms; N ranks report per step)."""

from __future__ import annotations

import asyncio
import threading
import time

import torch

from moeray.actors.router import RouterActor
from moeray.platform.routing.balance import bias_update
from moeray.platform.routing.state import RouterConfig
from moeray.platform.train.storage import Storage

RANKS = 8


class SlowStorage(Storage):
    """A local file whose writes take 50 ms, counted, and checked to never overlap."""

    def __init__(self, local: Storage) -> None:
        super().__init__(local.filesystem, local.path)
        self.writes = 0
        self.active = 0
        self.threads: set[int] = set()

    def write_bytes(self, data: bytes) -> None:
        assert self.active == 0, "two writes at once"
        self.active += 1
        self.threads.add(threading.get_ident())
        time.sleep(0.05)
        super().write_bytes(data)
        self.writes += 1
        self.active -= 1


def test_reports_are_durable_and_share_writes(tmp_path):
    cfg = RouterConfig(
        layer_ids=(1, 3),
        n_experts=8,
        n_group=4,
        topk_group=2,
        num_reporters=RANKS,
        gamma=0.01,
        num_physical=12,
        serve_gpus=4,
        serve_nodes=2,
    )
    plain = Storage.at(tmp_path / "router_state.pt")
    path = SlowStorage(plain)
    g = torch.Generator().manual_seed(0)
    loads = [torch.randint(0, 30, (2, 8), generator=g) for _ in range(RANKS)]

    async def one_step() -> RouterActor:
        actor = RouterActor(cfg, path)
        results = await asyncio.gather(
            *(actor.report(0, r, loads[r]) for r in range(RANKS)),
            actor.biases(min_step=0, timeout_s=10),
        )
        assert all(res["counted"] for res in results[:RANKS])
        return actor

    actor = asyncio.run(one_step())
    # 8 reports, 50 ms writes: one write for the first, one shared by the 7 that came during it
    # (one write per report, as before, would be 8 and 0.4 s of a blocked event loop)
    assert path.writes == 2, path.writes
    assert threading.get_ident() not in path.threads  # written in a worker thread

    # the file holds every report: a restarted actor (same arguments) has step 0 applied
    again = RouterActor(cfg, plain)
    assert again.info()["restored"] and again.info()["step"] == 0
    expect = bias_update(torch.zeros(2, 8), sum(loads), 0.01)
    assert torch.allclose(again._state.biases()["bias_LE"], expect)
    assert torch.equal(actor._state.biases()["bias_LE"], again._state.biases()["bias_LE"])
