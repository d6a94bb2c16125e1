"""The engine against transformers' generate, batch invariance, MTP speculation, bench CPU path."""

import json

import pytest
import torch

from moeray.platform.checkpoint import save_model
from moeray.platform.config import tiny
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer

V = 256
N_NEW = 8
LENGTHS = (3, 17, 40, 70)  # under, across and over 16-token pages; 70 > the 32-token budget


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = tiny().replace(num_hidden_layers=2, vocab_size=V, eos_token_id=None)
    model = Transformer(cfg)
    model.reset_parameters(seed=1)
    path = tmp_path_factory.mktemp("tiny-hf")
    save_model(model, cfg, path)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in LENGTHS]
    # a prompt sharing two full pages with prompts[2] (prefix cache)
    prompts.append(prompts[2][:32] + torch.randint(0, V, (5,), generator=g).tolist())
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(
                torch.tensor([p]), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False
            )
            ref.append(out[0, len(p) :].tolist())
    return cfg, model, path, prompts, ref


def engine(model, **kw):
    base = dict(page_size=16, num_pages=64, max_num_batched_tokens=32)
    base.update(kw)
    return Engine(model, EngineConfig(**base))


def test_greedy_matches_hf_generate_mixed_batch(setup):
    _cfg, model, path, prompts, ref = setup
    eng = engine(model)
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=N_NEW))
    assert [o.output_token_ids for o in outs] == ref
    m = eng.metrics()
    assert m["free_pages"] == 64 and m["attention_calls"]["update"] > 0
    assert outs[-1].num_cached_tokens == 32  # the shared two pages came from the prefix cache
    # ... and loading the same directory through from_pretrained gives the same
    eng2 = Engine.from_pretrained(path, EngineConfig(page_size=16, num_pages=64))
    assert [
        o.output_token_ids
        for o in eng2.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=N_NEW))
    ] == ref[:2]


@pytest.mark.parametrize("path", ["expanded", "absorbed"])
def test_prefill_attention_paths_match_hf(setup, path):
    """Prefill chunks through MLA's expanded path (up-projected keys and values) or the absorbed
    one give transformers' greedy tokens, with chunks that start mid-prompt (the 32-token budget
    splits the 40- and 70-token prompts) and a prefix-cache hit; and the first token's logits of a
    chunked 70-token prefill equal transformers' last-position logits."""
    _cfg, model, path_, prompts, ref = setup
    eng = engine(model, prefill_attention=path)
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=N_NEW))
    assert [o.output_token_ids for o in outs] == ref
    calls = eng.metrics()["attention_calls"]
    assert (calls["expanded"] > 0) == (path == "expanded")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path_, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([prompts[3]])).logits[0, -1]
    got = eng.generate([prompts[3]], SamplingParams(temperature=0, max_tokens=1, logprobs=20))[0]
    (lp,) = got.logprobs
    ids, vals = zip(*lp.top, strict=True)
    assert torch.allclose(torch.tensor(vals), want.log_softmax(-1)[list(ids)], atol=1e-4)
    with pytest.raises(ValueError, match="prefill_attention='flash'"):
        engine(model, prefill_attention="flash")


def test_preemption_and_staggered_arrivals_match_hf(setup):
    _cfg, model, _path, prompts, ref = setup
    # 7 pages of 16 tokens cannot hold the five requests (14 pages in all): preemption by recompute
    eng = engine(model, num_pages=7, max_num_batched_tokens=24, enable_prefix_caching=False)
    ids = {}
    final = {}
    for i, p in enumerate(prompts):
        ids[eng.add_request(p, SamplingParams(temperature=0, max_tokens=N_NEW))] = i
        for o in eng.step():  # a new request joins a running batch every step
            if o.finished:
                final[o.request_id] = o.output_token_ids
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o.output_token_ids
    assert eng.metrics()["preemptions"] > 0
    assert {ids[r]: t for r, t in final.items()} == dict(enumerate(ref))


def test_results_do_not_depend_on_batch(setup):
    _cfg, model, _path, prompts, ref = setup
    params = [
        SamplingParams(temperature=0.9, top_p=0.95, seed=10 + i, max_tokens=N_NEW, logprobs=2)
        for i in range(len(prompts))
    ]
    together = engine(model).generate(prompts, params)
    for i in (0, 3):
        alone = engine(model).generate([prompts[i]], [params[i]])[0]
        assert alone.output_token_ids == together[i].output_token_ids
        for a, b in zip(alone.logprobs, together[i].logprobs, strict=False):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
    # sampling actually happened (a seeded run differs from greedy somewhere)
    assert any(o.output_token_ids != r for o, r in zip(together, ref, strict=False))


def test_mtp_speculation_is_exact_and_drafts_match_the_model(setup):
    _cfg, model, _path, prompts, ref = setup
    eng = engine(model, num_speculative_tokens=1)
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=N_NEW))
    assert [o.output_token_ids for o in outs] == ref
    st = eng.drafter.stats
    assert st.num_draft_tokens > 0 and 1.0 <= st.mean_accepted_length <= 2.0
    assert st.acceptance_rate == pytest.approx(st.num_accepted_tokens / st.num_draft_tokens)
    # the paged MTP cache gives the same draft as the model's own uncached MTP head
    eng = engine(model, num_speculative_tokens=1)
    rid = eng.add_request(prompts[3], SamplingParams(temperature=0, max_tokens=N_NEW))
    checked = 0
    while eng.has_unfinished():
        eng.step()
        req = eng.scheduler.requests.get(rid)
        if req is not None and req.spec_token_ids:
            toks = torch.tensor([req.token_ids])
            with torch.no_grad():
                mtp = model(toks, return_mtp=True).mtp_logits[0]  # position s predicts s + 2
            assert req.spec_token_ids == [int(mtp[0, len(req.token_ids) - 2].argmax())]
            checked += 1
    assert checked >= 3


def test_mtp_with_sampling_and_verify_rule(setup):
    _cfg, model, _path, prompts, _ref = setup
    eng = engine(model, num_speculative_tokens=1)
    outs = eng.generate(prompts[:2], SamplingParams(temperature=0.7, seed=3, max_tokens=N_NEW))
    assert all(len(o.output_token_ids) == N_NEW for o in outs)
    from moeray.platform.engine.speculative import verify

    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(0))
    d = int(logits[0].argmax())
    toks, lps = verify(logits, [d], SamplingParams(temperature=0), torch.Generator())
    assert toks == [d, int(logits[1].argmax())] and lps == [None, None]
    toks, _ = verify(logits, [(d + 1) % V], SamplingParams(temperature=0), torch.Generator())
    assert toks == [d]
    # sampling: draft acceptance frequency equals the target probability of the draft
    p = torch.softmax(logits[0], -1)
    d2 = int(p.argsort()[-2])
    g = torch.Generator().manual_seed(1)
    acc = sum(
        verify(logits, [d2], SamplingParams(temperature=1.0), g)[0][0] == d2 for _ in range(2000)
    )
    expect = float(p[d2])
    assert abs(acc / 2000 - expect) < 4.5 * (expect * (1 - expect) / 2000) ** 0.5 + 1e-3


def test_abort_and_bad_input(setup):
    _cfg, model, _path, prompts, _ref = setup
    eng = engine(model)
    rid = eng.add_request(prompts[3], SamplingParams(temperature=0, max_tokens=50))
    eng.step()
    assert eng.kv.pool.num_available < 64
    assert eng.abort(rid) and eng.kv.pool.num_available == 64
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request([V + 3], SamplingParams())
    with pytest.raises(ValueError, match="num_speculative_tokens=5: accepted 0"):
        EngineConfig(num_speculative_tokens=5)


def test_bench_cpu_path(tmp_path, monkeypatch):
    from moeray.platform.engine import bench

    monkeypatch.setenv("MOERAY_RESULTS_DIR", str(tmp_path))
    rc = bench.main(
        [
            "--preset",
            "tiny",
            "--layers",
            "1",
            "--batch-sizes",
            "1,4",
            "--prompt-len",
            "24",
            "--decode-tokens",
            "4",
            "--prefill-batch",
            "2",
            "--mtp-train-steps",
            "5",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert rc == 0
    files = list(tmp_path.glob("engine-*.json"))
    assert len(files) == 1
    r = json.loads(files[0].read_text())
    for key in (
        "device",
        "date",
        "command",
        "decode_tokens_per_s",
        "hf_generate_tokens_per_s",
        "roofline_fraction",
        "mtp_acceptance",
        "mtp_speedup",
        "prefill_tokens_per_s",
    ):
        assert key in r, key
    assert set(r["decode_tokens_per_s"]) == {"1", "4"} and all(
        v > 0 for v in r["decode_tokens_per_s"].values()
    )
    assert 0 <= r["mtp_acceptance"] <= 1
    # MTP under async scheduling, same tokens, its steps launched ahead
    ahead = r["mtp"]["1"]["async_spec"]
    assert ahead["outputs_identical"] and ahead["overlapped_steps"] > 0 and ahead["speedup"] > 0
    by_path = r["prefill_tokens_per_s_by_attention"]
    assert set(by_path) == {"expanded", "absorbed"} and all(v > 0 for v in by_path.values())
    assert r["prefill_tokens_per_s"] == by_path["expanded"]


def test_kernel_view_attend_path_matches_hf(setup, monkeypatch):
    """The GPU attention path (MLA's cache.attend hook -> KernelPagedView -> mla_decode_multi, here
    its CPU reference) gives the same greedy generations, with and without MTP. The reference, not
    the interpreted write and decode kernels (21 s here): tests/kernels runs those kernels through
    this view (test_mla_write_absorb's view test, test_mla_merge's engine test)."""
    from moeray.kernels import mla_decode, mla_write

    for mod in (mla_decode, mla_write):  # the view's writes and attention, not the model's
        monkeypatch.setattr(mod, "use_triton", lambda *tensors: False)
    _cfg, model, _path, prompts, ref = setup
    for spec in (0, 1):
        eng = engine(model, attention="kernel", num_speculative_tokens=spec)
        outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=N_NEW))
        assert [o.output_token_ids for o in outs] == ref
        calls = eng.metrics()["attention_calls"]
        # decode attends over the pages; only prefill chunks (expanded path) gather
        assert calls["attend"] > 0 and calls["update"] == calls["expanded"] > 0
    with pytest.raises(ValueError, match="attention"):
        engine(model, attention="flash")


def test_batched_greedy_targets_and_mtp_forward_checks(setup):
    """verify with targets read back for the whole step (one sync) decides as it does alone; the
    MTP forward refuses hidden rows that do not match its ids; CPU runs no graphs."""
    from moeray.platform.engine.speculative import greedy_targets, verify

    cfg, model, _path, prompts, _ref = setup
    g = torch.Generator().manual_seed(2)
    logits = [torch.randn(j, V, generator=g) for j in (2, 1, 2)]
    targets = greedy_targets(logits)
    assert targets == [lg.argmax(-1).tolist() for lg in logits] and greedy_targets([]) == []
    greedy = SamplingParams(temperature=0)
    for lg, t in zip([logits[0], logits[2]], [targets[0], targets[2]], strict=False):
        for d in (t[0], (t[0] + 1) % V):
            assert verify(lg, [d], greedy, torch.Generator(), t) == verify(
                lg, [d], greedy, torch.Generator()
            )
    with pytest.raises(ValueError, match="greedy targets"):
        verify(logits[0], [1], greedy, torch.Generator(), targets[1])
    eng = engine(model, num_speculative_tokens=1)
    rid = eng.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=4))
    eng.step()
    bt = eng.runner.inputs.tables_by_id([rid])
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match=r"hidden_BSD \[B=1, S=2"):
        eng.runner.forward_group(
            ids,
            bt,
            torch.tensor([0]),
            mtp_module=model.mtp[0],
            hidden_BSD=torch.zeros(1, 1, cfg.hidden_size),
        )
    with pytest.raises(ValueError, match="2 hidden rows for 1 next tokens"):
        eng.runner.execute_mtp(model.mtp[0], [(rid, 0, torch.zeros(2, cfg.hidden_size), [1])])
    assert eng.runner.graph_status == "off" and not eng.runner.graphs


def _count_forwards(eng):
    """Wrap eng.runner so each step records its scheduled token counts, the MTP items' position
    counts and every forward_group call as (kind, B, S). -> the list of step records."""
    runner, log = eng.runner, []
    fg, ex, ex_mtp = runner.forward_group, runner.execute, runner.execute_mtp

    def forward_group(ids_BS, *a, **kw):
        kind = "main" if kw.get("mtp_module") is None else "mtp"
        log[-1]["forwards"].append((kind, *ids_BS.shape))
        return fg(ids_BS, *a, **kw)

    def execute(seqs):
        log.append(
            {
                "decode": all(s.is_decode for s in seqs),
                "S": [s.num_tokens for s in seqs],
                "mtp_m": [],
                "forwards": [],
            }
        )
        return ex(seqs)

    def execute_mtp(module, items):
        log[-1]["mtp_m"] = [len(it[3]) for it in items]
        return ex_mtp(module, items)

    runner.forward_group, runner.execute, runner.execute_mtp = forward_group, execute, execute_mtp
    return log


def test_mtp_decode_step_is_one_main_and_one_mtp_forward(setup):
    """Batch 4 with mixed acceptance and requests reaching max_tokens: verify rows of 1 token (no
    room for a draft) and MTP rows of 1 position (draft rejected) are padded to 2, so every
    pure-decode step runs one main forward and one MTP forward, and greedy output stays exactly
    HF's. Drafts are forced right or wrong by (step + request) parity so both paddings occur; the
    natural MTP drafts run too."""
    _cfg, model, _path, prompts, ref = setup
    max_tokens = (8, 5, 8, 6)
    params = [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens]
    expect = [r[:m] for r, m in zip(ref, max_tokens, strict=False)]
    checked: list[str] = []
    for forced in (True, False):
        eng = engine(model, num_speculative_tokens=1)
        log = _count_forwards(eng)
        if forced:
            propose = eng.drafter.propose

            def forced_propose(scheduled, hidden, max_model_len, propose=propose, log=log):
                propose(scheduled, hidden, max_model_len)  # the real MTP forward, then override
                for s in scheduled:
                    req = s.request
                    if req.spec_token_ids:
                        # the paged MTP cache, padded writes and all, drafts what the model's
                        # uncached MTP head does (position s predicts s + 2)
                        with torch.no_grad():
                            out = model(torch.tensor([req.token_ids]), return_mtp=True)
                        mtp = out.mtp_logits[0]
                        assert req.spec_token_ids == [int(mtp[0, len(req.token_ids) - 2].argmax())]
                        checked.append(req.request_id)
                        i = int(req.request_id.split("-")[1])
                        right = expect[i][len(req.output_token_ids)]
                        req.spec_token_ids = [right if (len(log) + i) % 2 else (right + 1) % V]

            eng.drafter.propose = forced_propose
        outs = eng.generate(prompts[:4], params)
        assert [o.output_token_ids for o in outs] == expect, f"forced={forced}"
        st = eng.drafter.stats
        decode_steps = [e for e in log if e["decode"]]
        assert len(decode_steps) >= 4, log
        for e in decode_steps:
            kinds = [f[0] for f in e["forwards"]]
            assert kinds.count("main") == 1 and kinds.count("mtp") == (1 if e["mtp_m"] else 0), e
            assert all(f[1] == len(e["S"]) for f in e["forwards"] if f[0] == "main"), e
            assert all(f[1] == len(e["mtp_m"]) for f in e["forwards"] if f[0] == "mtp"), e
        if forced:
            assert 0 < st.num_accepted_tokens < st.num_draft_tokens, st
            assert len(checked) >= st.num_draft_tokens, (checked, st)
            # both paddings happened, each in one forward at S = 2
            main_pad = [e for e in decode_steps if {1, 2} <= set(e["S"])]
            mtp_pad = [e for e in decode_steps if {1, 2} <= set(e["mtp_m"])]
            assert main_pad and mtp_pad, log
            assert all(("main", len(e["S"]), 2) in e["forwards"] for e in main_pad)
            assert all(("mtp", len(e["mtp_m"]), 2) in e["forwards"] for e in mtp_pad)


def test_padded_row_writes_scratch_not_unowned_pages(setup):
    """A decode without a draft (max_tokens next) padded to S = 2 next to a drafting one: its
    padded position 16 lies on a page it does not own (16-token pages, it holds one), so the
    write lands on the scratch page; no page outside the two sequences' tables changes."""
    _cfg, model, _path, prompts, _ref = setup
    eng = engine(model, num_speculative_tokens=1)
    g = torch.Generator().manual_seed(7)
    a = eng.add_request(
        torch.randint(0, V, (15,), generator=g).tolist(),
        SamplingParams(temperature=0, max_tokens=2),
    )
    b = eng.add_request(prompts[1], SamplingParams(temperature=0, max_tokens=N_NEW))
    eng.step()  # prefill both; a samples token 16 (position 15) and has no room for a draft
    ra, rb = eng.scheduler.requests[a], eng.scheduler.requests[b]
    assert ra.spec_token_ids == [] and len(rb.spec_token_ids) == 1
    assert len(ra.token_ids) == 16 and len(eng.kv.tables[a].pages) == 1
    pages_a = list(eng.kv.tables[a].pages)
    owned = set(pages_a) | set(eng.kv.tables[b].pages)
    before = eng.storage.kv_LPNK.clone()
    log = _count_forwards(eng)
    eng.step()
    assert log[-1]["S"] == [1, 2] and ("main", 2, 2) in log[-1]["forwards"]
    changed = {
        p
        for p in range(eng.storage.kv_LPNK.shape[1])
        if not torch.equal(before[:, p], eng.storage.kv_LPNK[:, p])
    }
    scratch = eng.runner.scratch_page
    assert scratch in changed and changed <= owned | {scratch}, (changed, owned, scratch)
    # on a's own page only its real position 15 was written (a padded write routed to the row's
    # first page, say, would change slot 0 too)
    page_a = pages_a[0]
    after = eng.storage.kv_LPNK
    slots = {s for s in range(16) if not torch.equal(before[:, page_a, s], after[:, page_a, s])}
    assert slots == {15}, slots


def test_capture_graphs_covers_every_padded_batch_up_to_max_num_seqs(setup):
    # The capture itself needs CUDA (tests/gpu/test_tiny_engine_gpu.py); here which graphs are
    # asked for: every padded size below max_num_seqs plus the first one that holds it, S = 1
    # and 2, main and (given an MTP module) MTP.
    _cfg, model, *_ = setup
    eng = engine(model, graph_batch_sizes=(1, 2, 4, 8, 16, 32))
    runner = eng.runner
    assert runner.capture_graphs(5) == 0  # off on CPU
    asked = []
    runner.use_cuda_graphs = runner.use_mtp_graphs = True
    modes = set()

    def graph_for(B, S, mtp_module=None, hidden_dtype=None):
        # what the forwards of a capture would see: with grad on, MoE takes its syncing training
        # path
        modes.add((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        asked.append((B, S, "main" if mtp_module is None else "mtp", hidden_dtype))

    runner._graph_for = graph_for
    runner.capture_graphs(5, model.mtp[0], torch.bfloat16)
    assert modes == {(True, False)}
    assert sorted(asked) == sorted(
        (b, s, k, None if k == "main" else torch.bfloat16)
        for b in (1, 2, 4, 8)
        for s in (1, 2)
        for k in ("main", "mtp")
    )
    asked.clear()
    runner.capture_graphs(300)  # beyond the largest size: all sizes, main only
    assert sorted(asked) == sorted(
        (b, s, "main", None) for b in (1, 2, 4, 8, 16, 32) for s in (1, 2)
    )


def test_mtp_chain_runs_the_draft_forward_before_verifying(setup, monkeypatch):
    """MOERAY_FUSED_MTP_CHAIN=1: a step of greedy decodes with drafts runs its MTP forward right
    after the main one (`MTPDrafter.chain`, one read-back), not after the update (`propose`);
    the output stays HF's greedy tokens, every draft is still the model's own uncached MTP
    head's argmax, and a step with a prefill, logprobs or sampling keeps `propose`."""
    _cfg, model, _path, prompts, ref = setup
    monkeypatch.setenv("MOERAY_FUSED_MTP_CHAIN", "1")
    eng = engine(model, num_speculative_tokens=1)
    calls = {"chain": 0, "propose": 0}
    chain, propose = eng.drafter.chain, eng.drafter.propose

    def counted(name, fn):
        def call(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)

        return call

    eng.drafter.chain = counted("chain", chain)
    eng.drafter.propose = counted("propose", propose)
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=N_NEW))
    assert [o.output_token_ids for o in outs] == ref
    st = eng.drafter.stats
    assert calls["chain"] >= 2 and calls["propose"] >= 1, calls  # prefill steps propose
    assert 0 < st.num_accepted_tokens <= st.num_draft_tokens
    # one request, its drafts forced right and wrong in turn (both verdicts chain): after each
    # chained step the draft is the uncached MTP head's at the last newly valid position
    eng = engine(model, num_speculative_tokens=1)
    chained = []
    chain = eng.drafter.chain
    eng.drafter.chain = lambda *a: chained.append(1) or chain(*a)
    rid = eng.add_request(prompts[3], SamplingParams(temperature=0, max_tokens=N_NEW))
    accepted = checked = 0
    while eng.has_unfinished():
        req = eng.scheduler.requests[rid]
        if req.spec_token_ids:
            right = ref[3][req.num_output_tokens]
            req.spec_token_ids = [right if len(chained) % 2 else (right + 1) % V]
        before, outputs = len(chained), req.num_output_tokens
        eng.step()
        req = eng.scheduler.requests.get(rid)
        if req is not None and req.spec_token_ids and len(chained) > before:
            accepted += req.num_output_tokens - outputs == 2
            with torch.no_grad():
                mtp = model(torch.tensor([req.token_ids]), return_mtp=True).mtp_logits[0]
            assert req.spec_token_ids == [int(mtp[0, len(req.token_ids) - 2].argmax())]
            checked += 1
    assert checked >= 2 and 0 < accepted < checked, (checked, accepted)
    # what does not chain: logprobs, sampling, the switch off
    eng = engine(model, num_speculative_tokens=1)
    eng.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=N_NEW))
    eng.step()
    out = eng.scheduler.schedule()
    assert eng.drafter.chains(out.scheduled)
    s = out.scheduled[0]
    for params in (
        SamplingParams(temperature=0, max_tokens=N_NEW, logprobs=1),
        SamplingParams(temperature=1.0, max_tokens=N_NEW, seed=1),
    ):
        real = s.request.params
        s.request.params = params
        assert not eng.drafter.chains(out.scheduled)
        s.request.params = real
    monkeypatch.delenv("MOERAY_FUSED_MTP_CHAIN")
    assert not eng.drafter.chains(out.scheduled)  # opt-in


def test_engine_config_names_the_bad_value():
    """EngineConfig refuses a bad setting when it is made, before an engine allocates its cache."""
    for bad, match in (
        ({"max_num_seqs": 0}, r"max_num_seqs=0 must be >= 1"),
        ({"max_num_batched_tokens": 0}, r"max_num_batched_tokens=0 must be >= 1"),
        ({"max_model_len": 0}, r"max_model_len=0 must be >= 1 or None"),
        ({"cpu_cache_bytes": 0}, r"cpu_cache_bytes=0 must be >= 1"),
        ({"graph_batch_sizes": ()}, r"graph_batch_sizes=\(\): accepted one or more sizes >= 1"),
        ({"attention": "flash"}, r"attention='flash': accepted \('auto', 'kernel', 'gather'\)"),
        ({"prefill_attention": "x"}, r"prefill_attention='x': accepted \('auto', 'expanded'"),
        ({"memory_fraction": 0.0}, r"memory_fraction=0.0 must be in \(0, 1\]"),
        ({"gpu_memory_utilization": 2.0}, r"gpu_memory_utilization=2.0 must be in \(0, 1\]"),
    ):
        with pytest.raises(ValueError, match=match):
            EngineConfig(**bad)
