"""The expert-parallel gang's front without Ray: admission, spreading a burst over the ranks by
free pages, prefix affinity, closing a stream closes the rank's, and a dead rank ends every
request in flight with BackendUnavailable at once."""

import asyncio
from contextlib import aclosing

import pytest

from moeray.platform.serve.gang import GangFront, RankFailed
from moeray.platform.serve.http.protocol import (
    BackendOverloaded,
    BackendUnavailable,
    GenerationParams,
    GenerationRequest,
    GenerationStep,
)

PAGE = 4


class FakeRank:
    """Streams `n` steps per request after `release` is set; tracks pages and closed streams."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.got: list[str] = []
        self.closed: list[str] = []
        self.release = asyncio.Event()

    async def free_pages(self) -> int:
        await asyncio.sleep(0.01)
        return self.free

    async def generate(self, req: GenerationRequest):
        self.got.append(req.request_id)
        try:
            await self.release.wait()
            for i in range(req.params.max_tokens):
                last = i == req.params.max_tokens - 1
                yield GenerationStep((i,), finish_reason="length" if last else None)
        finally:
            self.closed.append(req.request_id)


def _req(rid: str, prompt=(1, 2, 3), n: int = 2) -> GenerationRequest:
    return GenerationRequest(rid, tuple(prompt), GenerationParams(max_tokens=n))


async def _collect(front: GangFront, req: GenerationRequest) -> list[GenerationStep]:
    async with aclosing(front.generate(req)) as steps:
        return [s async for s in steps]


def test_a_burst_spreads_over_ranks_and_overflow_is_refused():
    async def main():
        ranks = [FakeRank(100), FakeRank(100)]
        front = GangFront(ranks, page_size=PAGE, max_per_rank=2, stats_period_s=60)
        tasks = [asyncio.create_task(_collect(front, _req(f"r{i}"))) for i in range(4)]
        await asyncio.sleep(0.1)
        assert sorted(len(r.got) for r in ranks) == [2, 2]  # debits split the burst
        with pytest.raises(BackendOverloaded, match="all 2 ranks hold 2 requests"):
            await _collect(front, _req("r5"))
        for r in ranks:
            r.release.set()
        outs = await asyncio.gather(*tasks)
        assert all([s.token_ids for s in o] == [(0,), (1,)] for o in outs)
        assert front.in_flight == [0, 0] and front.routed_to == [2, 2]

    asyncio.run(main())


def test_most_free_pages_then_prefix_affinity():
    async def main():
        ranks = [FakeRank(10), FakeRank(50)]
        for r in ranks:
            r.release.set()
        front = GangFront(ranks, page_size=PAGE, max_per_rank=8, stats_period_s=0)
        prompt = tuple(range(20, 33))  # 3 full pages (of 4) cached, plus the last token
        await _collect(front, _req("a", prompt))
        assert ranks[1].got == ["a"]  # the emptier rank
        ranks[0].free = 200
        # The same prompt returns to the rank holding its pages (it has room for the rest)...
        await _collect(front, _req("b", prompt))
        assert ranks[1].got == ["a", "b"] and ranks[0].got == []
        # ...another goes by free pages.
        await _collect(front, _req("c", tuple(range(100, 113))))
        assert ranks[0].got == ["c"]

    asyncio.run(main())


def test_closing_the_stream_closes_the_ranks():
    async def main():
        rank = FakeRank(10)
        rank.release.set()
        front = GangFront([rank], page_size=PAGE, max_per_rank=4)
        gen = front.generate(_req("x", n=5))
        first = await gen.__anext__()
        assert first.token_ids == (0,)
        await gen.aclose()
        assert rank.closed == ["x"] and front.in_flight == [0]

    asyncio.run(main())


class DyingRank(FakeRank):
    """Streams one step, then fails as RayRank does when the rank's actor died."""

    async def generate(self, req: GenerationRequest):
        self.got.append(req.request_id)
        try:
            yield GenerationStep((0,))
            await self.release.wait()
            raise RankFailed("rank 1 died: ActorDiedError")
        finally:
            self.closed.append(req.request_id)


def test_a_dead_rank_ends_every_request_in_flight_and_refuses_new_ones():
    async def main():
        # The survivor's stream never yields (its collectives wait for the dead peer).
        survivor, dying = FakeRank(100), DyingRank(100)
        front = GangFront([survivor, dying], page_size=PAGE, max_per_rank=1, stats_period_s=60)
        outcomes: dict[str, list] = {"a": [], "b": []}

        async def run(rid: str, prompt) -> None:
            async with aclosing(front.generate(_req(rid, prompt, n=5))) as steps:
                async for s in steps:
                    outcomes[rid].append(s.token_ids)

        tasks = [
            asyncio.create_task(run("a", (1, 2, 3))),
            asyncio.create_task(run("b", (7, 8, 9))),  # max_per_rank=1: the other rank
        ]
        await asyncio.sleep(0.1)
        assert sorted(survivor.got + dying.got) == ["a", "b"] and front.failure is None
        dying.release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        assert all(isinstance(r, BackendUnavailable) for r in results), results
        assert "lost a rank (rank 1 died: ActorDiedError)" in str(results[0])
        assert outcomes[dying.got[0]] == [(0,)] and outcomes[survivor.got[0]] == []
        # Both ranks' streams were closed, and nothing is left in flight.
        assert survivor.closed == survivor.got and dying.closed == dying.got
        assert front.in_flight == [0, 0]
        with pytest.raises(BackendUnavailable, match="retry the request"):
            await _collect(front, _req("c"))
        assert len(survivor.got + dying.got) == 2

    asyncio.run(main())
