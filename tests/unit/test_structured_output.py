"""Grammar-constrained decoding: the sampler's token mask, the engine's matchers, real schemas."""

import asyncio
import json

import jsonschema
import pytest
import torch

from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.grammar import GrammarSet, check_structured_output
from moeray.platform.engine.sampler import Sampler, SamplingParams, mask_logits
from moeray.platform.engine.structured import StructuredOutput
from moeray.platform.serve.bench import random_tiny_model
from moeray.platform.serve.http.protocol import GenerationParams, GenerationRequest
from moeray.platform.serve.worker import DecodeWorker, PrefillWorker

# Every value bounded (lengths, ranges, enums), so a random-weight model closes the object well
# within max_tokens; the checks still need every token to follow the grammar.
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
            "kind": {"enum": ["x", "y"]},
            "n": {"type": ["integer", "null"], "minimum": -5, "maximum": 5},
        },
        "required": ["tags", "kind", "n"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["x"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
]


def _unpack_reference(mask_BW: torch.Tensor, V: int) -> torch.Tensor:
    """Bit j of word w allows token 32 w + j, one element at a time."""
    B = mask_BW.shape[0]
    out = torch.zeros(B, V, dtype=torch.bool)
    for b in range(B):
        for v in range(V):
            word = int(mask_BW[b, v // 32]) & 0xFFFFFFFF
            out[b, v] = bool((word >> (v % 32)) & 1)
    return out


def test_mask_logits_and_sampler_only_pick_allowed_tokens():
    torch.manual_seed(0)
    B, V = 5, 77  # V not a multiple of 32: the last word is partly padding
    logits_BV = torch.randn(B, V) * 3
    mask_BW = torch.randint(-(2**31), 2**31 - 1, (B, (V + 31) // 32), dtype=torch.int32)
    mask_BW[0] = -1  # a row without a grammar: everything allowed
    mask_BW[1] = 0
    mask_BW[1, 2] = 1 << 5  # exactly one token: 69
    allowed_BV = _unpack_reference(mask_BW, V)
    got = mask_logits(logits_BV, mask_BW)
    assert torch.equal(got.isneginf(), ~allowed_BV)
    assert torch.equal(got[allowed_BV], logits_BV[allowed_BV])
    sampler = Sampler()
    kinds = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.5),
        SamplingParams(temperature=2.0),
    ]
    for seed in range(40):
        gens = [torch.Generator().manual_seed(seed * 10 + i) for i in range(B)]
        res = sampler(logits_BV, kinds, gens, token_mask_BW=mask_BW)
        assert all(allowed_BV[b, t] for b, t in enumerate(res.token_ids))
        assert res.token_ids[1] == 69
    # The greedy row is the argmax of the allowed tokens; its logprobs are the raw model's.
    assert res.token_ids[0] == int(logits_BV[0].argmax())
    raw = logits_BV.log_softmax(-1)
    lp = res.logprobs[0]
    assert lp is not None and abs(lp.logprob - float(raw[0, lp.token_id])) < 1e-5
    with pytest.raises(ValueError, match="token mask"):
        mask_logits(logits_BV, mask_BW[:2])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return random_tiny_model(tmp_path_factory.mktemp("tiny"))


def _engine(directory, **kw):
    return Engine.from_pretrained(
        directory,
        EngineConfig(
            num_pages=64, page_size=16, max_num_batched_tokens=64, use_cuda_graphs=False, **kw
        ),
    )


@pytest.fixture(scope="module")
def engine(model_dir):
    return _engine(model_dir)


def _valid(engine, out, schema):
    assert out.finish_reason == "stop", out
    jsonschema.validate(json.loads(engine.tokenizer.decode(out.output_token_ids[:-1])), schema)


def test_random_model_output_validates_against_each_schema(engine):
    prompt = engine.encode("def add(a, b):")
    specs = [StructuredOutput.from_schema(s) for s in SCHEMAS]
    params = [
        SamplingParams(temperature=t, seed=7, max_tokens=120, structured=spec)
        for t in (0.0, 1.0)
        for spec in specs
    ]
    outs = engine.generate([prompt] * len(params), params)
    for o, schema in zip(outs, SCHEMAS * 2, strict=True):
        assert o.output_token_ids[-1] == engine.model_config.eos_token_id
        _valid(engine, o, schema)
    # The same model unconstrained writes no JSON: the grammar is what made the outputs valid.
    free = engine.generate([prompt], SamplingParams(temperature=1.0, seed=7, max_tokens=30))[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(engine.tokenizer.decode(free.output_token_ids))
    grammars = engine.grammars()
    assert grammars.num_cached == len(SCHEMAS)  # compiled once per schema, not per request
    assert not any(grammars.has(o.request_id) for o in outs)  # matchers freed at finish


def test_json_object_and_mixed_batch(engine):
    prompt = engine.encode("class Point:")
    plain = SamplingParams(temperature=0.0, max_tokens=12)
    expected = engine.generate([prompt], plain)[0].output_token_ids
    obj = SamplingParams(
        temperature=0.9, seed=3, max_tokens=40, structured=StructuredOutput("json_object")
    )
    outs = engine.generate([prompt, prompt], [plain, obj])
    # A row without a grammar in a batch with one samples exactly as it does alone.
    assert outs[0].output_token_ids == expected
    if outs[1].finish_reason == "stop":
        assert isinstance(json.loads(engine.tokenizer.decode(outs[1].output_token_ids[:-1])), dict)
    else:  # cut at max_tokens: still a prefix of an object
        assert engine.tokenizer.decode(outs[1].output_token_ids).startswith("{")


def test_bad_specs_are_value_errors(engine):
    with pytest.raises(ValueError, match='Unsupported type "nonsense"'):
        check_structured_output(StructuredOutput.from_schema({"type": "nonsense"}))
    with pytest.raises(ValueError, match="Cannot find field"):
        engine.add_request(
            [5, 6],
            SamplingParams(
                structured=StructuredOutput.from_schema({"$ref": "#/definitions/missing"})
            ),
        )
    assert not engine.has_unfinished()  # the bad request was never queued
    rid = engine.add_request([5, 6], SamplingParams(structured=StructuredOutput("json_object")))
    assert engine.grammars().has(rid)
    engine.abort(rid)  # what a closed stream does: its matcher goes with it
    assert not engine.grammars().has(rid) and not engine.has_unfinished()
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured=StructuredOutput("json_object"))
    with pytest.raises(ValueError, match="kind"):
        StructuredOutput("regex", "a+")
    with pytest.raises(ValueError, match="object or a boolean"):
        StructuredOutput.from_schema("{}")
    assert isinstance(engine.grammars(), GrammarSet)


def test_grammar_requests_take_no_mtp_drafts(model_dir):
    eng = _engine(model_dir, num_speculative_tokens=1)
    prompt = eng.encode("def add(a, b):")
    spec = StructuredOutput.from_schema(SCHEMAS[0])
    out = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=80, structured=spec))
    _valid(eng, out[0], SCHEMAS[0])
    assert eng.drafter is not None and eng.drafter.stats.num_draft_tokens == 0
    eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))
    assert eng.drafter.stats.num_draft_tokens > 0  # drafting itself is on


def test_prefill_decode_split_keeps_the_grammar(model_dir):
    """The prefill replica samples the first token under the grammar; the decode replica's
    matcher starts from it."""
    spec = StructuredOutput.from_schema(SCHEMAS[1])
    params = GenerationParams(max_tokens=100, temperature=1.0, seed=11, structured=spec)
    eng = _engine(model_dir)
    prompt = tuple(eng.encode("class Point:"))

    async def run():
        prefill = PrefillWorker(_engine(model_dir))
        decode = DecodeWorker(eng, prefill.prefill)
        try:
            steps = [s async for s in decode.generate(GenerationRequest("g", prompt, params))]
            return steps, decode.transfers
        finally:
            prefill.loop.shutdown()
            decode.loop.shutdown()

    steps, transfers = asyncio.run(run())
    assert [t.recomputed for t in transfers] == [False]  # the first token came from the prefill
    ids = [t for s in steps for t in s.token_ids]
    assert steps[-1].finish_reason == "stop"
    jsonschema.validate(json.loads(eng.tokenizer.decode(ids[:-1])), SCHEMAS[1])
