"""The `tiny()` model (what `make demo` trains and `moeray serve` serves by default) on the GPU
engine. Its dims are below tl.dot's 16-element minimum in places (rope 8): the first 2-GPU serve
run answered every request with HTTP 500 because the paged MLA decode kernel did not compile for
them. Marker gpu; skipped without CUDA."""

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# fp32 Triton dots default to TF32; IEEE keeps the kernel within fp32 rounding of the gather path.
# Read when a kernel compiles: set at import, before any test of this process compiles one.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


def _model(dtype):
    from moeray.platform.config import tiny
    from moeray.platform.model.transformer import Transformer

    cfg = tiny().replace(eos_token_id=None)
    model = Transformer(cfg)
    model.reset_parameters(seed=5)
    with torch.no_grad():  # wide logit margins: greedy choices robust to rounding
        model.lm_head.weight.mul_(30.0)
    return cfg, model.to("cuda", dtype)


def _generate(model, cfg, attention):
    from moeray.platform.engine.engine import Engine, EngineConfig
    from moeray.platform.engine.sampler import SamplingParams

    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 70, 129, 16)
    ]
    eng = Engine(
        model,
        EngineConfig(
            page_size=16,
            num_pages=64,
            max_model_len=256,
            attention=attention,
            enable_prefix_caching=False,
        ),
    )
    outs = [
        o.output_token_ids
        for o in eng.generate(prompts, SamplingParams(temperature=0, max_tokens=10))
    ]
    return eng, outs


def test_tiny_paged_kernel_matches_gather_fp32():
    # fp32: the MoE takes its per-expert loop (host sync), so decode runs eagerly - the paged kernel
    # is still what `attend` calls; greedy tokens must equal the gather path's exactly.
    cfg, model = _model(torch.float32)
    eng_k, kernel = _generate(model, cfg, "kernel")
    _, gather = _generate(model, cfg, "gather")
    assert eng_k.runner.attention_calls["attend"] > 0
    assert all(len(o) == 10 for o in kernel)
    assert kernel == gather


def test_tiny_bf16_decode_graphs_capture():
    # bf16 as served: fused MoE, no host sync, so decode steps are captured as CUDA graphs.
    cfg, model = _model(torch.bfloat16)
    eng, outs = _generate(model, cfg, "kernel")
    assert eng.metrics()["cuda_graphs"] == "captured", eng.metrics()["cuda_graphs"]
    assert eng.runner.graphs
    assert all(len(o) == 10 for o in outs)


def test_engine_captures_every_decode_graph_at_start():
    """EngineConfig.capture_graphs_at_start: every padded batch size up to max_num_seqs, S = 1
    and 2, main and MTP, the whole-step MTP graph (S = 2, async scheduling's MTP steps), and by
    default each prefill-chunk bucket to 256 tokens (main and MTP), before the first request, so
    no step pays for a capture."""
    from moeray.platform.config import tiny
    from moeray.platform.engine.engine import Engine, EngineConfig
    from moeray.platform.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = tiny()
    # bf16 as served: an fp32 model's MoE takes the per-expert loop, whose .tolist() host sync
    # makes every capture fail (see test_tiny_paged_kernel_matches_gather_fp32).
    model = Transformer(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    engine_cfg = dict(
        page_size=16,
        num_pages=64,
        max_num_seqs=5,
        graph_batch_sizes=(1, 2, 4, 8, 16),
        num_speculative_tokens=1,
    )
    eng = Engine(model, EngineConfig(**engine_cfg))
    want = {(bs, S, kind) for bs in (1, 2, 4, 8) for S in (1, 2) for kind in ("main", "mtp")}
    want |= {(bs, 2, "spec") for bs in (1, 2, 4, 8)}
    assert eng.runner.chunk_buckets == (16, 32, 64, 128, 256)
    # chunk graphs: bs up to 8 (the padded max_num_seqs), bs x S within the longest chunk (64
    # pages of 16 tokens: max_model_len 1,024, under the 2,048-token budget)
    chunks = {(bs, S) for S in eng.runner.chunk_buckets for bs in (1, 2, 4, 8) if bs * S <= 1024}
    want |= {(bs, S, kind) for bs, S in chunks for kind in ("chunk", "mtp_chunk")}
    assert set(eng.runner.graphs) == want, (sorted(eng.runner.graphs), eng.runner.graph_status)
    assert eng.runner.graph_status == "captured"
    before = set(eng.runner.graphs)
    from moeray.platform.engine.sampler import SamplingParams

    eng.generate([[1, 2, 3]] * 5, SamplingParams(temperature=0, max_tokens=6))
    assert set(eng.runner.graphs) == before, "a step captured a graph after start"
    # a P/D prefill replica's engine: the chunk graphs (main and MTP) only, and its first tokens
    # through them equal the full engine's
    prefill = Engine(model, EngineConfig(**engine_cfg, capture_decode_graphs=False))
    want = {(bs, S, kind) for bs, S in chunks for kind in ("chunk", "mtp_chunk")}
    assert set(prefill.runner.graphs) == want, sorted(prefill.runner.graphs)
    prompts = [list(range(1, n)) for n in (20, 70, 140)]
    first = SamplingParams(temperature=0, max_tokens=1)
    got = [o.output_token_ids for o in prefill.generate(prompts, first)]
    assert prefill.runner.chunk_graph_replays["chunk"] >= len(prompts)
    assert got == [o.output_token_ids for o in eng.generate(prompts, first)]


class _LaunchSpy:
    """Stands in for a Triton kernel object: counts launches, then launches the real kernel."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_fused_decode_kernels_captured_and_equal_to_reference(monkeypatch):
    """The MoE-alignment, SwiGLU, router-logits and cache-write kernels (issue 19) run inside the
    captured bf16 graphs (decode and, by default, prefill chunks), the cache write with the
    latent norm and both RoPE rotations in it, and greedy tokens equal those of the PyTorch
    references (MOERAY_FUSED_ROPE=0, MOERAY_FUSED_ALIGN=0, MOERAY_FUSED_SWIGLU=0,
    MOERAY_FUSED_GATE_LOGITS=0; ROPE=0 sends the write's norm and rotations back to separate
    launches): the kernels are bit-exact on the GPU but for the order of two fp32 sums (the
    latent norm's, the router's), and the tiny model's logit margins are wide. (The standalone
    rope kernel runs in eager prefill chunks only, which these prompts no longer take.)"""
    from moeray.kernels import mla_write as write_mod
    from moeray.kernels import moe_align as align_mod
    from moeray.kernels import router_logits as logits_mod
    from moeray.kernels import swiglu as swiglu_mod

    def spy(module, name: str) -> _LaunchSpy:
        launcher = _LaunchSpy(getattr(module, name))
        monkeypatch.setattr(module, name, launcher)
        return launcher

    spies = (
        spy(align_mod, "_moe_align_kernel"),
        spy(swiglu_mod, "_swiglu_kernel"),
        spy(logits_mod, "_router_logits_kernel"),
    )
    write_spy = spy(write_mod, "_mla_write_pack_kernel")
    names = ("moe_align", "swiglu", "router_logits", "mla_write_pack")
    # router_logits itself: not folded with the norm before it (kernels/norm_router.py's test)
    monkeypatch.setenv("MOERAY_FUSED_NORM_ROUTER", "0")
    cfg, model = _model(torch.bfloat16)
    eng, fused = _generate(model, cfg, "kernel")
    assert eng.metrics()["cuda_graphs"] == "captured", eng.metrics()["cuda_graphs"]
    counts = {name: s.launches for name, s in zip(names, (*spies, write_spy), strict=True)}
    assert all(counts.values()), counts
    monkeypatch.setenv("MOERAY_FUSED_ROPE", "0")
    monkeypatch.setenv("MOERAY_FUSED_ALIGN", "0")
    monkeypatch.setenv("MOERAY_FUSED_SWIGLU", "0")
    monkeypatch.setenv("MOERAY_FUSED_GATE_LOGITS", "0")
    before = [s.launches for s in spies]
    eng_ref, ref = _generate(model, cfg, "kernel")
    assert [s.launches for s in spies] == before
    assert eng_ref.metrics()["cuda_graphs"] == "captured"
    assert all(len(o) == 10 for o in fused)
    assert fused == ref


def test_paged_positions_in_the_decode_graphs(monkeypatch):
    """The step's positions, lengths and slots from one launch (the default) inside the captured
    bf16 decode graphs and in the eager prefill steps (whose starts are a strided column of the
    ids upload): the same greedy tokens as the PyTorch ops with MOERAY_FUSED_PAGED_POSITIONS=0
    (integer math: the same values)."""
    from moeray.kernels import paged_positions as positions_mod

    launcher = _LaunchSpy(positions_mod._paged_positions_kernel)
    monkeypatch.setattr(positions_mod, "_paged_positions_kernel", launcher)
    cfg, model = _model(torch.bfloat16)
    monkeypatch.setenv("MOERAY_FUSED_PAGED_POSITIONS", "0")
    _, ref = _generate(model, cfg, "kernel")
    assert launcher.launches == 0
    monkeypatch.delenv("MOERAY_FUSED_PAGED_POSITIONS")
    eng, got = _generate(model, cfg, "kernel")
    assert eng.metrics()["cuda_graphs"] == "captured", eng.metrics()["cuda_graphs"]
    assert launcher.launches > 0
    assert all(len(o) == 10 for o in got) and got == ref


@pytest.mark.parametrize(
    "async_scheduling,spec,lens",
    [
        (False, 0, (3, 70, 129, 16)),
        (True, 0, (3, 70, 129, 16)),
        (False, 1, (3, 70, 129, 16)),
        (False, 0, (40, 40, 40, 70, 70)),
        (False, 1, (40, 40, 40, 70, 70)),
    ],
)
def test_chunk_graphs_capture_and_match_eager(async_scheduling, spec, lens, monkeypatch):
    """EngineConfig.prefill_graph_tokens: prefill chunks of 3-129 tokens replay CUDA graphs of
    16-256-token buckets (the absorbed MLA path through the paged kernel, padded at the end, the
    LM head on the last real row) and give the greedy tokens of the eager engine that prefills
    through the same path (prefill_attention="absorbed"). The expanded path's tokens (the
    default eager prefill) are printed beside them: bf16 rounding differs between the paths.
    With MTP speculation (spec 1) each chunk's MTP forward replays its "mtp_chunk" graph too.
    Same-length chunks of a step (40, 40, 40 and 70, 70) replay one graph each length
    (EngineConfig.prefill_graph_seqs), padded to 4 and 2 sequences."""
    from moeray.platform.engine import step_graphs
    from moeray.platform.engine.engine import Engine, EngineConfig
    from moeray.platform.engine.sampler import SamplingParams

    replays: list[tuple[int, int, bool]] = []
    run = step_graphs.StepGraph.run

    def spy(graph, *a, **kw):
        if graph.keep_K is not None:
            replays.append((graph.bs, graph.S, graph.mtp_module is not None))
        return run(graph, *a, **kw)

    monkeypatch.setattr(step_graphs.StepGraph, "run", spy)
    cfg, model = _model(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
    params = SamplingParams(temperature=0, max_tokens=10)
    outs, engines = {}, {}
    for name, kw in (
        ("expanded", {"prefill_graph_tokens": 0}),  # eager chunks
        ("absorbed", {"prefill_graph_tokens": 0, "prefill_attention": "absorbed"}),
        ("graphs", {"prefill_graph_tokens": 256}),
    ):
        engines[name] = eng = Engine(
            model,
            EngineConfig(
                page_size=16,
                num_pages=64,
                max_model_len=256,
                attention="kernel",
                enable_prefix_caching=False,
                async_scheduling=async_scheduling,
                num_speculative_tokens=spec,
                **kw,
            ),
        )
        outs[name] = [o.output_token_ids for o in eng.generate(prompts, params)]
        print(name, outs[name])
    runner = engines["graphs"].runner
    kinds = ("chunk", "mtp_chunk") if spec else ("chunk",)
    want = {(1, s, k) for s in (16, 32, 64, 128, 256) for k in kinds}
    assert want <= set(runner.graphs), (sorted(runner.graphs), runner.graph_status)
    assert runner.graph_status == "captured"
    n = len(prompts)
    assert runner.chunk_graph_replays == {"chunk": n, "mtp_chunk": n if spec else 0}
    if lens[0] == lens[1]:
        one = [(2, 128), (4, 64)]  # sorted
        assert sorted(r[:2] for r in replays if not r[2]) == one, replays
        assert sorted(r[:2] for r in replays if r[2]) == (one if spec else []), replays
    assert runner.attention_calls["expanded"] == 0
    assert outs["graphs"] == outs["absorbed"]


def test_norm_folded_into_the_router_in_the_graphs(monkeypatch):
    """Each MoE layer's post-attention add, norm and router logits as one launch
    (kernels.norm_router, the default) inside the captured bf16 graphs, and greedy tokens equal
    to those with MOERAY_FUSED_NORM_ROUTER=0 (the norm's sum of squares in another fp32 order
    only)."""
    from moeray.kernels import norm_router as norm_router_mod

    cfg, model = _model(torch.bfloat16)
    monkeypatch.setenv("MOERAY_FUSED_NORM_ROUTER", "0")
    _, ref = _generate(model, cfg, "kernel")
    launcher = _LaunchSpy(norm_router_mod._norm_router_logits_kernel)
    monkeypatch.setattr(norm_router_mod, "_norm_router_logits_kernel", launcher)
    monkeypatch.delenv("MOERAY_FUSED_NORM_ROUTER")
    eng, folded = _generate(model, cfg, "kernel")
    assert eng.metrics()["cuda_graphs"] == "captured", eng.metrics()["cuda_graphs"]
    assert launcher.launches > 0
    assert all(len(o) == 10 for o in folded)
    assert folded == ref


def test_engine_keeps_to_its_memory_share():
    """EngineConfig.gpu_memory_utilization: the engine, weights and cache, holds at most that share
    of the GPU (a replica on a fraction of a GPU), and its cache takes 0.9 of the share's unused
    part, where the default takes 0.9 of all free memory."""
    from moeray.platform.engine.engine import Engine, EngineConfig

    _, model = _model(torch.bfloat16)
    total = torch.cuda.mem_get_info()[1]
    weights = torch.cuda.memory_reserved()
    eng = Engine(model, EngineConfig(gpu_memory_utilization=0.2, use_cuda_graphs=False))
    cache = eng.storage.num_pages * eng.cache_shape.bytes_per_page
    assert torch.cuda.memory_reserved() <= 0.2 * total
    assert cache >= 0.85 * (0.2 * total - weights), (cache, total, weights)
    pages = eng.kv.num_pages
    del eng
    with pytest.raises(ValueError, match=r"no KV page .*gpu_memory_utilization=1e-06: raise it"):
        Engine(model, EngineConfig(gpu_memory_utilization=1e-6, use_cuda_graphs=False))
    torch.cuda.empty_cache()
    whole = Engine(model, EngineConfig(use_cuda_graphs=False))
    assert whole.kv.num_pages > 3 * pages  # 0.9 of a free H100/H200 against 0.2 of it
