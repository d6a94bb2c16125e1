"""Prefill-chunk graphs (engine/step_graphs.py) on CPU: the bucket rules, EngineConfig's check,
the model's logits for an index tensor, and the runner's chunk path end to end through a
`StepGraph` whose capture and replay run the captured forward eagerly (CPU has no CUDA graphs;
everything else, the static buffers, the padding, the kept logits row, the block-table width, is
the real code). Greedy tokens equal transformers' generate with chunks of 3-32 tokens padded to
16 / 32-token buckets, over 16-token pages, a prefix-cache hit included; a failed capture is
tried once and a failed chunk capture leaves the decode graphs on. A GPU test replays real graphs
(tests/gpu/test_tiny_engine_gpu.py -k chunk_graphs)."""

import logging

import pytest
import torch

from moeray.platform.config.serve import ServeConfig
from moeray.platform.engine import runner_graphs
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.runner import ModelRunner
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.engine.step_graphs import (
    StepGraph,
    chunk_bucket,
    chunk_buckets,
    chunk_graph_shapes,
    chunk_replay_plan,
    graph_seconds,
)
from moeray.platform.serve import worker
from moeray.platform.serve.cli import main as serve_main
from tests.unit.test_engine import N_NEW, setup  # noqa: F401  (the module fixture)


def test_buckets():
    assert chunk_buckets(0) == ()
    assert chunk_buckets(16) == (16,)
    assert chunk_buckets(256) == (16, 32, 64, 128, 256)
    # no graph past the one that holds the longest chunk the scheduler makes
    assert chunk_buckets(256, 48) == (16, 32, 64) and chunk_buckets(256, 64) == (16, 32, 64)
    assert chunk_buckets(256, 4096) == chunk_buckets(256) and chunk_buckets(0, 48) == ()
    b = chunk_buckets(64)
    assert chunk_bucket(3, 0, b, 256) == 16
    assert chunk_bucket(16, 0, b, 256) == 16
    assert chunk_bucket(17, 0, b, 256) == 32
    assert chunk_bucket(65, 0, b, 256) == 0  # past the largest bucket: eager
    assert chunk_bucket(10, 240, b, 256) == 16  # positions 240..255: inside
    assert chunk_bucket(10, 241, b, 256) == 0  # its padding would pass position 255


def test_chunk_graph_shapes():
    b = chunk_buckets(256)
    sizes = (1, 2, 4, 8, 16, 32)
    shapes = chunk_graph_shapes(b, sizes, 8, 2048)
    assert (8, 128) in shapes and (16, 16) not in shapes  # at most max_seqs sequences
    assert (8, 256) not in shapes and (4, 256) in shapes  # at most 1,024 tokens a graph
    assert len(shapes) == 5 * 4 - 1
    shapes = chunk_graph_shapes(b, sizes, 8, 512)  # bs x S within the token budget
    assert {bs for bs, S in shapes if S == 128} == {1, 2, 4}
    assert {bs for bs, S in shapes if S == 256} == {1, 2}
    assert chunk_graph_shapes(b, sizes, 1, 2048) == tuple((1, S) for S in b)
    assert chunk_graph_shapes((16,), sizes, 8, 8) == ((1, 16),)  # one sequence always


def test_chunk_replay_plan():
    batches = {32: [1, 2, 4], 64: [1]}
    chunks = [(20, 0), (20, 8), None, (40, 0), (20, 0), (20, 0), (20, 0), (17, 0), (20, 480)]
    plan = chunk_replay_plan(chunks, (16, 32, 64), 496, batches)
    # the five 20-token chunks whose bucket fits: a group of 4 (bs 4), then 1 (bs 1); 17
    # tokens share the bucket, not the length; the chunk from 480 would pad past 496: eager;
    # no 16-token graph captured: nothing for bucket 16
    assert sorted(plan) == sorted([(4, 32, [0, 1, 4, 5]), (1, 32, [6]), (1, 64, [3]), (1, 32, [7])])
    three = chunk_replay_plan([(20, 0)] * 3, (16, 32, 64), 496, batches)
    assert three == [(4, 32, [0, 1, 2])]  # padded up to the smallest batch that holds them
    assert chunk_replay_plan([(20, 0)], (16, 32), 496, {}) == []


@pytest.mark.parametrize("bad", [8, 48, 2048, -16])
def test_config_names_the_bad_value(bad, capsys):
    with pytest.raises(ValueError, match=f"prefill_graph_tokens={bad}: accepted 0"):
        EngineConfig(prefill_graph_tokens=bad)
    assert EngineConfig(prefill_graph_tokens=256).prefill_graph_tokens == 256
    assert serve_main(["--prefill-graph-tokens", str(bad), "--write-config", "/dev/null"]) == 2
    assert f"prefill_graph_tokens={bad}" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [0, 3, 128])
def test_graph_seqs_names_the_bad_value(bad, capsys):
    with pytest.raises(ValueError, match=f"prefill_graph_seqs={bad}: accepted a power of two"):
        EngineConfig(prefill_graph_seqs=bad)
    assert serve_main(["--prefill-graph-seqs", str(bad), "--write-config", "/dev/null"]) == 2
    assert f"prefill_graph_seqs={bad}" in capsys.readouterr().err


def test_serve_flag_reaches_the_engine_config(tmp_path):
    import yaml

    from moeray.platform.serve.worker import engine_config

    f = tmp_path / "serve.yaml"
    argv = ["--prefill-graph-tokens", "128", "--prefill-graph-seqs", "4"]
    assert serve_main([*argv, "--write-config", str(f)]) == 0
    (app,) = yaml.safe_load(f.read_text())["applications"]
    cfg = ServeConfig.from_dict(app["args"])
    assert engine_config(cfg, "cuda").prefill_graph_tokens == 128
    assert engine_config(cfg, "cuda").prefill_graph_seqs == 4


def test_logits_for_an_index_tensor(setup):  # noqa: F811
    _cfg, model, *_ = setup
    ids = torch.tensor([[5, 9, 2, 7, 1]])
    with torch.no_grad():
        full = model(ids, return_mtp=False).logits
        one = model(ids, return_mtp=False, logits_to_keep=torch.tensor([2])).logits
    assert one.shape == (1, 1, full.shape[-1])
    torch.testing.assert_close(one[:, 0], full[:, 2], rtol=0, atol=1e-6)


class EagerStepGraph(StepGraph):
    """A StepGraph that runs its forward at each replay instead of capturing it, into the same
    output tensors every time, as a graph's static outputs (a second chunk of one step in the
    same bucket overwrites the first's unless the runner copied them). Its capture runs nothing:
    the first replay's forward makes those tensors. (A forward at capture only wrote the scratch
    page; run for each of the ~30 shapes an engine start captures, in Triton's interpreter, it
    was most of these tests' time.)"""

    def _capture(self, runner) -> None:
        self.runner = runner
        self.logits_BSV = self.hidden_BSD = None

    def _replay(self) -> None:
        _, (logits, hidden) = self._forward(self.runner)
        if self.logits_BSV is None:
            self.logits_BSV, self.hidden_BSD = logits, hidden
        else:
            self.logits_BSV.copy_(logits)
            self.hidden_BSD.copy_(hidden)


def _graphed(model, monkeypatch, graph_cls=EagerStepGraph, decode=True, **kw) -> Engine:
    monkeypatch.setattr(runner_graphs, "StepGraph", graph_cls)
    cfg = dict(page_size=16, num_pages=64, max_num_batched_tokens=32, attention="kernel")
    eng = Engine(model, EngineConfig(**{**cfg, **kw}))
    # CPU: no graphs unless forced on, then captured as at a GPU engine's start (chunk graphs
    # only there: a step never captures one); the fake runs their forwards.
    eng.runner.use_cuda_graphs = eng.runner.use_mtp_graphs = True
    eng.runner.chunk_buckets = chunk_buckets(kw.get("prefill_graph_tokens", 0))
    mtp = model.mtp[0] if kw.get("num_speculative_tokens") else None
    eng.runner.capture_graphs(4, mtp, eng.dtype, decode=decode)
    return eng


def test_engine_chunks_through_graphs_match_hf(setup, monkeypatch):  # noqa: F811
    _cfg, model, _path, prompts, ref = setup
    eng = _graphed(model, monkeypatch, prefill_graph_tokens=32)
    runner = eng.runner
    chunks: list[int] = []  # the token count of every scheduled sequence past 2 tokens
    execute = runner.execute

    def spy(seqs, *args, **kw):
        chunks.extend(s.num_tokens for s in seqs if s.num_tokens > 2)
        return execute(seqs, *args, **kw)

    monkeypatch.setattr(runner, "execute", spy)
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=N_NEW))
    assert [o.output_token_ids for o in outs] == ref
    # prompts of 3, 17, 40, 70 and 37 tokens (32 of them cached) in chunks of at most 32 (the
    # token budget): every chunk went through a bucket's graph, none eagerly.
    assert len(chunks) >= len(prompts) and max(chunks) <= 32
    assert runner.chunk_graph_replays == {"chunk": len(chunks), "mtp_chunk": 0}
    # bs x S within the 32-token budget: two 16-token chunks of one length share a graph
    want = {(1, 16, "chunk"), (2, 16, "chunk"), (1, 32, "chunk")}
    assert {k for k in runner.graphs if k[2] == "chunk"} == want
    assert runner.attention_calls["expanded"] == 0
    assert eng.metrics()["chunk_graph_replays"] == runner.chunk_graph_replays
    assert eng.metrics()["free_pages"] == 64


def test_chunk_graphs_skip_prompt_logprobs_and_the_last_positions(setup, monkeypatch):  # noqa: F811
    _cfg, model, _path, prompts, ref = setup
    eng = _graphed(model, monkeypatch, prefill_graph_tokens=16, max_model_len=48)
    # prompt logprobs need every row's logits: eager, and equal to the graphed engine's tokens
    params = SamplingParams(temperature=0, max_tokens=N_NEW, prompt_logprobs=1)
    out = eng.generate([prompts[0]], params)[0]
    replays = eng.runner.chunk_graph_replays
    assert out.output_token_ids == ref[0] and replays["chunk"] == 0
    assert len(out.prompt_logprobs) == len(prompts[0])
    # a 3-token chunk from position 40 would pad to 40..55, past max_model_len's 48: eager
    assert chunk_bucket(3, 40, eng.runner.chunk_buckets, eng.runner.max_pages * 16) == 0
    eng.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=1))
    assert replays["chunk"] == 0  # 17 tokens: more than the 16-token bucket
    eng.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=1))
    assert replays["chunk"] == 1


class FailingStepGraph(EagerStepGraph):
    """A capture that fails as an fp32 model's does (the MoE's host sync), counting the tries."""

    tries = 0

    def _capture(self, runner) -> None:
        FailingStepGraph.tries += 1
        raise RuntimeError("called a synchronizing CUDA operation")


def test_a_failed_capture_is_tried_once(setup, monkeypatch):  # noqa: F811
    """At the start, after the first decode capture fails, no other size or kind is tried (each
    try runs two forwards): the status says why and every forward runs eagerly."""
    _cfg, model, _path, prompts, ref = setup
    monkeypatch.setattr(runner_graphs, "StepGraph", FailingStepGraph)
    eng = Engine(model, EngineConfig(page_size=16, num_pages=64, max_num_batched_tokens=32))
    eng.runner.use_cuda_graphs = True
    eng.runner.chunk_buckets = chunk_buckets(32)
    assert eng.runner.capture_graphs(64) == 0
    assert FailingStepGraph.tries == 1
    assert eng.runner.graph_status.startswith("disabled: RuntimeError: called a synchronizing")
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=N_NEW))
    assert [o.output_token_ids for o in outs] == ref
    assert eng.runner.chunk_graph_replays == {"chunk": 0, "mtp_chunk": 0}


def test_a_failed_chunk_capture_leaves_the_decode_graphs(setup, monkeypatch):  # noqa: F811
    class ChunkFails(EagerStepGraph):
        def _capture(self, runner) -> None:
            if self.keep_K is not None:
                raise RuntimeError("no chunk here")
            super()._capture(runner)

    _cfg, model, _path, prompts, ref = setup
    monkeypatch.setattr(runner_graphs, "StepGraph", ChunkFails)
    eng = Engine(model, EngineConfig(page_size=16, num_pages=64, max_num_batched_tokens=32))
    eng.runner.use_cuda_graphs = True
    eng.runner.chunk_buckets = chunk_buckets(32)
    eng.runner.capture_graphs(4)
    assert eng.runner.graph_status == "captured; chunk disabled: RuntimeError: no chunk here"
    assert {k[2] for k in eng.runner.graphs} == {"main"} and eng.runner.chunk_buckets == ()
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=N_NEW))
    assert [o.output_token_ids for o in outs] == ref


def _record_drafts(runner, monkeypatch) -> list[int]:
    """The draft (last row's MTP argmax) of every item of every MTP forward, in order."""
    drafts: list[int] = []
    execute_mtp = runner.execute_mtp

    def spy(mtp_module, items):
        results = execute_mtp(mtp_module, items)
        drafts.extend(int(lg[-1].argmax()) for _h, lg in results)
        return results

    monkeypatch.setattr(runner, "execute_mtp", spy)
    return drafts


def test_mtp_chunks_through_graphs_draft_as_eager(setup, monkeypatch):  # noqa: F811
    """With MTP speculation each prefill chunk's MTP forward replays its bucket's "mtp_chunk"
    graph (the draft from its last row): greedy tokens equal transformers', and every draft of
    every MTP forward equals the eager speculative engine's."""
    _cfg, model, _path, prompts, ref = setup
    # the chunks' drafts are the point: 3 tokens take each row through a decode step after them
    params = SamplingParams(temperature=0, max_tokens=3)
    ref = [r[:3] for r in ref]
    # the reference attends by gather (PyTorch): the MLA kernels in Triton's interpreter are the
    # graphed engine's, and most of the time on CPU
    cfg = dict(page_size=16, num_pages=64, max_num_batched_tokens=32, attention="gather")
    eager = Engine(model, EngineConfig(**cfg, num_speculative_tokens=1))
    want_drafts = _record_drafts(eager.runner, monkeypatch)
    want = [o.output_token_ids for o in eager.generate(prompts, params)]
    eng = _graphed(model, monkeypatch, prefill_graph_tokens=32, num_speculative_tokens=1)
    drafts = _record_drafts(eng.runner, monkeypatch)
    got = [o.output_token_ids for o in eng.generate(prompts, params)]
    assert got == want == ref
    assert drafts == want_drafts and len(drafts) > len(prompts)
    runner = eng.runner
    mtp_keys = {k for k in runner.graphs if k[2] == "mtp_chunk"}
    assert mtp_keys == {(1, 16, "mtp_chunk"), (2, 16, "mtp_chunk"), (1, 32, "mtp_chunk")}
    assert runner.chunk_graph_replays["mtp_chunk"] == runner.chunk_graph_replays["chunk"] > 0


def test_prefill_replica_captures_chunk_graphs_only(setup, monkeypatch):  # noqa: F811
    """A P/D prefill replica (`make_engine(decodes=False)`) captures its prefill-chunk graphs at
    start and no decode graph: its requests end at their first token, which its chunks compute
    through the graphs; the decode replica's config captures both."""
    from moeray.platform.serve.worker import engine_config

    prefill = engine_config(ServeConfig(), "cuda", decodes=False)
    assert prefill.capture_graphs_at_start and not prefill.capture_decode_graphs
    assert engine_config(ServeConfig(), "cuda").capture_decode_graphs
    # the engine hands the config's choice to the runner's start capture
    seen: list[bool] = []
    monkeypatch.setattr(
        ModelRunner, "capture_graphs", lambda *a, decode=True, spec=False: seen.append(decode) or 0
    )
    _cfg, model, _path, prompts, ref = setup
    cfg = dict(page_size=16, num_pages=64, max_num_batched_tokens=32)
    Engine(model, EngineConfig(**cfg, capture_decode_graphs=False))
    Engine(model, EngineConfig(**cfg))
    assert seen == [False, True]
    monkeypatch.undo()
    eng = _graphed(model, monkeypatch, decode=False, prefill_graph_tokens=32)
    runner = eng.runner
    assert set(runner.graphs) == {(1, 16, "chunk"), (2, 16, "chunk"), (1, 32, "chunk")}
    firsts = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=1))
    assert [o.output_token_ids for o in firsts] == [r[:1] for r in ref]
    assert runner.chunk_graph_replays["chunk"] >= len(prompts)


@pytest.mark.parametrize("spec", [0, 1])
def test_same_length_chunks_replay_one_graph(setup, monkeypatch, spec):  # noqa: F811
    """A burst of same-length prompts: their chunks of one step replay one graph [bs, S] (bs the
    smallest captured batch that holds them, padded), and the greedy tokens equal the eager
    engine's; with prefill_graph_seqs=1 each chunk replays a graph of its own. With MTP
    speculation the chunks' MTP forwards replay the same way, every draft the eager engine's."""
    cfg, model, *_ = setup
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, cfg.vocab_size, (12,), generator=g).tolist() for _ in range(3)]
    # the chunks are the point: 3 tokens take the rows through a decode step or two after them
    params = SamplingParams(temperature=0, max_tokens=3)
    base = dict(page_size=16, num_pages=64, max_num_batched_tokens=64)
    base["num_speculative_tokens"] = spec
    # the three prompts in one step's budget; the reference attends by gather (PyTorch)
    eager = Engine(model, EngineConfig(**base, attention="gather"))
    want_drafts = _record_drafts(eager.runner, monkeypatch) if spec else []
    want = [o.output_token_ids for o in eager.generate(prompts, params)]
    replays: list[tuple[int, int, bool]] = []

    class Counting(EagerStepGraph):
        def _replay(self) -> None:
            if self.keep_K is not None:
                replays.append((self.bs, self.S, self.mtp_module is not None))
            super()._replay()

    for seqs, shapes in ((8, [(4, 16)]), (1, [(1, 16)] * 3)):
        replays.clear()
        kw = dict(base, prefill_graph_tokens=16, prefill_graph_seqs=seqs)
        eng = _graphed(model, monkeypatch, Counting, **kw)
        # captured for max_num_seqs 4: no chunk graph of more (seqs 8)
        assert max(k[0] for k in eng.runner.graphs if k[2] == "chunk") == min(seqs, 4)
        drafts = _record_drafts(eng.runner, monkeypatch) if spec else []
        got = [o.output_token_ids for o in eng.generate(prompts, params)]
        assert got == want and drafts == want_drafts
        expect = [(*shape, False) for shape in shapes]
        expect += [(*shape, True) for shape in shapes] if spec else []
        assert sorted(replays) == sorted(expect), replays
        assert eng.runner.chunk_graph_replays == {"chunk": 3, "mtp_chunk": 3 * spec}


def test_graph_inputs_padding_rows_to_scratch(setup, monkeypatch):  # noqa: F811
    """A replay on fewer rows than the graph's batch puts the padding rows at position 0 of the
    scratch page (token 0), whatever real rows held them before; the real rows' tables are
    copied into their first columns."""
    _cfg, model, *_ = setup
    eng = _graphed(model, monkeypatch)
    graph = eng.runner.graphs[(4, 1, "main")]
    scratch = eng.runner.scratch_page
    full = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]], dtype=torch.int32)
    two = torch.tensor([[9, 10], [11, 12]], dtype=torch.int32)
    with torch.inference_mode():  # as the runner replays (its buffers are inference tensors)
        graph.run(torch.tensor([[11], [12], [13], [14]]), full, torch.tensor([20, 5, 17, 30]))
        assert torch.equal(graph.block_table_BM[:, :2], full)
        graph.run(torch.tensor([[15], [16]]), two, torch.tensor([3, 18]))
    assert torch.equal(graph.block_table_BM[:2, :2], two)
    assert (graph.block_table_BM[2:] == scratch).all()
    assert graph.starts_B.tolist() == [3, 18, 0, 0]
    assert graph.ids_BS[:, 0].tolist() == [15, 16, 0, 0]


def test_graph_seconds_by_kind(setup, monkeypatch):  # noqa: F811
    """The start time of an engine's graphs, by kind: counts, seconds and warm-up seconds summed
    over that kind's graphs (the bench's engine.graph_seconds)."""
    _cfg, model, *_ = setup
    eng = _graphed(model, monkeypatch, prefill_graph_tokens=32)
    graphs = eng.runner.graphs
    for g in graphs.values():
        g.seconds, g.warmup_s = 0.5 + g.bs + g.S / 100, 0.25 * g.bs
    got = graph_seconds(graphs)
    assert sorted(got) == ["chunk", "main"]
    for kind, row in got.items():
        mine = [g for (_b, _s, k), g in graphs.items() if k == kind]
        assert row["graphs"] == len(mine) > 0
        assert row["seconds"] == pytest.approx(sum(0.5 + g.bs + g.S / 100 for g in mine))
        assert row["warmup_s"] == pytest.approx(sum(0.25 * g.bs for g in mine))


def test_replica_start_logs_its_graphs(setup, monkeypatch, caplog):  # noqa: F811
    """A serve replica's engine start logs its seconds and its CUDA graphs by kind (count,
    seconds, warm-up seconds)."""
    _cfg, model, *_ = setup
    eng = _graphed(model, monkeypatch, prefill_graph_tokens=32)
    for g in eng.runner.graphs.values():
        g.seconds, g.warmup_s = 0.5, 0.25
    counts = graph_seconds(eng.runner.graphs)
    monkeypatch.setattr(worker.Engine, "from_pretrained", lambda *a, **kw: eng)
    with caplog.at_level(logging.INFO, logger=worker.__name__):
        assert worker.make_engine(ServeConfig(device="cpu")) is eng
    (line,) = [r.getMessage() for r in caplog.records if "engine ready" in r.getMessage()]
    n_main, n_chunk = int(counts["main"]["graphs"]), int(counts["chunk"]["graphs"])
    assert f"main {n_main} in {0.5 * n_main:.1f} s ({0.25 * n_main:.1f} s warm-up)" in line
    assert f"chunk {n_chunk} in {0.5 * n_chunk:.1f} s" in line
    assert "CUDA graphs captured" in line, line
