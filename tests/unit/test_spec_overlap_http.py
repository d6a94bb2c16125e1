"""MTP steps under async scheduling behind the OpenAI server, as a user meets them on a GPU (where
both are on by default; forced on here on the CPU): the official `openai` client over real HTTP,
greedy and seeded sampled completions, streamed and not, several at once, equal to what the
synchronous MTP engine emits for the same requests; the steps ran ahead."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_sampling_http import ids_of, openai_client

from moeray.platform.config import tiny
from moeray.platform.engine.bench import train_on_cycle
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer

V = 256


@pytest.fixture(scope="module")
def served():
    """(client, engine, model, prompts): a server over an engine with MTP steps under async
    scheduling, its model trained briefly on a cycle (drafts accepted on it, rejected off it)."""
    cfg = tiny().replace(num_hidden_layers=2, vocab_size=V, eos_token_id=None)
    model = Transformer(cfg)
    model.reset_parameters(seed=3)
    g = torch.Generator().manual_seed(0)
    cycle = torch.randperm(V, generator=g)[:48]
    train_on_cycle(model, cycle, 30, torch.device("cpu"), seq_len=48, batch=8, lr=3e-3)
    model.eval()
    prompts = [cycle[(s + torch.arange(n)) % 48].tolist() for s, n in ((3, 9), (20, 30))]
    prompts += [torch.randint(0, V, (12,), generator=g).tolist()]
    engine = _engine(model, ahead=True)
    with openai_client(engine) as client:
        yield client, engine, model, prompts


def _engine(model, *, ahead: bool) -> Engine:
    return Engine(
        model,
        EngineConfig(
            page_size=16,
            num_pages=128,
            max_num_batched_tokens=64,
            use_cuda_graphs=False,
            num_speculative_tokens=1,
            async_scheduling=ahead,
            async_scheduling_spec=ahead,
        ),
    )


def _sync_outputs(model, prompts, params: SamplingParams) -> list[list[int]]:
    return [o.output_token_ids for o in _engine(model, ahead=False).generate(prompts, params)]


def _complete(client, prompt, **kw) -> list[int]:
    extra = {"ignore_eos": True}
    r = client.completions.create(model="tiny", prompt=prompt, extra_body=extra, **kw)
    return ids_of(r.choices[0].text)


def test_completions_equal_the_synchronous_mtp_engine(served):
    client, engine, model, prompts = served
    spec = engine._overlap.spec
    before = spec.overlapped_steps
    for temperature, seed in ((0.0, None), (1.3, 17)):
        params = SamplingParams(temperature=temperature, seed=seed, max_tokens=20, ignore_eos=True)
        want = _sync_outputs(model, prompts, params)
        got = [
            _complete(client, p, max_tokens=20, temperature=temperature, seed=seed) for p in prompts
        ]
        assert got == want, temperature
    assert spec.overlapped_steps >= before + 20
    assert engine.drafter.stats.num_accepted_tokens > 0


def test_streamed_and_concurrent_requests(served):
    """A streamed completion's chunks join into the synchronous engine's tokens; requests sent
    at once (batched by the engine) each get their own."""
    client, engine, model, prompts = served
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = _sync_outputs(model, prompts, params)
    stream = client.completions.create(
        model="tiny",
        prompt=prompts[1],
        max_tokens=24,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert ids_of(text) == want[1]
    with ThreadPoolExecutor(len(prompts) * 2) as pool:
        jobs = [
            pool.submit(_complete, client, p, max_tokens=24, temperature=0) for p in prompts * 2
        ]
        got = [j.result(timeout=120) for j in jobs]
    assert got == want * 2
    deadline = time.monotonic() + 10  # the engine thread frees the last pages after replying
    while engine.kv.pool.num_available < engine.kv.num_pages and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.kv.pool.num_available == engine.kv.num_pages  # every page back
