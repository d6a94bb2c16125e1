"""GPU checks for MTP speculative decoding in the engine (marker gpu, skipped without CUDA).

a) fp32: greedy outputs with MTP + CUDA graphs == MTP eager == plain decoding, at batch 1 and in a
   mixed batch, with the MTP forward captured in graphs keyed (bs, S, "mtp") and drafting exactly
   what the eager MTP forward drafts (same accepted-draft counts); every pure-decode step runs one
   main forward and at most one MTP forward (rows padded to a uniform S, runner docstring).
b) bf16 diagnostic for the batch-1 divergence of benchmarks/notes-engine.md: the main model's logits
   of the last token from an S = 2 verify forward (row 0) against an S = 1 plain forward, eager and
   graph, each against an fp32 forward of the same bf16 weights; then an end-to-end batch-1 run with
   and without MTP, and the fp32 top-2 margin where their outputs first differ.

Both use a small V3-shaped model (the MLA kernels' 512 + 64 latent) trained for a few hundred steps
on a cyclic token sequence (moeray.platform.engine.bench.train_on_cycle), so the model is confident
and MTP drafts are mostly accepted on cycle prompts and mostly rejected on random ones.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from moeray.platform.model.shared_stream import SharedStream

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# fp32 Triton dots default to TF32 (10-bit mantissa); IEEE fp32 keeps the paged MLA kernel's S = 1
# and S = 2 launches within fp32 rounding of each other. Read when a kernel is compiled, so it must
# be set before this process compiles the fp32 kernels.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

CYCLE_LEN = 256
PAGE = 64


def _train(**latent):
    """(cfg, fp32 model trained on the cycle, cycle) on the GPU."""
    from moeray.platform.config import small
    from moeray.platform.engine.bench import train_on_cycle
    from moeray.platform.model.transformer import Transformer

    cfg = small().replace(
        num_hidden_layers=2,
        vocab_size=2048,
        hidden_size=512,
        intermediate_size=1024,
        moe_intermediate_size=128,
        n_routed_experts=16,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=4,
        eos_token_id=None,
        **latent,
    )
    torch.manual_seed(0)
    model = Transformer(cfg).cuda()
    cycle = torch.randperm(cfg.vocab_size)[:CYCLE_LEN]
    losses = train_on_cycle(model, cycle, 300, torch.device("cuda"), seq_len=128, batch=8, lr=1e-3)
    print(
        f"\ntraining {latent or 'V3 latent 512 + 64'}: loss (main + 0.3 MTP) first "
        f"{losses[0]:.3f}, last {losses[-1]:.3f}"
    )
    return cfg, model.eval(), cycle


@pytest.fixture(scope="module")
def trained():
    """The V3 latent (512 + 64), as `moeray bench engine` runs it."""
    return _train()


@pytest.fixture(scope="module")
def trained_small_latent():
    """A 128 + 32 latent for fp32: the paged MLA kernel's fp32 tiles of a 512-wide latent
    ([64, 512] x 4 B = 128 KiB each for the queries and the page) would not fit in shared memory."""
    return _train(kv_lora_rank=128, qk_rope_head_dim=32)


def _clone(model):
    """deepcopy, dropping each MoE's last routing (non-leaf tensors from the last forward) and
    sharing its CUDA streams (an engine gave its MoE layers a side stream for the shared experts:
    streams cannot be copied)."""
    for m in model.moe_layers():
        m.last_routing = None
    streams = [m.stream for m in model.modules() if isinstance(m, SharedStream) and m.stream]
    return copy.deepcopy(model, memo={id(s): s for s in streams})


def _prompts(cfg, cycle, lengths_cycle=(40, 100, 70), lengths_random=(5, 64)):
    g = torch.Generator().manual_seed(1)
    out = []
    for n in lengths_cycle:
        s = int(torch.randint(0, CYCLE_LEN, (1,), generator=g))
        out.append(cycle[(s + torch.arange(n)) % CYCLE_LEN].tolist())
    out += [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths_random]
    return out


def _engine(
    model,
    *,
    spec: int,
    graphs: bool,
    async_scheduling: bool | None = None,
    async_spec: bool = False,
    capture: bool = False,
):
    from moeray.platform.engine.engine import Engine, EngineConfig

    return Engine(
        model,
        EngineConfig(
            page_size=PAGE,
            num_pages=64,
            max_model_len=1032,
            enable_prefix_caching=False,
            use_cuda_graphs=graphs,
            graph_batch_sizes=(1, 2, 4, 8),
            num_speculative_tokens=spec,
            # lazy by default: the graph keys then show which S each step used (whole-step
            # "spec" graphs are captured at start only)
            capture_graphs_at_start=capture,
            async_scheduling=async_scheduling,
            async_scheduling_spec=async_spec,
        ),
    )


def _dense_experts_forward(
    self, x_TD, expert_ids_TK, weights_TK, expert_offset=0, add_TD=None, add_ready=None
):
    """Every expert on every token, weighted by the routing (zero for unchosen experts), plus
    add_TD (after `add_ready`, its producer's event on the shared experts' stream): the same sum
    as `Experts.forward`, without its per-expert `.tolist()`. The fused Triton MoE that makes
    bf16 decode capturable takes only bf16/fp16 weights, so fp32 graphs need this stand-in."""
    if add_ready is not None:
        torch.cuda.current_stream(x_TD.device).wait_event(add_ready)
    E = self.num_experts
    local_TK = expert_ids_TK - expert_offset
    ok_TK = (local_TK >= 0) & (local_TK < E)
    w_TE = torch.zeros(x_TD.shape[0], E, dtype=x_TD.dtype, device=x_TD.device)
    w_TE.scatter_add_(1, local_TK.clamp(0, E - 1), (weights_TK * ok_TK).to(x_TD.dtype))
    h_TEI = F.silu(torch.einsum("td,eid->tei", x_TD, self.gate_proj)) * torch.einsum(
        "td,eid->tei", x_TD, self.up_proj
    )
    y_TD = torch.einsum("tei,edi,te->td", h_TEI, self.down_proj, w_TE)
    return y_TD if add_TD is None else y_TD + add_TD


def _count_decode_forwards(eng):
    """Wrap eng.runner: per step, [main forwards, MTP forwards] when every scheduled sequence
    decodes, None for a step with a prefill chunk (those may add a group)."""
    runner, steps = eng.runner, []
    fg, ex = runner.forward_group, runner.execute

    def forward_group(*a, **kw):
        if steps and steps[-1] is not None:
            steps[-1][0 if kw.get("mtp_module") is None else 1] += 1
        return fg(*a, **kw)

    def execute(seqs, **kw):  # kw: async scheduling's ids_on_device
        steps.append([0, 0] if all(s.is_decode for s in seqs) else None)
        return ex(seqs, **kw)

    runner.forward_group, runner.execute = forward_group, execute
    return steps


def _ref_logits(ref_model, ids: list[int]) -> torch.Tensor:
    """fp32 logits [len(ids), V] from a cache-free forward. Run with autograd on: then attention
    takes SDPA and the MoE its per-expert loop (the Triton kernels run only without autograd), an
    independent reference for the engine's paged-kernel path."""
    with torch.enable_grad():
        return (
            ref_model(torch.tensor([ids], device="cuda"), return_mtp=False)
            .logits[0]
            .detach()
            .float()
        )


def _random_mtp_copy(model, seed: int):
    """A copy of `model` whose MTP block's matrices are re-drawn at random: its drafts are
    nearly all rejected."""
    copy = _clone(model)
    with torch.no_grad():
        g = torch.Generator(device="cuda").manual_seed(seed)
        for prm in copy.mtp.parameters():
            if prm.dim() >= 2:
                prm.copy_(torch.randn(prm.shape, generator=g, device="cuda") * 0.02)
    return copy


def _fp32_exact_setup(trained_small_latent, monkeypatch, seed: int):
    """What the fp32 exactness tests run: the experts as a dense sum (capturable in fp32), the
    trained model and a copy with a random MTP block (`_random_mtp_copy`, drawn from `seed`), and
    the prompts. -> (trained model, random-MTP copy, prompts)."""
    from moeray.platform.model.moe import Experts

    cfg, trained_model, cycle = trained_small_latent
    monkeypatch.setattr(Experts, "forward", _dense_experts_forward)
    return trained_model, _random_mtp_copy(trained_model, seed), _prompts(cfg, cycle)


def _spec_replays(monkeypatch, attr: str = "bs") -> list:
    """The batch size (or another attribute: "kind") of every whole-step graph replay from now
    on (spec_step.SpecGraph), in a list this returns and appends to."""
    from moeray.platform.engine.spec_step import SpecGraph

    replays: list = []
    real_replay = SpecGraph._replay

    def counted(self):
        replays.append(getattr(self, attr))
        real_replay(self)

    monkeypatch.setattr(SpecGraph, "_replay", counted)
    return replays


def _generate(eng, prompts, n):
    from moeray.platform.engine.sampler import SamplingParams

    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=n))
    return [o.output_token_ids for o in outs]


def test_mtp_graphs_fp32_exact(trained_small_latent, monkeypatch):
    # The trained model's drafts are nearly all accepted (its MTP uses the true next token, so it
    # agrees with the main model even off the cycle). A copy with a re-initialized MTP block
    # drafts at random: nearly all rejected, so verify's rejection path and the S = 1 MTP forward
    # after a rejection run too.
    trained_model, random_mtp, prompts = _fp32_exact_setup(trained_small_latent, monkeypatch, 5)
    n = 24
    rows = []
    cases = [
        (m, b, grp)
        for m in ("trained", "random mtp")
        for b, grp in (("batch 1", [[p] for p in prompts]), ("mixed", [prompts]))
    ]
    for model_name, batch_name, groups in cases:
        model = trained_model if model_name == "trained" else random_mtp
        res = {}
        for name, spec, graphs in (
            ("plain eager", 0, False),
            ("plain graphs", 0, True),
            ("mtp eager", 1, False),
            ("mtp graphs", 1, True),
        ):
            eng = _engine(model, spec=spec, graphs=graphs)
            steps = _count_decode_forwards(eng)
            outs = [o for grp in groups for o in _generate(eng, grp, n)]
            st = eng.drafter.stats if spec else None
            res[name] = (outs, st, eng, [c for c in steps if c is not None])
            fw = max((tuple(c) for c in steps if c is not None), default=(0, 0))
            rows.append(
                (
                    model_name,
                    batch_name,
                    name,
                    eng.runner.graph_status,
                    sorted(k for k in eng.runner.graphs if k[2] == "mtp"),
                    st.num_draft_tokens if st else 0,
                    st.num_accepted_tokens if st else 0,
                    fw,
                )
            )
        plain = res["plain eager"][0]
        for name, (outs, _st, _e, _steps) in res.items():
            assert outs == plain, f"{batch_name}: {name} differs from plain eager decoding"
        st_e, st_g = res["mtp eager"][1], res["mtp graphs"][1]
        eng_g = res["mtp graphs"][2]
        assert eng_g.runner.graph_status == "captured", eng_g.runner.graph_status
        mtp_keys = {k[1] for k in eng_g.runner.graphs if k[2] == "mtp"}
        # One MTP forward per decode step over every row: S = 2 when any row's draft was accepted
        # (rows with 1 newly valid position padded to 2), S = 1 when none was. Alone, a rejected
        # draft is such a step.
        assert mtp_keys <= {1, 2} and (2 in mtp_keys) == (st_g.num_accepted_tokens > 0), (
            sorted(eng_g.runner.graphs),
            st_g,
        )
        if batch_name == "batch 1" and st_g.num_accepted_tokens < st_g.num_draft_tokens:
            assert 1 in mtp_keys, (sorted(eng_g.runner.graphs), st_g)
        # ... and one main forward: every pure-decode step replayed one main and <= 1 MTP graph
        # (0 MTP when the step finished every request).
        steps = res["mtp graphs"][3]
        assert steps and all(c == [1, c[1]] and c[1] <= 1 for c in steps), steps
        # Exactness holds whatever the drafts are, so compare the drafting itself: the captured
        # MTP forward must draft what the eager one drafts.
        assert (st_g.num_draft_tokens, st_g.num_accepted_tokens) == (
            st_e.num_draft_tokens,
            st_e.num_accepted_tokens,
        ), (batch_name, st_e, st_g)
        if model_name == "trained":
            assert st_g.num_accepted_tokens > st_g.num_draft_tokens // 2, st_g
        else:
            assert st_g.num_accepted_tokens < st_g.num_draft_tokens // 2, st_g
    print(
        f"\n{'model':10} {'batch':8} {'mode':13} {'drafts':>6} {'accepted':>8} "
        f"{'fwd/step':>8}  graph_status / mtp graph keys   (fwd/step: the most main, MTP "
        "forwards of a pure-decode step; 1,1 expected)"
    )
    for m, b, name, status, keys, d, a, fw in rows:
        print(f"{m:10} {b:8} {name:13} {d:6d} {a:8d} {fw[0]:>4},{fw[1]:<3}  {status} {keys}")


def test_mtp_chain_graphs_fp32_exact(trained_small_latent, monkeypatch):
    """MOERAY_FUSED_MTP_CHAIN=1 (the MTP forward right after the main one, one read-back a step:
    `MTPDrafter.chain`), eagerly and under CUDA graphs, with drafts mostly accepted (the trained
    MTP) and mostly rejected (a random one): greedy outputs equal plain decoding, the drafts and
    acceptances those of the unchained engine, and decode steps did chain."""
    trained_model, random_mtp, prompts = _fp32_exact_setup(trained_small_latent, monkeypatch, 7)
    n = 24
    for model in (trained_model, random_mtp):
        plain = [
            o for p in prompts for o in _generate(_engine(model, spec=0, graphs=False), [p], n)
        ]
        stats = {}
        for chain in ("0", "1"):
            monkeypatch.setenv("MOERAY_FUSED_MTP_CHAIN", chain)
            for graphs in (False, True):
                eng = _engine(model, spec=1, graphs=graphs)
                calls: list[int] = []
                fn = eng.drafter.chain
                eng.drafter.chain = lambda *a, fn=fn, calls=calls: calls.append(1) or fn(*a)
                outs = [o for p in prompts for o in _generate(eng, [p], n)]
                assert outs == plain, (chain, graphs)
                st = eng.drafter.stats
                stats[(chain, graphs)] = (st.num_draft_tokens, st.num_accepted_tokens)
                assert bool(calls) == (chain == "1"), (chain, graphs, len(calls))
                if graphs:
                    assert eng.runner.graph_status == "captured", eng.runner.graph_status
        assert len(set(stats.values())) == 1, stats


def test_mtp_async_spec_graphs_fp32_exact(trained_small_latent, monkeypatch):
    """EngineConfig.async_scheduling_spec (engine/spec_overlap.py: each MTP step launched from
    the previous one's device outputs, read back one step late) under CUDA graphs, one request at
    a time and all together, drafts mostly accepted (trained MTP) and mostly rejected (random):
    greedy outputs equal plain decoding, drafts and acceptances equal the synchronous MTP
    engine's, steps did run ahead."""
    trained_model, random_mtp, prompts = _fp32_exact_setup(trained_small_latent, monkeypatch, 9)
    n = 24
    for model in (trained_model, random_mtp):
        for groups in ([[p] for p in prompts], [prompts]):
            plain = [
                o for g in groups for o in _generate(_engine(model, spec=0, graphs=False), g, n)
            ]
            stats = []
            for ahead in (False, True):
                eng = _engine(model, spec=1, graphs=True, async_scheduling=True, async_spec=ahead)
                outs = [o for g in groups for o in _generate(eng, g, n)]
                assert outs == plain, (ahead, len(groups))
                st = eng.drafter.stats
                stats.append((st.num_draft_tokens, st.num_accepted_tokens))
                assert eng.runner.graph_status == "captured", eng.runner.graph_status
                if ahead:
                    assert eng._overlap.spec.overlapped_steps >= n // 4, len(groups)
            assert stats[0] == stats[1], stats


def test_mtp_spec_graph_fp32_exact(trained_small_latent, monkeypatch):
    """Greedy MTP steps under async scheduling as one CUDA graph each (spec_step.SpecGraph,
    captured at start): greedy outputs equal plain decoding's, drafts and acceptances equal the
    two-graph steps' (MOERAY_FUSED_SPEC_GRAPH=0, which captures none), with drafts mostly
    accepted and mostly rejected, one request at a time and 5 at once with different lengths
    (rows leave mid-run: the next inputs gathered, 5 rows and then fewer padded to the captured
    8, 4, 2, 1); every step launched replayed a whole-step graph."""
    trained_model, random_mtp, prompts = _fp32_exact_setup(trained_small_latent, monkeypatch, 11)
    replays = _spec_replays(monkeypatch)
    from moeray.platform.engine.sampler import SamplingParams

    lengths = [24 - 2 * i for i in range(len(prompts))]
    for model in (trained_model, random_mtp):
        plain_eng = _engine(model, spec=0, graphs=False)
        want = [
            o.output_token_ids
            for o in plain_eng.generate(
                prompts, [SamplingParams(temperature=0, max_tokens=n) for n in lengths]
            )
        ]
        res = {}
        for graph in ("0", "1"):
            monkeypatch.setenv("MOERAY_FUSED_SPEC_GRAPH", graph)
            eng = _engine(
                model, spec=1, graphs=True, async_scheduling=True, async_spec=True, capture=True
            )
            keys = sorted(k for k in eng.runner.graphs if k[2] == "spec")
            assert keys == ([] if graph == "0" else [(b, 2, "spec") for b in (1, 2, 4, 8)])
            del replays[:]
            alone = [_generate(eng, [p], n)[0] for p, n in zip(prompts, lengths, strict=True)]
            together = [
                o.output_token_ids
                for o in eng.generate(
                    prompts, [SamplingParams(temperature=0, max_tokens=n) for n in lengths]
                )
            ]
            assert alone == want and together == want, graph
            assert eng.runner.graph_status == "captured", eng.runner.graph_status
            spec = eng._overlap.spec  # each run's steps: launched by a start or ahead
            launched = spec.launched_steps
            in_flight = spec.pending is not None  # launched for rows its predecessor ended
            assert launched == spec.overlapped_steps + spec.drained_steps + in_flight
            assert launched >= 30 and spec.overlapped_steps >= launched // 2, launched
            if graph == "1":
                assert len(replays) == launched and {1, 8} <= set(replays) <= {1, 2, 4, 8}, replays
            else:
                assert not replays
            st = eng.drafter.stats
            res[graph] = (st.num_draft_tokens, st.num_accepted_tokens)
        assert res["0"] == res["1"], res


@pytest.mark.parametrize("k", [2, 3])
def test_mtp_drafts_k_fp32_exact(trained_small_latent, monkeypatch, k):
    """K drafts a step (speculative.py's chain) under CUDA graphs: synchronous steps (decode
    graphs of 1 .. 1 + K tokens) and greedy steps under async scheduling as one whole-step graph
    of 1 + K tokens each, drafts mostly accepted (trained MTP) and mostly rejected (random):
    greedy outputs equal plain decoding, drafts and acceptances equal between the two, every
    launched step replayed a whole-step graph."""
    from moeray.platform.engine.sampler import SamplingParams

    trained_model, random_mtp, prompts = _fp32_exact_setup(trained_small_latent, monkeypatch, 13)
    replays = _spec_replays(monkeypatch)
    lengths = [24 - 2 * i for i in range(len(prompts))]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in lengths]
    for model in (trained_model, random_mtp):
        want = [
            o.output_token_ids
            for o in _engine(model, spec=0, graphs=False).generate(prompts, params)
        ]
        res = {}
        for ahead in (False, True):
            eng = _engine(
                model, spec=k, graphs=True, async_scheduling=ahead, async_spec=ahead, capture=True
            )
            keys = sorted(key for key in eng.runner.graphs if key[2] == "spec")
            assert keys == ([(b, 1 + k, "spec") for b in (1, 2, 4, 8)] if ahead else [])
            del replays[:]
            outs = [o.output_token_ids for o in eng.generate(prompts, params)]
            assert outs == want, ahead
            assert eng.runner.graph_status == "captured", eng.runner.graph_status
            if ahead:
                spec = eng._overlap.spec
                # (one launched for rows its predecessor ended may still be in flight)
                launched = spec.launched_steps
                in_flight = spec.pending is not None
                assert launched == spec.overlapped_steps + spec.drained_steps + in_flight
                assert len(replays) == launched >= 8, (replays, launched)
            st = eng.drafter.stats
            res[ahead] = (st.num_draft_tokens, st.num_accepted_tokens)
        assert res[False] == res[True], res


@pytest.mark.parametrize("k", [1, 3], ids=["drafts1", "drafts3"])
def test_mtp_spec_graph_sampled_fp32(trained_small_latent, monkeypatch, k):
    """MOERAY_FUSED_SPEC_GRAPH_SAMPLED=1: sampled MTP steps of k drafts under async scheduling
    as one CUDA graph each (kinds "spec_sampled" and "spec_top_p"; at k = 3 each row's verdict
    cut on the device as its end nears), seeded requests with temperature alone, with top-p,
    and a greedy row among them: the tokens and acceptance counts of the two-graph steps (the
    switch off, which captures no sampled graph), drafts accepted and rejected; the sampled
    graphs replayed; a batch with top-k rows takes the two-graph step."""
    from moeray.platform.engine.sampler import SamplingParams

    trained_model, random_mtp, prompts = _fp32_exact_setup(trained_small_latent, monkeypatch, 13)
    replays = _spec_replays(monkeypatch, "kind")
    n = 20
    batches = {
        "spec_sampled": [SamplingParams(temperature=t, max_tokens=n) for t in (1.0, 0.7, 0, 1.3)],
        "spec_top_p": [SamplingParams(temperature=0.9, top_p=tp, max_tokens=n) for tp in (1, 0.8)],
        "none": [SamplingParams(temperature=1.0, top_k=8, max_tokens=n)] * 2,
    }
    for model in (trained_model, random_mtp):
        for kind, params in batches.items():
            params = [dataclasses.replace(p, seed=50 + i) for i, p in enumerate(params)]
            res = {}
            for on in ("0", "1"):
                monkeypatch.setenv("MOERAY_FUSED_SPEC_GRAPH_SAMPLED", on)
                eng = _engine(
                    model, spec=k, graphs=True, async_scheduling=True, async_spec=True, capture=True
                )
                kinds = {key[2] for key in eng.runner.graphs if key[2].startswith("spec")}
                assert kinds == ({"spec"} if on == "0" else {"spec", "spec_sampled", "spec_top_p"})
                del replays[:]
                outs = eng.generate(prompts[: len(params)], params)
                st = eng.drafter.stats
                res[on] = (
                    [o.output_token_ids for o in outs],
                    st.num_draft_tokens,
                    st.num_accepted_tokens,
                )
                assert eng._overlap.spec.overlapped_steps >= n // 4
                # (a greedy row left alone at the end replays the greedy graph)
                if on == "1" and kind != "none":
                    assert kind in replays and set(replays) <= {kind, "spec"}, set(replays)
                else:
                    assert set(replays) <= {"spec"}, (kind, on, set(replays))
            assert res["0"] == res["1"], kind


def test_mtp_async_spec_sampled_graphs_fp32(trained_small_latent, monkeypatch):
    """Seeded sampled requests (temperature, top-k, top-p) under async_scheduling_spec with CUDA
    graphs emit the synchronous MTP engine's tokens (the verdict drawn on the device from the
    uniforms verify draws), with the same acceptance counts, drafts accepted and rejected; steps
    ran ahead."""
    from moeray.platform.engine.sampler import SamplingParams

    trained_model, random_mtp, prompts = _fp32_exact_setup(trained_small_latent, monkeypatch, 9)
    n = 24
    params = [
        SamplingParams(temperature=t, top_k=k, top_p=tp, max_tokens=n, seed=100 + i)
        for i, (t, k, tp) in enumerate([(1.0, 0, 1.0), (1.5, 8, 1.0), (0.8, 0, 0.9)] * 4)
    ][: len(prompts)]
    counts = []
    for model in (trained_model, random_mtp):
        res = []
        for ahead in (False, True):
            eng = _engine(model, spec=1, graphs=True, async_scheduling=True, async_spec=ahead)
            outs = [o.output_token_ids for o in eng.generate(prompts, params)]
            st = eng.drafter.stats
            res.append((outs, st.num_draft_tokens, st.num_accepted_tokens))
            assert eng.runner.graph_status == "captured", eng.runner.graph_status
            if ahead:
                assert eng._overlap.spec.overlapped_steps >= n // 4
        assert res[0] == res[1]
        counts.append(res[0][1:])
    assert counts[0][1] > 0 and counts[1][1] < counts[1][0], counts  # accepted and rejected


def test_bf16_verify_row0_vs_plain_decode(trained):
    """The S = 2 verify forward's row 0 is the same prediction as the S = 1 plain forward; in bf16
    they differ by rounding only. Measured against an fp32 forward of the same bf16 weights."""
    from moeray.platform.engine.sampler import SamplingParams

    cfg, model32, cycle = trained
    model = _clone(model32).to(torch.bfloat16).eval()
    ref_model = _clone(model).float().eval()  # the bf16 weights, fp32 arithmetic
    prompts = _prompts(cfg, cycle, lengths_cycle=(100,), lengths_random=(100,))
    # Synchronous steps: the loop reads each step's token from the request before the next.
    eng = _engine(model, spec=0, graphs=True, async_scheduling=False)
    runner = eng.runner
    # (prompt, p, margin_ref, err1_e, err2_e, err1_g, err2_g, err2row1_g, d12_e, d12_g, agree)
    stats = []
    for pi, prompt in enumerate(prompts):
        rid = eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=20))
        eng.step()  # prefill (and the first token)
        for _ in range(12):
            req = eng.scheduler.requests[rid]
            p = req.num_computed
            tok = req.token_ids[p]
            bt = runner.inputs.tables_by_id([rid])
            assert bt.shape[1] * PAGE > p + 1, "position p + 1 must be on an allocated page"
            starts = torch.tensor([p], device="cuda")
            res = {}
            with torch.inference_mode():
                for mode in ("eager", "graph"):
                    runner.use_cuda_graphs = mode == "graph"
                    l1 = runner.forward_group(torch.tensor([[tok]], device="cuda"), bt, starts)[0]
                    l1 = l1[0, 0].clone()
                    draft = int(l1.argmax())  # the draft a perfect MTP would give
                    l2 = runner.forward_group(
                        torch.tensor([[tok, draft]], device="cuda"), bt, starts
                    )[0][0].clone()
                    res[mode] = (l1, l2, draft)
                runner.use_cuda_graphs = True
            ref = _ref_logits(ref_model, [*req.token_ids[: p + 1], res["eager"][2]])[-2:]
            top2 = ref[0].topk(2).values
            l1e, l2e, _ = res["eager"]
            l1g, l2g, dg = res["graph"]
            mx = lambda a, b: float((a - b).abs().max())  # noqa: E731
            agree = (
                len(
                    {
                        int(ref[0].argmax()),
                        int(l1e.argmax()),
                        int(l2e[0].argmax()),
                        int(l1g.argmax()),
                        int(l2g[0].argmax()),
                    }
                )
                == 1
            )
            stats.append(
                (
                    pi,
                    p,
                    float(top2[0] - top2[1]),
                    mx(l1e, ref[0]),
                    mx(l2e[0], ref[0]),
                    mx(l1g, ref[0]),
                    mx(l2g[0], ref[0]),
                    mx(l2g[1], ref[1]) if dg == res["eager"][2] else float("nan"),
                    mx(l1e, l2e[0]),
                    mx(l1g, l2g[0]),
                    agree,
                )
            )
            eng.step()  # the engine's own plain decode step at p (rewrites the same KV)
        eng.abort(rid)
        assert runner.graph_status == "captured", runner.graph_status
    # Noise yardstick: the plain S = 1 path's error against fp32, the path decode always used.
    noise = max(max(s[3], s[5]) for s in stats)
    print(f"\nbf16 noise (max |S=1 logits - fp32|) = {noise:.4f}")
    print(
        "prompt  pos  ref_margin  S1_eager  S2r0_eager  S1_graph  S2r0_graph  S2r1_graph"
        "  |S1-S2r0|_e  |S1-S2r0|_g  argmax_agree"
    )
    for s in stats:
        print(
            f"{s[0]:6d} {s[1]:4d} {s[2]:11.4f} {s[3]:9.4f} {s[4]:11.4f} {s[5]:9.4f} {s[6]:11.4f}"
            f" {s[7]:11.4f} {s[8]:12.4f} {s[9]:12.4f}  {s[10]}"
        )
    # Checked after the end-to-end runs below, so that one failure still prints everything.
    problems = []
    for s in stats:
        # Row 0 of the verify forward is no noisier than plain decode (a wrong context, position
        # or mask for row 0 would be off by the logits' scale, not by bf16 rounding).
        if not (s[4] <= 4 * noise + 1e-3 and s[6] <= 4 * noise + 1e-3):
            problems.append(f"S=2 row 0 error above 4 x noise: {s}")
        # Row 1 (the draft's row, seeing the draft it just wrote) likewise.
        if s[7] > 4 * noise + 1e-3:
            problems.append(f"S=2 row 1 error above 4 x noise: {s}")
        if s[2] > 4 * noise and not s[10]:
            problems.append(
                f"argmax differs where the fp32 top-2 margin {s[2]:.4f} > 4 x noise: {s}"
            )

    # End to end at batch 1 (the bench's case) and in a batch of both prompts: plain decoding
    # (graphs) against MTP with the MTP forward captured and eager, and where outputs first differ.
    n = 32
    for batch in ([[p] for p in prompts], [prompts]):
        plain_eng = _engine(model, spec=0, graphs=True)
        plain = [o for grp in batch for o in _generate(plain_eng, grp, n)]
        for mtp_graphs in (True, False):
            e = _engine(model, spec=1, graphs=True)
            e.runner.use_mtp_graphs = mtp_graphs
            outs = [o for grp in batch for o in _generate(e, grp, n)]
            st = e.drafter.stats
            if mtp_graphs:
                assert e.runner.graph_status == "captured", e.runner.graph_status
            for pi, prompt in enumerate(prompts):
                first = next(
                    (
                        i
                        for i, (a, b) in enumerate(zip(plain[pi], outs[pi], strict=False))
                        if a != b
                    ),
                    None,
                )
                line = (
                    f"batch {len(batch[0])}, MTP {'graphs' if mtp_graphs else 'eager '}: prompt "
                    f"{pi} acceptance (all prompts) {st.acceptance_rate:.2f} "
                    f"({st.num_accepted_tokens}/{st.num_draft_tokens}); identical to plain: "
                    f"{first is None}"
                )
                if first is not None:
                    ref = _ref_logits(ref_model, prompt + plain[pi][:first])[-1]
                    top2 = ref.topk(2).values
                    margin = float(top2[0] - top2[1])
                    line += (
                        f"; first difference at output {first}: plain {plain[pi][first]}, "
                        f"MTP {outs[pi][first]}, fp32 argmax {int(ref.argmax())}, fp32 top-2 "
                        f"margin {margin:.4f} (4 x noise = {4 * noise:.4f})"
                    )
                print(line)
                # bf16 rounding can only flip a near-tie; a real bug flips confident ones.
                if first is not None and margin > 4 * noise:
                    problems.append(line)
    assert not problems, "\n".join(problems)
