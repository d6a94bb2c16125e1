"""The model runner's CUDA graphs (engine/runner.py's ModelRunner inherits this): which graphs it
holds, keyed (padded batch size, S, kind), how they are captured (up front by `capture_graphs`, or
on first use for decode groups), which one a forward replays, and their status.

Kinds (step_graphs.py says how each is captured): "main" and "mtp" for decode groups of S <=
pad_max_s tokens a row (1 + the drafts a step verifies, at least PAD_MAX_S), "chunk" and "mtp_chunk"
for prefill chunks padded to a bucket, and "spec" for a whole greedy MTP step under async scheduling
(spec_step.py's SpecGraph, S = pad_max_s; opt-in "spec_sampled" and "spec_top_p" for sampled ones).
A failed capture turns its kind off with the reason in `graph_status`; those forwards then run
eagerly (a failed whole-step capture: its steps as two graph replays).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any

import torch

from moeray.platform.engine.spec_step import SPEC_KINDS, SpecGraph
from moeray.platform.engine.step_graphs import StepGraph, chunk_graph_shapes, chunk_replay_plan
from moeray.platform.engine.step_inputs import StepInputs, pad_ids

logger = logging.getLogger(__name__)

# Rows of up to this many tokens share one padded forward at least: 1 + one MTP draft (with more
# drafts, 1 + their number: `ModelRunner.pad_max_s`; runner.py's module docstring says why padding
# is harmless).
PAD_MAX_S = 2


class RunnerGraphs:
    """The CUDA-graph half of ModelRunner: its methods read the runner's state set in
    `ModelRunner.__init__` (declared here for the type checker)."""

    device: torch.device
    model: Any
    storage: Any
    max_pages: int
    pad_max_s: int
    page_size: int
    scratch_page: int | None
    graph_pool: Any
    graphs: dict[tuple[int, int, str], StepGraph]
    graph_batch_sizes: list[int]
    use_cuda_graphs: bool
    use_mtp_graphs: bool
    chunk_buckets: tuple[int, ...]
    chunk_seqs: int
    max_chunk_tokens: int
    mtp_chunk_graphs: bool
    chunk_graph_replays: dict[str, int]
    _status: dict[str, str]
    gang: Any
    inputs: StepInputs
    _forward_model: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    _forward_mtp: Callable[..., tuple[torch.Tensor, torch.Tensor]]

    @property
    def graph_status(self) -> str:
        """ "off", "captured" (every graph kind used so far captured), or "disabled: <why>" when
        the main forward could not be captured; a failure of another kind alone reads
        "captured; <kind> disabled: <why>" (kinds mtp, chunk, mtp_chunk and SPEC_KINDS)."""
        main = self._status["main"]
        if main.startswith("disabled"):
            return main
        for kind in ("mtp", "chunk", "mtp_chunk", *SPEC_KINDS):
            if self._status[kind].startswith("disabled"):
                main += f"; {kind} {self._status[kind]}"
        return main

    def _captured_batch(self, B: int, S: int) -> int:
        """The padded batch of the captured main graph that runs B x S, 0 if there is none."""
        if not self.use_cuda_graphs or S > self.pad_max_s or B > self.graph_batch_sizes[-1]:
            return 0
        bs = next(b for b in self.graph_batch_sizes if b >= B)
        return bs if (bs, S, "main") in self.graphs else 0

    def run_padding(self, bs: int, S: int) -> bool:
        """Replay the main graph (bs, S) with padding rows only (a gang rank without work, keeping
        its peers' collectives company); False if it was not captured."""
        graph = self.graphs.get((bs, S, "main"))
        if graph is None:
            return False
        dev = self.device
        graph.run(
            torch.zeros(0, S, dtype=torch.long, device=dev),
            torch.zeros(0, 1, dtype=torch.int32, device=dev),
            torch.zeros(0, dtype=torch.long, device=dev),
        )
        return True

    @torch.inference_mode()
    def recapture(self) -> int:
        """Drop the main-model and prefill-chunk graphs and capture the same ones again: after the
        model's weights were replaced (an expert placement switch: the graphs read the old
        tensors' memory). Returns the number of graphs held."""
        keys = sorted(k for k in self.graphs if k[2] in ("main", "chunk", *SPEC_KINDS))
        spec = {
            k: (g.depth, g.hidden_dtype) for k, g in self.graphs.items() if isinstance(g, SpecGraph)
        }  # (the kind is the key's)
        self.graphs = {k: g for k, g in self.graphs.items() if k[2] == "mtp"}
        for bs, S, kind in keys:
            if kind == "chunk":
                self._chunk_graph(bs, S)
            elif kind in SPEC_KINDS:
                self._captured((bs, S, kind), *spec[(bs, S, kind)])
            else:
                self._graph_for(bs, S)
        return len(self.graphs)

    def spec_graph(self, B: int, kind: str = "spec") -> SpecGraph | None:
        """The captured whole-step graph of `kind` (SPEC_KINDS) that runs an MTP step of B rows,
        None if there is none (captured by `capture_graphs` with `spec`, at start only)."""
        if not self.use_mtp_graphs or B > self.graph_batch_sizes[-1]:
            return None
        bs = next(b for b in self.graph_batch_sizes if b >= B)
        graph = self.graphs.get((bs, self.pad_max_s, kind))
        return graph if isinstance(graph, SpecGraph) else None

    def _chunk_graph(
        self, bs: int, S: int, mtp_module=None, hidden_dtype: torch.dtype | None = None
    ) -> StepGraph | None:
        """The prefill-chunk graph of bs sequences in bucket S (with `mtp_module`, that MTP
        depth's), captured now if it is not yet; None if its capture fails, which turns that kind
        off (the reason in graph_status)."""
        kind = "chunk" if mtp_module is None else "mtp_chunk"
        graph = self._captured((bs, S, kind), mtp_module, hidden_dtype)
        if graph is None:
            if mtp_module is None:
                self.chunk_buckets = ()
            self.mtp_chunk_graphs = False
        return graph

    def _captured(self, key, mtp_module, hidden_dtype) -> StepGraph | None:
        """The graph of `key` = (bs, S, kind), captured now if it is not yet; None if its capture
        fails, the kind's status then saying why (capture is an optimization: the caller turns
        the graphs that failed off and those forwards run eagerly)."""
        graph = self.graphs.get(key)
        if graph is None:
            bs, S, kind = key
            try:
                if kind in SPEC_KINDS:
                    graph = SpecGraph(self, bs, mtp_module, hidden_dtype, kind, S)
                else:
                    chunk = kind in ("chunk", "mtp_chunk")
                    graph = StepGraph(self, bs, S, mtp_module, hidden_dtype, chunk=chunk)
            except Exception as e:
                logger.warning("%s graph %s not captured:\n%s", kind, key, traceback.format_exc())
                self._status[kind] = f"disabled: {type(e).__name__}: {e}"
                return None
            self.graphs[key] = graph
            self._status[kind] = "captured"
        return graph

    def _graph_for(self, B: int, S: int, mtp_module=None, hidden_dtype: torch.dtype | None = None):
        if B > self.graph_batch_sizes[-1]:
            return None
        bs = next(b for b in self.graph_batch_sizes if b >= B)
        kind = "main" if mtp_module is None else "mtp"
        key = (bs, S, kind)
        graph = self.graphs.get(key)
        if graph is not None and graph.mtp_module is not mtp_module:
            raise ValueError(
                f"graph {key} was captured for another MTP module: one drafter depth per runner"
            )
        graph = self._captured(key, mtp_module, hidden_dtype)
        if graph is None:
            if kind == "main":
                self.use_cuda_graphs = False
            self.use_mtp_graphs = False
        return graph

    @torch.inference_mode()  # as in execute: with grad on, MoE takes its training path, which syncs
    def capture_graphs(
        self,
        max_batch: int,
        mtp_module=None,
        hidden_dtype: torch.dtype | None = None,
        *,
        decode: bool = True,
        spec: tuple[str, ...] = (),
    ) -> int:
        """Capture every decode graph a step can replay, now: each padded batch size up to the one
        that holds `max_batch` rows, S = 1 to pad_max_s, the main model and (with `mtp_module`) the
        MTP depth. Captured lazily instead, a batch that shrank or grew into a new size paid for the
        capture (and Triton's compiles for its shapes) inside a step: MTP at batch 16 ran at 0.31x
        of plain decoding so, capturing its shrinking tail (benchmarks/notes-engine.md). Returns the
        number of graphs held; 0 without graphs. Runs in inference mode: with grad on, the MoE takes
        its per-expert training loop, which reads counts back to the host, and every capture fails
        ("called a synchronizing CUDA operation"). Then the prefill-chunk graphs (none unless
        prefill_graph_tokens: `step_graphs.chunk_graph_shapes`, at most as many sequences as the
        padded max_batch), and with `mtp_module` its MTP depth's. `decode` False: the chunk graphs
        only (a P/D prefill replica, whose requests end at their first token). `spec` (with
        `mtp_module`): the kinds of whole-step graph (SPEC_KINDS) to capture at each size for MTP
        steps under async scheduling."""
        if not self.use_cuda_graphs:
            return 0
        sizes = [b for b in self.graph_batch_sizes if b < max_batch]
        sizes += [b for b in self.graph_batch_sizes if b >= max_batch][:1]
        # a step holds at most max_batch chunks: no chunk graph past the padded batch of them
        chunk_seqs = min(self.chunk_seqs, sizes[-1])
        for bs in sizes if decode else ():
            for S in range(1, self.pad_max_s + 1):
                if not self.use_cuda_graphs:
                    return len(self.graphs)  # one failed capture says why; a try costs 2 forwards
                self._graph_for(bs, S)
                if mtp_module is not None and self.use_mtp_graphs:
                    self._graph_for(bs, S, mtp_module, hidden_dtype)
            for kind in spec if mtp_module is not None else ():
                # one failure of a kind says why: the kind's later sizes are not tried
                if self.use_mtp_graphs and not self._status[kind].startswith("disabled"):
                    self._captured((bs, self.pad_max_s, kind), mtp_module, hidden_dtype)
        shapes = chunk_graph_shapes(
            self.chunk_buckets, self.graph_batch_sizes, chunk_seqs, self.max_chunk_tokens
        )
        for bs, S in shapes:
            if self.use_cuda_graphs and self.chunk_buckets:
                self._chunk_graph(bs, S)
        for bs, S in shapes if mtp_module is not None else ():
            if self.use_mtp_graphs and self.mtp_chunk_graphs:
                self._chunk_graph(bs, S, mtp_module, hidden_dtype)
        return len(self.graphs)

    def _chunk_plan(self, chunks, mtp_module=None) -> list[tuple[StepGraph, list[int]]]:
        """The chunk graph replays of a step (with `mtp_module`, its MTP depth's graphs):
        `chunks` one (n, start) per item or None (it may not replay) -> [(graph, item indices)]
        (`step_graphs.chunk_replay_plan`: same-length chunks of more than pad_max_s tokens
        together, each in the smallest bucket that holds them with its padded positions inside
        max_model_len); the items in none run eagerly. None in an expert-parallel gang, whose
        ranks agree on every forward's shape. Chunk graphs are captured by `capture_graphs`
        only, never inside a step (where async scheduling's work in flight would run beside the
        capture)."""
        chunks = [c if c is None or c[0] > self.pad_max_s else None for c in chunks]
        if not (self.chunk_buckets and self.gang is None) or chunks.count(None) == len(chunks):
            return []  # (a decode-only step returns here, before the graphs are looked at)
        if mtp_module is None:
            kind, ok = "chunk", self.use_cuda_graphs
        else:
            kind, ok = "mtp_chunk", self.use_mtp_graphs and self.mtp_chunk_graphs
        batches: dict[int, list[int]] = {}
        for (bs, S, k), graph in sorted(self.graphs.items()) if ok else ():
            if k == kind and graph.mtp_module is mtp_module:
                batches.setdefault(S, []).append(bs)
        max_positions = self.max_pages * self.page_size
        plan = chunk_replay_plan(chunks, self.chunk_buckets, max_positions, batches)
        return [(self.graphs[(bs, S, kind)], idx) for bs, S, idx in plan]

    def _replay_chunks(self, graph: StepGraph, request_ids, starts, ids, hidden=None):
        """Chunks of one length n through `graph`, one a row (`hidden` [n, D] each: an MTP
        depth's input) -> per chunk (logits [1, V] of its last token, hidden [n, D]), copies
        (another group of this step may replay the same graph)."""
        n, S = len(ids[0]), graph.S
        ids_BS, starts_B = self.inputs.ids_and_starts([pad_ids(t, S) for t in ids], starts)
        bt = self.inputs.tables_by_id(request_ids, self.inputs.pages_to(max(starts) + S))
        hid = None if hidden is None else torch.stack(hidden)
        lg, hd = graph.run(ids_BS, bt, starts_B, hid, n=n)
        self.chunk_graph_replays["chunk" if hidden is None else "mtp_chunk"] += len(ids)
        return [(lg[j].clone(), hd[j, :n].clone()) for j in range(len(ids))]
