"""Async scheduling (engine/overlap.py) on the GPU with CUDA graphs: the tiny model's greedy tokens
equal the synchronous engine's at batch 1 and 4 (the decode graphs read the previous step's ids on
the device), most decode steps launched one step ahead, and a step returning before its forward
ends (no host sync inside), greedy and, with async_scheduling_sampled, seeded sampled requests
(the sampler's settings and uniforms copied without a sync, its fix-up without a read-back);
with async_scheduling_prefill, requests admitted mid-decode prefill (one over two chunks) in steps
launched ahead beside the graphed decodes, with the synchronous engine's tokens. Marker gpu;
skipped without CUDA."""

import time

import pytest
import torch

from tests.engine_helpers import prefill_exports

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _engine(model, async_scheduling: bool, sampled: bool = False, prefill: bool = False):
    from moeray.platform.engine.engine import Engine, EngineConfig

    return Engine(
        model,
        EngineConfig(
            page_size=16,
            num_pages=64,
            max_model_len=256,
            max_num_seqs=4,
            max_num_batched_tokens=64 if prefill else 2048,
            enable_prefix_caching=False,
            async_scheduling=async_scheduling,
            async_scheduling_sampled=sampled,
            async_scheduling_prefill=prefill,
        ),
    )


@pytest.fixture(scope="module")
def model():
    from moeray.platform.config import tiny
    from moeray.platform.model.transformer import Transformer

    cfg = tiny().replace(eos_token_id=None)
    m = Transformer(cfg)
    m.reset_parameters(seed=5)
    with torch.no_grad():  # wide logit margins: greedy choices robust to batch shapes
        m.lm_head.weight.mul_(30.0)
    return m.to("cuda", torch.bfloat16)


@pytest.mark.parametrize("batch,temperature", [(1, 0.0), (4, 0.0), (1, 0.9), (4, 0.9)])
def test_tokens_equal_and_steps_overlap(model, batch, temperature):
    from moeray.platform.engine.sampler import SamplingParams

    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, 256, (5 + 9 * i,), generator=g).tolist() for i in range(batch)]
    params = SamplingParams(
        temperature=temperature, top_p=0.95, max_tokens=24, ignore_eos=True, seed=3
    )
    want = [o.output_token_ids for o in _engine(model, False).generate(prompts, params)]
    eng = _engine(model, True, sampled=temperature > 0)
    assert eng.metrics()["cuda_graphs"] == "captured"
    got = [o.output_token_ids for o in eng.generate(prompts, params)]
    assert got == want
    assert eng._overlap.overlapped_steps >= 18, eng._overlap.overlapped_steps


def test_staggered_ends_keep_overlapping(model):
    """Four requests ending by max_tokens at different steps: each later step runs the rest one
    step ahead (a subset of the step in flight's rows, their ids gathered on the device, the
    graph of a smaller batch), tokens equal to the synchronous engine's."""
    from moeray.platform.engine.sampler import SamplingParams

    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (5 + 9 * i,), generator=g).tolist() for i in range(4)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 11, 17, 24)]
    want = [o.output_token_ids for o in _engine(model, False).generate(prompts, params)]
    eng = _engine(model, True)
    got = [o.output_token_ids for o in eng.generate(prompts, params)]
    assert got == want
    assert eng._overlap.overlapped_steps >= 21, eng._overlap.overlapped_steps  # 19 if ends drain


def test_prefilled_arrivals_join_the_step_in_flight(model):
    """Requests added with their prompt KV from a prefill engine while decode graphs run one step
    ahead join the next step (their first token uploaded beside the ids gathered on the device):
    tokens equal the synchronous engine's, most steps overlapped."""
    from moeray.platform.engine.sampler import SamplingParams

    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (7 + 5 * i,), generator=g).tolist() for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [o.output_token_ids for o in _engine(model, False).generate(prompts, params)]
    exported = prefill_exports(_engine(model, False), prompts[1:])
    eng = _engine(model, True)
    ids = [eng.add_request(prompts[0], params)]
    final = {}
    for k in range(40):
        if k in (3, 5):
            out = exported[len(ids) - 1]
            o = eng.add_prefilled_request(
                prompts[len(ids)], out.output_token_ids[0], out.kv_export, params
            )
            ids.append(o.request_id)
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o.output_token_ids
        if not eng.has_unfinished():
            break
    assert [final[r] for r in ids] == want
    assert eng._overlap.overlapped_steps >= 14, eng._overlap.overlapped_steps


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_step_returns_before_its_forward_ends(model, temperature):
    """With a slow GPU stream (a queued sleep), step() returns while the forward is still
    queued: the host schedules, samples and launches without waiting for the device."""
    from moeray.platform.engine.sampler import SamplingParams

    eng = _engine(model, True, sampled=temperature > 0)
    eng.add_request(
        list(range(1, 20)),
        SamplingParams(temperature=temperature, top_k=50, max_tokens=40, ignore_eos=True, seed=1),
    )
    for _ in range(6):  # prefill, then decodes in flight
        eng.step()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU cycles queued before the next launch
    t = time.perf_counter()
    eng.step()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    waited = time.perf_counter() - t
    assert host < 0.5 * waited, (host, waited)
    while eng.has_unfinished():
        eng.step()


def test_admissions_prefill_in_steps_launched_ahead(model):
    """Two requests decode; three arrive at later steps (one of 100 tokens: two chunks at the
    64-token budget), each prefilling beside the decodes in a step launched ahead (pending ids
    put into their rows on the device): tokens equal the synchronous engine's, one drain."""
    from moeray.platform.engine.sampler import SamplingParams

    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 20, 100, 13, 30)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    arrive = {0: prompts[:2], 4: prompts[2:4], 7: prompts[4:]}
    results, drains = {}, {}
    for mode in ("sync", "ahead"):
        eng = _engine(model, mode == "ahead", prefill=mode == "ahead")
        ids, final, call = [], {}, 0
        while call <= max(arrive) or eng.has_unfinished():
            ids += [eng.add_request(p, params) for p in arrive.get(call, [])]
            for o in eng.step():
                if o.finished:
                    final[o.request_id] = o.output_token_ids
            call += 1
        results[mode] = [final[r] for r in ids]
        if mode == "ahead":
            assert eng.runner.graph_status.startswith("captured"), eng.runner.graph_status
            drains[mode] = eng._overlap.drained_steps
    assert results["ahead"] == results["sync"]
    assert drains["ahead"] <= 1, drains
