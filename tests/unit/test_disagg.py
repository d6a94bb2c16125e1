"""Prefill/decode disaggregation at the engine level: a prefill engine exports the prompt's KV
rows, a decode engine imports them and continues; greedy output equals one engine doing both."""

import pytest
import torch

from moeray.platform.config import tiny
from moeray.platform.engine.disagg import KVRows
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, logprobs=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(tiny()).eval()


def _engine(model, **kw):
    return Engine(
        model,
        EngineConfig(
            num_pages=64, page_size=16, max_num_batched_tokens=64, use_cuda_graphs=False, **kw
        ),
    )


def _run(engine, rid):
    out = []
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid:
                out += o.new_token_ids
                if o.finished:
                    return out, o
    raise AssertionError("request never finished")


def _prefill(prefill, prompt, start, rid="p"):
    prefill.add_request(
        prompt, SamplingParams(temperature=0.0, max_tokens=1, logprobs=2), rid, export_kv_from=start
    )
    toks, out = _run(prefill, rid)
    assert out.kv_export is not None and out.kv_export.start == start
    return toks[0], out


def test_pd_equals_colocated_and_sends_only_missing_rows(model):
    torch.manual_seed(1)
    prompt = torch.randint(2, 1024, (45,)).tolist()
    colocated = _engine(model).generate([prompt], GREEDY)[0]

    prefill, decode = _engine(model), _engine(model)
    first, pout = _prefill(prefill, prompt, 0)
    rows = pout.kv_export
    assert rows.num_tokens == 45 and rows.kv_LTC.shape[0] == tiny().num_hidden_layers
    o = decode.add_prefilled_request(
        prompt, first, rows, GREEDY, "d", first_logprobs=pout.logprobs[0]
    )
    assert o is not None and o.new_token_ids == [first]
    rest, final = _run(decode, "d")
    assert [first, *rest] == colocated.output_token_ids
    assert final.logprobs[0].token_id == first and len(final.logprobs) == len(colocated.logprobs)

    # A second prompt sharing 32 tokens (two pages) with the first: the decode side holds them,
    # so the prefill sends only rows from 32 on.
    prompt2 = prompt[:32] + torch.randint(2, 1024, (9,)).tolist()
    have = decode.cached_prefix_length(prompt2)
    assert have == 32
    first2, pout2 = _prefill(prefill, prompt2, have, rid="p2")
    assert pout2.kv_export.num_tokens == 9
    decode.add_prefilled_request(prompt2, first2, pout2.kv_export, GREEDY, "d2")
    rest2, _ = _run(decode, "d2")
    assert [first2, *rest2] == _engine(model).generate([prompt2], GREEDY)[0].output_token_ids


def test_rows_that_do_not_cover_the_prefix_fall_back_to_recompute(model):
    torch.manual_seed(2)
    prompt = torch.randint(2, 1024, (30,)).tolist()
    expected = _engine(model).generate([prompt], GREEDY)[0].output_token_ids
    prefill, decode = _engine(model), _engine(model)
    first, pout = _prefill(prefill, prompt, 16)  # claims tokens [0,16) are cached: they are not
    assert decode.add_prefilled_request(prompt, first, pout.kv_export, GREEDY, "d") is None
    toks, _ = _run(decode, "d")  # queued for a normal prefill instead
    assert toks == expected


def test_bad_rows_and_export_bounds_are_clear_errors(model):
    e = _engine(model)
    rows = KVRows(0, torch.zeros(3, 5, 32), torch.zeros(3, 5, 8))
    with pytest.raises(ValueError, match=r"cover tokens \[0, 5\) but the prompt has 7"):
        e.add_prefilled_request(list(range(2, 9)), 3, rows)
    with pytest.raises(ValueError, match="export_kv_from=7"):
        e.add_request(list(range(2, 9)), export_kv_from=7)
    with pytest.raises(ValueError, match="disagree"):
        KVRows(0, torch.zeros(3, 5, 32), torch.zeros(3, 4, 8))
