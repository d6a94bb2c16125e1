"""CUDA graphs of the runner's forwards: decode groups, and short prefill chunks.

Legend: B sequences in a forward (bs padded up to a captured size), S tokens per row, M pages per
block table, D model width, V vocabulary.

`StepGraph` captures one forward [bs, S] against static inputs (ids, block table, starts, and for
an MTP depth the main model's hidden rows) and replays it after copying a step's inputs in:
  * kind "main": decode groups, S = 1 to the runner's pad_max_s (1 + the drafts a step verifies,
    at least 2), bs one of graph_batch_sizes;
  * kind "mtp": one MTP depth over the same shapes;
  * kind "chunk": prefill chunks of one length n, S a bucket (a power of two from
    CHUNK_GRAPH_MIN up to EngineConfig.prefill_graph_tokens), bs up to
    EngineConfig.prefill_graph_seqs sequences. Each chunk's n real tokens come first and its
    ids are padded to S at the end; the LM head runs on position n - 1 of each row only (a
    static index, set at each replay), so the graph holds bs logits rows, not bs x S x V;
  * kind "mtp_chunk": the MTP depth over the chunks' positions, shaped as "chunk" (the main
    model's hidden rows padded with zero rows), its logits at position n - 1: the drafts.

Why graph the chunks. A step that carries a prefill chunk ran eagerly: each of Moonlight's
27 layers launches ~100 kernels from Python, and such steps took ~50-110 ms on an H100 where a
decode-only step replayed its graph in a few ms; with 128-token chunks replayed from graphs those
steps take 15 ms in FP8 and 22 in bf16 (benchmarks/notes-engine.md, `bench engine --arrivals`,
`mixed_step_ms`). The chunk graph runs MLA's absorbed path through the paged
kernel (the one decode runs; each query row attends causally up to its own position), not the
expanded path eager chunks take: that path gathers the context with host-side sizes and cannot
be captured.

Why several chunks a graph. A step's chunks of one length (a burst of same-length prompts, as
fixed-length benchmark clients send) run eagerly as one forward, which reads the MoE's weights
once; replayed one chunk a graph they read them once a chunk: sixteen 128-token chunks took 138
ms a step in FP8 and 197 in bf16 so, 98 and 48 as one eager forward (Moonlight, H100, `bench
engine --arrivals --arrival-burst 16`). So a step's same-length chunks replay one graph [bs, S]
together, bs the smallest captured batch that holds them (padding rows as decode's), in groups
of the largest when there are more.

Padding is harmless for the reasons runner.py's docstring gives for decode padding
(rows past the real tokens write positions no real row reads, into the sequence's own pages or
the scratch page; an MTP depth's padded hidden rows are zero, whose RMSNorm is zero); the runner
only picks a bucket whose last position stays inside max_model_len's block-table columns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from moeray.platform.config.graphs import CHUNK_GRAPH_MAX, CHUNK_GRAPH_MIN
from moeray.platform.engine.kv_cache import PagedKVStorage
from moeray.platform.engine.paged_view import KernelPagedView
from moeray.platform.graph_capture import graph_capture


def chunk_buckets(max_tokens: int, longest_chunk: int | None = None) -> tuple[int, ...]:
    """The chunk graph sizes up to `max_tokens` (0: none), and none past the first that holds
    `longest_chunk` tokens (the scheduler's token budget: no chunk is longer, so a larger graph
    would never replay)."""
    sizes, s = [], CHUNK_GRAPH_MIN
    while max_tokens and s <= max_tokens:
        sizes.append(s)
        if longest_chunk is not None and s >= longest_chunk:
            break
        s *= 2
    return tuple(sizes)


def chunk_graph_shapes(
    buckets: tuple[int, ...], batch_sizes, max_seqs: int, max_tokens: int
) -> tuple[tuple[int, int], ...]:
    """(bs, S) of every chunk graph: each bucket S, bs each of `batch_sizes` up to `max_seqs`
    whose bs x S tokens stay within `max_tokens` (the scheduler's token budget: k same-length
    chunks of a step hold at most that many real tokens) and CHUNK_GRAPH_MAX, or is 1. The
    graphs' memory pool holds the largest one's activations beside the eager path's: at V3's
    128 heads MLA's fp32 partials alone are 0.27 GB a 1,024 tokens."""
    limit = min(max_tokens, CHUNK_GRAPH_MAX)
    return tuple(
        (bs, S)
        for S in buckets
        for bs in sorted(batch_sizes)
        if bs <= max_seqs and (bs == 1 or bs * S <= limit)
    )


def chunk_replay_plan(
    chunks, buckets: tuple[int, ...], max_positions: int, batches: dict[int, list[int]]
) -> list[tuple[int, int, list[int]]]:
    """Which chunks replay which graph: `chunks` one (n, start) per item, None for an item that
    may not (prompt logprobs); `batches` each bucket's captured batch sizes, ascending. Items of
    one length n whose bucket holds their padded positions (`chunk_bucket`) go in groups of at
    most the largest batch captured for that bucket, each on the smallest that holds it.
    -> [(bs, S, item indices)]; items in none run eagerly."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(chunks):
        if c is not None:
            S = chunk_bucket(c[0], c[1], buckets, max_positions)
            if S and batches.get(S):
                by_shape.setdefault((c[0], S), []).append(i)
    plan = []
    for (_n, S), items in by_shape.items():
        sizes = batches[S]
        for k in range(0, len(items), sizes[-1]):
            group = items[k : k + sizes[-1]]
            plan.append((next(b for b in sizes if b >= len(group)), S, group))
    return plan


def chunk_bucket(n: int, start: int, buckets: tuple[int, ...], max_positions: int) -> int:
    """The bucket a chunk of `n` tokens from position `start` replays, 0 for none: the smallest
    bucket of at least n tokens whose padded positions (start .. start + bucket - 1) stay below
    `max_positions` (the block table's columns x the page size)."""
    for s in buckets:
        if s >= n:
            return s if start + s <= max_positions else 0
    return 0


def graph_seconds(graphs) -> dict[str, dict[str, float]]:
    """The start time of a runner's graphs ({(bs, S, kind): StepGraph}) by kind: how many,
    their seconds in all, and of those their warm-up forwards' (Triton's compiles on a cold
    cache)."""
    out: dict[str, dict[str, float]] = {}
    for (_bs, _S, kind), g in sorted(graphs.items()):
        k = out.setdefault(kind, {"graphs": 0, "seconds": 0.0, "warmup_s": 0.0})
        k["graphs"] += 1
        k["seconds"] += g.seconds
        k["warmup_s"] += g.warmup_s
    return out


class ModelRunner(Protocol):
    """What a StepGraph reads of the runner that owns it (engine/runner.py's ModelRunner)."""

    device: torch.device
    model: Any
    storage: PagedKVStorage
    max_pages: int
    scratch_page: int | None
    graph_pool: Any  # the graphs' shared memory pool, None before the first capture

    # The forwards a graph captures, -> (logits, hidden): (ids_BS, view, logits_to_keep) and
    # (mtp_module, hidden_BSD, ids_BS, view, logits_to_keep).
    @property
    def _forward_model(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]: ...

    @property
    def _forward_mtp(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]: ...


class StepGraph:
    """One captured forward for a fixed batch size bs and S tokens per row: the main model (kind
    "main"), one MTP depth (kind "mtp", reading a static hidden_BSD input as well), or either over
    prefill chunks of one length (`chunk`, kinds "chunk" / "mtp_chunk": logits of one position
    a row, the one `run` names)."""

    def __init__(
        self,
        runner: ModelRunner,
        bs: int,
        S: int,
        mtp_module=None,
        hidden_dtype: torch.dtype | None = None,
        *,
        chunk: bool = False,
    ) -> None:
        dev = runner.device
        scratch_page = runner.scratch_page
        if scratch_page is None:
            raise RuntimeError("a step graph needs the storage's scratch page for padding rows")
        self.bs, self.S = bs, S
        self.mtp_module = mtp_module
        self.ids_BS = torch.zeros(bs, S, dtype=torch.long, device=dev)
        self.block_table_BM = torch.full(
            (bs, runner.max_pages), scratch_page, dtype=torch.int32, device=dev
        )
        self.starts_B = torch.zeros(bs, dtype=torch.long, device=dev)
        # chunk: the position whose logits the LM head computes (n - 1 for n real tokens).
        self.keep_K = torch.zeros(1, dtype=torch.long, device=dev) if chunk else None
        self.hidden_in_BSD: torch.Tensor | None = None
        if mtp_module is not None:
            D = runner.model.config.hidden_size
            # Padding rows stay zero: RMSNorm of a zero row is zero (no NaN), and those rows only
            # write the MTP layer's latent into the scratch page.
            self.hidden_in_BSD = torch.zeros(bs, S, D, dtype=hidden_dtype, device=dev)
        self.scratch_page = scratch_page
        # Seconds of this graph's start: all of it, and its first (warm-up) forward, where
        # Triton compiles the kernels for these shapes (a cold cache's cost; the rest is the
        # checked forward and the capture).
        self.warmup_s = 0.0
        t0 = time.perf_counter()
        self._capture(runner)
        self.seconds = time.perf_counter() - t0

    def _capture(self, runner: ModelRunner) -> None:
        """Capture the forward over the static inputs into self.graph, its outputs
        self.logits_BSV / self.hidden_BSD. The view is built inside the capture: its slots and
        positions derive from the static starts and block table, so they are recomputed at
        every replay."""
        dev = runner.device
        t0 = time.perf_counter()
        view = self._forward(runner)[0]  # warm up (Triton compilation) outside the capture
        torch.cuda.synchronize(dev)
        self.warmup_s = time.perf_counter() - t0
        if view.calls["attend"] == 0:
            raise RuntimeError(
                "the model's MLA does not call cache.attend, so attention would "
                "gather with host-side sizes: not capturable"
            )
        # A host sync inside a capture invalidates it (and can leave the stream in an error
        # state), so first replay the forward with syncs turned into errors.
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            self._forward(runner)
        finally:
            torch.cuda.set_sync_debug_mode(prev)
        torch.cuda.synchronize(dev)
        self.graph = torch.cuda.CUDAGraph()
        with graph_capture(self.graph, pool=runner.graph_pool):
            self._keep(self._forward(runner)[1])
        runner.graph_pool = self.graph.pool()

    def _keep(self, outputs) -> None:
        """Hold the captured forward's outputs, the static tensors each replay rewrites."""
        self.logits_BSV, self.hidden_BSD = outputs

    def _replay(self) -> None:
        self.graph.replay()

    def _forward(self, runner: ModelRunner):
        view = KernelPagedView(runner.storage, self.block_table_BM, self.starts_B, self.S)
        keep = 0 if self.keep_K is None else self.keep_K
        if self.mtp_module is None:
            return view, runner._forward_model(self.ids_BS, view, keep)
        assert self.hidden_in_BSD is not None  # allocated with mtp_module
        h_BSD = self.hidden_in_BSD
        return view, runner._forward_mtp(self.mtp_module, h_BSD, self.ids_BS, view, keep)

    def _load(self, ids_BS, block_table_BM, starts_B) -> int:
        """Copy B rows' ids, block table and starts into the static inputs, padding rows after
        them; -> B. Ids or starts that already are the static inputs' first B rows (a
        whole-step graph's next inputs, written there by its last replay) are not copied."""
        b, m = block_table_BM.shape
        if not _is_lead(ids_BS, self.ids_BS, b):
            self.ids_BS[:b].copy_(ids_BS)
        self.ids_BS[b:].zero_()
        # Padding rows: positions 0..S-1 of the scratch page. A real row's columns past m keep
        # an earlier step's page ids: no kernel reads them (a row's positions, start .. start +
        # S - 1, lie in its first m columns: `StepInputs.pages_to`), so only the padding rows
        # are filled, and a full batch runs no fill launch (empty slices launch nothing).
        self.block_table_BM[b:].fill_(self.scratch_page)
        self.block_table_BM[:b, :m].copy_(block_table_BM)
        if not _is_lead(starts_B, self.starts_B, b):
            self.starts_B[:b].copy_(starts_B)
        self.starts_B[b:].zero_()
        return b

    def run(self, ids_BS, block_table_BM, starts_B, hidden_BSD=None, *, n: int = 0):
        """Replay on B <= bs rows (ids_BS [B, S], an MTP depth's hidden_BSD [B, S, D] or chunks'
        [B, n, D]); `n`: chunks' real tokens. -> (logits, hidden)
        of the B rows: [B, S, V] (chunks: [B, 1, V], position n - 1's) and [B, S, D], views of
        the graph's static outputs, valid until its next replay."""
        b = self._load(ids_BS, block_table_BM, starts_B)
        if self.keep_K is not None:
            if not 1 <= n <= self.S:
                raise ValueError(f"chunk of n={n} real tokens in a graph of {self.S}")
            self.keep_K.fill_(n - 1)
        if self.hidden_in_BSD is not None:
            t = hidden_BSD.shape[1]  # S; chunks' n real positions, their padding zero
            self.hidden_in_BSD[:b, :t].copy_(hidden_BSD)
            self.hidden_in_BSD[:b, t:].zero_()
            self.hidden_in_BSD[b:].zero_()
        self._replay()
        return self.logits_BSV[:b], self.hidden_BSD[:b]


def _is_lead(t: torch.Tensor, static: torch.Tensor, b: int) -> bool:
    """Whether `t` is `static`'s first b rows (the same memory, contiguous)."""
    return t.data_ptr() == static.data_ptr() and t.shape[0] == b and t.is_contiguous()
