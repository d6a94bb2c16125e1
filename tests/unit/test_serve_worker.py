"""The replica workers without Ray: an engine on its own thread, P/D through direct calls."""

import asyncio
import gc
import logging
import time

import pytest
import torch

from moeray.actors.decode import PrefillFetch
from moeray.platform.config import ServeConfig, tiny
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer
from moeray.platform.serve.http.protocol import (
    BackendOverloaded,
    GenerationParams,
    GenerationRequest,
)
from moeray.platform.serve.worker import ColocatedWorker, DecodeWorker, PrefillWorker, freeze_gc


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(tiny()).eval()


def _engine(model, pages=64):
    return Engine(
        model,
        EngineConfig(
            num_pages=pages, page_size=16, max_num_batched_tokens=64, use_cuda_graphs=False
        ),
    )


def _req(rid, prompt, max_tokens=8):
    return GenerationRequest(
        rid, tuple(prompt), GenerationParams(max_tokens=max_tokens, temperature=0.0, logprobs=1)
    )


async def _collect(gen):
    steps = [s async for s in gen]
    for s in steps:  # one logprob per new token, for that token
        assert s.logprobs is None or [lp.token_id for lp in s.logprobs] == list(s.token_ids)
    return [t for s in steps for t in s.token_ids], steps[-1].finish_reason


def test_colocated_and_pd_match_the_engine(model):
    torch.manual_seed(1)
    prompts = [torch.randint(2, 1024, (n,)).tolist() for n in (5, 23, 40)]
    expected = [
        o.output_token_ids
        for o in _engine(model).generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
    ]

    async def run():
        colocated = ColocatedWorker(_engine(model))
        prefill = PrefillWorker(_engine(model))
        decode = DecodeWorker(_engine(model), prefill.prefill)
        try:
            co = await asyncio.gather(
                *[_collect(colocated.generate(_req(f"c{i}", p))) for i, p in enumerate(prompts)]
            )
            pd = await asyncio.gather(
                *[_collect(decode.generate(_req(f"d{i}", p))) for i, p in enumerate(prompts)]
            )
            return co, pd, decode.transfers
        finally:
            for w in (colocated, prefill, decode):
                w.loop.shutdown()

    co, pd, transfers = asyncio.run(run())
    assert [t for t, _ in co] == expected
    assert [t for t, _ in pd] == expected
    assert all(reason == "length" for _, reason in pd)
    assert [t.recomputed for t in transfers] == [False] * 3
    # rows of every prompt token, all layers: (C + R) values x 4 bytes (fp32) x layers
    c = tiny()
    per_token = (c.kv_lora_rank + c.qk_rope_head_dim) * 4 * c.num_hidden_layers
    assert sorted(t.bytes for t in transfers) == sorted(len(p) * per_token for p in prompts)


def test_failed_prefill_is_recomputed_and_completes(model):
    prompt = list(range(2, 30))
    expected = _engine(model).generate([prompt], SamplingParams(temperature=0.0, max_tokens=6))[0]

    async def broken(req, start, endpoint):
        raise ConnectionError("prefill replica died")

    async def run():
        decode = DecodeWorker(_engine(model), broken)
        try:
            return await _collect(decode.generate(_req("x", prompt, 6))), decode.transfers
        finally:
            decode.loop.shutdown()

    (tokens, reason), transfers = asyncio.run(run())
    assert tokens == expected.output_token_ids and reason == "length"
    assert transfers[0].recomputed and transfers[0].bytes == 0


def test_a_prefill_past_its_timeout_is_cancelled_and_recomputed(model, caplog):
    """A prefill reply that does not come within prefill_timeout_s: the call is cancelled (a Serve
    call's cancellation reaches the prefill replica) and the decode engine prefills itself."""
    prompt = list(range(2, 30))
    expected = _engine(model).generate([prompt], SamplingParams(temperature=0.0, max_tokens=6))[0]
    cancelled = []

    async def stuck(req, start, endpoint):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(req.request_id)
            raise

    async def run():
        decode = DecodeWorker(_engine(model), stuck, prefill_timeout_s=0.3)
        try:
            t0 = time.monotonic()
            out = await _collect(decode.generate(_req("late", prompt, 6)))
            return out, decode.transfers, time.monotonic() - t0
        finally:
            decode.loop.shutdown()

    with caplog.at_level(logging.WARNING):
        (tokens, reason), transfers, seconds = asyncio.run(run())
    assert tokens == expected.output_token_ids and reason == "length"
    assert cancelled == ["late"] and transfers[0].recomputed and seconds < 10
    assert "no prefill reply within prefill_timeout_s=0.3" in caplog.text
    with pytest.raises(ValueError, match="prefill_timeout_s=0 must be > 0"):
        DecodeWorker(_engine(model), stuck, prefill_timeout_s=0)
    with pytest.raises(ValueError, match="prefill_timeout_s=-1 must be > 0"):
        ServeConfig(prefill_timeout_s=-1)


def test_prefill_fetch_cancels_the_serve_call_it_gives_up(model):
    """PrefillFetch, the decode side's fetch in production: a caller's cancellation (the decode
    worker's prefill_timeout_s) cancels the Serve call (`DeploymentResponse.cancel`)."""

    class Response:  # what a DeploymentHandle call returns: awaitable, cancellable
        cancelled = False

        def __await__(self):
            return asyncio.sleep(60).__await__()

        def cancel(self):
            Response.cancelled = True

    class Handle:
        class prefill:  # the deployment method's name
            @staticmethod
            def remote(req, export_from, endpoint):
                return Response()

    async def run():
        decode = DecodeWorker(_engine(model), PrefillFetch(Handle()), prefill_timeout_s=0.2)
        try:
            return await _collect(decode.generate(_req("late", list(range(2, 12)), 2)))
        finally:
            decode.loop.shutdown()

    assert asyncio.run(run())[1] == "length" and Response.cancelled


def test_closing_the_stream_aborts_and_frees_pages(model):
    async def run():
        w = ColocatedWorker(_engine(model, pages=32))
        try:
            total = w.loop.free_pages()
            gen = w.generate(_req("long", list(range(2, 40)), max_tokens=200))
            await gen.__anext__()
            assert w.loop.free_pages() < total
            await gen.aclose()  # what the ingress does when the client disconnects
            for _ in range(100):
                if w.loop.free_pages() == total and not w.loop.engine.has_unfinished():
                    break
                await asyncio.sleep(0.01)
            return w.loop.free_pages() == total
        finally:
            w.loop.shutdown()

    assert asyncio.run(run())


def test_overloaded_replica_raises_before_queueing(model):
    async def run():
        w = ColocatedWorker(_engine(model), max_waiting=0)
        try:
            with pytest.raises(BackendOverloaded):
                await _collect(w.generate(_req("y", [5, 6, 7])))
            assert not w.loop.engine.has_unfinished()
        finally:
            w.loop.shutdown()

    asyncio.run(run())


def test_decode_with_a_full_batch_queues_the_request_and_errors_reach_the_caller(model):
    """With one batch slot, a second P/D request cannot be placed when its KV arrives: the engine
    queues it for a local prefill (it must not be added twice), and it still completes."""
    prompts, lengths = [list(range(2, 20)), list(range(30, 45))], [40, 6]
    expected = [
        o.output_token_ids
        for o in _engine(model).generate(
            prompts, [SamplingParams(temperature=0.0, max_tokens=n) for n in lengths]
        )
    ]

    async def run():
        prefill = PrefillWorker(_engine(model))
        decode = DecodeWorker(
            Engine(
                model,
                EngineConfig(num_pages=64, page_size=16, max_num_seqs=1, use_cuda_graphs=False),
            ),
            prefill.prefill,
        )
        try:
            with pytest.raises(ZeroDivisionError):
                await decode.loop.call(lambda: 1 / 0)
            first = decode.generate(_req("long", prompts[0], lengths[0]))
            head = await first.__anext__()  # the long request holds the only batch slot now
            rest, second = await asyncio.gather(
                _collect(first), _collect(decode.generate(_req("short", prompts[1], lengths[1])))
            )
            return [list(head.token_ids) + rest[0], second[0]], decode.transfers
        finally:
            prefill.loop.shutdown()
            decode.loop.shutdown()

    outs, transfers = asyncio.run(asyncio.wait_for(run(), 60))
    assert outs == expected
    assert [t.recomputed for t in transfers] == [False, True]


def test_freeze_gc_moves_live_objects_out_of_collections(model):
    """What a replica holds at start (here: the test process's objects, the engine's among them)
    goes to the permanent generation; unfrozen again so later tests collect as usual."""
    engine = _engine(model)
    try:
        freeze_gc()
        assert gc.get_freeze_count() > 10_000 and gc.is_tracked(engine)
        assert gc.get_count()[2] == 0  # the oldest generation starts empty
    finally:
        gc.unfreeze()
