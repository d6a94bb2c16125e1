"""Model runner: batched forwards over the paged latent cache, CUDA graphs for decode on GPU.

Legend: B sequences in a forward, S new tokens per sequence, T context tokens (cached + new),
M pages per sequence (block table width), N tokens per page, C kv_lora_rank, R rope dims,
H heads, D model width, V vocabulary, L cached layers.

A step's scheduled sequences run as few forwards [B, S] as possible: every row of at most
`pad_max_s` tokens (1 + the drafts a step verifies, at least PAD_MAX_S = 2: a decode, a decode plus
its MTP drafts, a short prefill chunk) runs in ONE forward at the longest such row's S, shorter rows
padded; longer prefill chunks group by exact length. The MTP forward after the step groups the same
way over each row's newly valid positions (1 + its accepted drafts). So a pure-decode MTP step is
one main forward and one MTP forward (one graph replay each) whatever the mix of drafts and
acceptances, plus one MTP forward of one position a row for each draft after the first
(speculative.py). Query s of sequence b sits at position start_b + s with the S new tokens last
in its context, which is exactly what the paged MLA kernel computes.

Why padding is harmless. A padded row of sequence b sits at a position p >= start_b + n_b (n_b its
real tokens) whose KV is not valid: after the step the sequence's num_computed is at most
start_b + n_b (main forward) or exactly start_b + n_b (MTP forward). So
  * no real row reads it: attention is causal, and its own real rows sit before p;
  * its cache write is dead: p is not valid, so the forward that makes p valid (the next step's
    main forward, or the MTP forward right after it) rewrites p in that layer before anything
    reads it; a page holding p is not full-and-computed, so it is never registered or shared;
  * it never touches a page the sequence does not own: `StepInputs.tables_by_id` points the
    block-table columns past a row's own pages at the scratch page (as `StepGraph` does for
    padding rows), so such a p writes and reads scratch. The scheduler allocates nothing extra
    for padding;
  * its outputs are cut off (`lg[j, :n]`), and its inputs (the row's last token repeated; a zero
    hidden row for MTP, whose RMSNorm is zero, not NaN) are finite, so the masked-out reads of p
    by the real rows (weight exactly 0) stay finite.
The real rows compute what they computed unpadded up to rounding (a [B, 2] forward instead of a
[B, 1] one, as any change of batch size already does), so greedy outputs stay those of plain
decoding (tests/unit/test_engine.py). A row's last real position is at most max_model_len - 2 (a
sequence of max_model_len tokens has finished), so its pads reach max_model_len + pad_max_s - 3 at
most: `max_pages`, the block tables' widest, covers that many positions (the columns past
max_model_len's pages point at the scratch page, as every column past a row's own pages does).

Attention over the pages, through the model's KVCache protocol (`moeray.platform.model.mla`;
the views live in `paged_view.py`):
  * GatherPagedView (CPU, and GPU fallback): `update` writes the new latents into their slots and
    gathers each sequence's context into padded [B, T, C] / [B, T, R] with a mask_BST.
  * KernelPagedView (GPU): also offers `attend`, which writes the new latents and runs
    `moeray.kernels.mla_decode.mla_decode_multi` straight over the pages (no gather). The model uses
    it when its MLA calls `cache.attend(...)` (see `attend` for the contract).
CUDA graphs: for decode groups on GPU (S <= pad_max_s: a decode, or a decode plus its drafts) the
runner captures one graph per batch size in `graph_batch_sizes` (a smaller batch is padded up with
rows that write into a scratch page), keyed (bs, S, "main"). With speculative decoding the MTP
forward after each step covers S = 1 + accepted drafts <= pad_max_s positions per row, so it is
captured the same way, keyed (bs, S, "mtp"), with the main model's hidden rows as one more static
input (padding rows zero). With `prefill_graph_tokens`, prefill chunks of up to that many tokens
replay a graph padded to a power-of-two bucket, a step's chunks of one length together (up to
`prefill_graph_seqs` sequences a graph), keyed (bs, S, "chunk") (step_graphs.py says how and why).
Capture needs a forward without host syncs (kernel attention, no `.tolist()` in the MoE); if
capture fails the runner says why in `graph_status` and runs that kind eagerly.

In an expert-parallel gang (`gang` set: `parallel/serve_ep.Lockstep`) every forward, main model
or MTP depth, is agreed with the other ranks first (`gang.before_forward`, a collective: the MTP
module's MoE layer exchanges tokens too): they replay their main decode graphs only together, at
one padded batch (the largest any rank needs), so the MoE exchanges inside have the same shapes on
every rank; graphs are then captured up front, never inside a step. MTP forwards in a gang run
eagerly (no "mtp" graphs: a rank without MTP work would have to replay one in the same round).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from moeray.platform.engine.kv_cache import KVCacheManager, PagedKVStorage
from moeray.platform.engine.paged_view import GatherPagedView, KernelPagedView
from moeray.platform.engine.runner_graphs import PAD_MAX_S, RunnerGraphs
from moeray.platform.engine.scheduler import PENDING, ScheduledSeq
from moeray.platform.engine.spec_step import SPEC_KINDS
from moeray.platform.engine.step_graphs import StepGraph, chunk_buckets
from moeray.platform.engine.step_inputs import StepInputs, known, pad_ids


class Gang(Protocol):
    """The ranks of an expert-parallel gang agreeing on each forward (module docstring)."""

    def before_forward(
        self, B: int, S: int, decode: bool, graph_batch: int, module: int = 0
    ) -> int:
        """Collective: B sequences x S tokens here through `module` (0 the main model, d + 1 MTP
        depth d), `decode` if S <= the runner's pad_max_s, graph_batch the padded batch of this
        rank's captured graph for it (0: none). Returns the padded batch every rank replays, or 0
        (eager)."""
        ...


@dataclass
class ForwardResult:
    """Per scheduled sequence (same order as given): its logits and hidden rows for its tokens."""

    # [num_tokens, V] each (fp32); [1, V], the last token's, for a prefill chunk whose prompt
    # logprobs no one asked for.
    logits: list[torch.Tensor]
    hidden: list[torch.Tensor]  # [num_tokens, D] each


class ModelRunner(RunnerGraphs):
    """Runs the model over scheduled sequences against a PagedKVStorage (its CUDA graphs:
    runner_graphs.py)."""

    def __init__(
        self,
        model,
        kv: KVCacheManager,
        storage: PagedKVStorage,
        *,
        max_model_len: int,
        use_cuda_graphs: bool = True,
        graph_batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
        attention: str = "auto",
        prefill_attention: str = "auto",
        prefill_graph_tokens: int = 0,
        prefill_graph_seqs: int = 1,
        max_chunk_tokens: int | None = None,
        max_decode_tokens: int = PAD_MAX_S,
    ) -> None:
        self.model = model
        self.kv = kv
        self.storage = storage
        self.device = storage.device
        self.page_size = kv.page_size
        # Decode rows up to this many tokens share a padded forward (module docstring): 1 + the
        # drafts a step verifies (`max_decode_tokens`), at least PAD_MAX_S.
        self.pad_max_s = max(PAD_MAX_S, max_decode_tokens)
        # (the padded positions' too: module docstring)
        self.max_pages = -(-(max_model_len + self.pad_max_s - 2) // kv.page_size)
        self.on_gpu = self.device.type == "cuda"
        # "kernel" offers cache.attend (the paged MLA kernel on GPU; its PyTorch reference on CPU),
        # "gather" only cache.update; "auto" is kernel on GPU, gather on CPU (EngineConfig checks
        # both attention settings).
        kernel = attention == "kernel" or (attention == "auto" and self.on_gpu)
        self.view_cls = KernelPagedView if kernel else GatherPagedView
        # Forwards of more than pad_max_s tokens per row (prefill chunks) run MLA's expanded path
        # ("expanded", and "auto"), as vLLM and SGLang prefill: per cached token it up-projects
        # C = 512 latents once for all H heads, where the absorbed path attends in the 576-wide
        # latent space per head (V3: 128 x 576 x 2 FLOPs per query-key pair against 128 x 320 x 2
        # expanded). "absorbed" keeps every forward absorbed. Decode is always absorbed.
        self.prefill_expanded = prefill_attention != "absorbed"
        # Rows that pad a graph batch write into the storage's extra last page, owned by no one.
        self.scratch_page = storage.num_pages - 1 if storage.num_pages > kv.num_pages else None
        self.graph_batch_sizes = sorted(graph_batch_sizes)
        # Keyed by (padded batch size, S, "main", "mtp" or "chunk"); step_graphs.py.
        self.graphs: dict[tuple[int, int, str], StepGraph] = {}
        self.graph_pool: torch.cuda._POOL_HANDLE | None = None  # the graphs' shared memory pool
        self.use_cuda_graphs = bool(
            use_cuda_graphs and self.on_gpu and kernel and self.scratch_page is not None
        )
        # The MTP forward is captured separately: a failed MTP capture leaves the main graphs on.
        self.use_mtp_graphs = self.use_cuda_graphs
        # Prefill chunks up to the largest of these (none past the longest chunk the scheduler
        # makes, `max_chunk_tokens`) replay a chunk graph (step_graphs.py); a failed chunk capture
        # empties it and leaves the decode graphs on.
        buckets = chunk_buckets(prefill_graph_tokens, max_chunk_tokens)
        self.chunk_buckets = buckets if self.use_cuda_graphs else ()
        self.chunk_seqs = prefill_graph_seqs  # the most same-length chunks a chunk graph holds
        self.max_chunk_tokens = max_chunk_tokens or max_model_len
        self.mtp_chunk_graphs = True  # the MTP depth's chunk graphs too (with a drafter)
        # prefill chunks run through a chunk graph, by kind (one replay may carry several)
        self.chunk_graph_replays = {"chunk": 0, "mtp_chunk": 0}
        self._status = {k: "off" for k in ("main", "mtp", "chunk", "mtp_chunk", *SPEC_KINDS)}
        self.attention_calls = {"update": 0, "attend": 0, "expanded": 0}
        self.gang: Gang | None = None  # set by an expert-parallel engine
        self.inputs = StepInputs(kv, self.device, self.max_pages, self.scratch_page)

    # ---- building blocks -----------------------------------------------------------------------
    def _view(self, block_table_BM, starts_B, S, fresh: bool = False):
        expanded = self.prefill_expanded and S > self.pad_max_s
        return self.view_cls(
            self.storage, block_table_BM, starts_B, S, expanded=expanded, fresh=fresh
        )

    def _forward_model(
        self, ids_BS: torch.Tensor, view: GatherPagedView, logits_to_keep: int | torch.Tensor
    ):
        out = self.model(
            ids_BS,
            positions_BS=view.positions_BS,
            cache=view,
            return_mtp=False,
            logits_to_keep=logits_to_keep,
        )
        return out.logits.float(), out.hidden

    def _forward_mtp(
        self,
        mtp_module,
        hidden_BSD: torch.Tensor,
        ids_BS: torch.Tensor,
        view: GatherPagedView,
        logits_to_keep: int | torch.Tensor = 0,
    ):
        hidden, logits = self.model.mtp_step(
            mtp_module,
            hidden_BSD,
            ids_BS,
            view.positions_BS,
            cache=view,
            logits_to_keep=logits_to_keep,
        )
        return logits.float(), hidden

    def forward_group(
        self,
        ids_BS: torch.Tensor,
        block_table_BM: torch.Tensor,
        starts_B: torch.Tensor,
        *,
        mtp_module=None,
        hidden_BSD=None,
        fresh: bool = False,
        logits_to_keep: int = 0,
    ):
        """One forward of B sequences with S new tokens each. With mtp_module, runs that MTP depth
        on (hidden_BSD, ids_BS = the next tokens) instead of the main model. `fresh`: every row
        starts at position 0. `logits_to_keep` > 0: logits of each row's last that many positions
        only (main model). -> (logits, hidden)."""
        B, S = ids_BS.shape
        if mtp_module is not None and (hidden_BSD is None or hidden_BSD.shape[:2] != (B, S)):
            raise ValueError(
                f"MTP forward of ids {tuple(ids_BS.shape)} needs hidden_BSD [B={B}, "
                f"S={S}, D], got {None if hidden_BSD is None else tuple(hidden_BSD.shape)}"
            )
        if self.gang is not None:
            # Main forwards and MTP forwards alike: the MTP depth's MoE layer exchanges tokens
            # with the gang too. MTP forwards run eagerly under a gang (no graph batch voted).
            if mtp_module is None:
                module, captured = 0, self._captured_batch(B, S)
            else:
                module, captured = self._mtp_depth(mtp_module) + 1, 0
            agreed = self.gang.before_forward(B, S, S <= self.pad_max_s, captured, module)
            graph = self.graphs.get((agreed, S, "main")) if mtp_module is None else None
            if graph is not None:
                return graph.run(ids_BS, block_table_BM, starts_B)
        # Decode (S = 1), decode + drafts; for MTP, the last token plus its accepted drafts.
        elif S <= self.pad_max_s and (
            self.use_mtp_graphs if mtp_module is not None else self.use_cuda_graphs
        ):
            graph = self._graph_for(
                B, S, mtp_module, None if hidden_BSD is None else hidden_BSD.dtype
            )
            if graph is not None:
                return graph.run(ids_BS, block_table_BM, starts_B, hidden_BSD)
        view = self._view(block_table_BM, starts_B, S, fresh)
        if mtp_module is None:
            logits, hidden = self._forward_model(ids_BS, view, logits_to_keep)
        else:
            logits, hidden = self._forward_mtp(mtp_module, hidden_BSD, ids_BS, view)
        for k, v in view.calls.items():
            self.attention_calls[k] += v
        return logits, hidden

    def _mtp_depth(self, mtp_module) -> int:
        """The index of `mtp_module` among the model's MTP modules."""
        for d, m in enumerate(getattr(self.model, "mtp", [])):
            if m is mtp_module:
                return d
        raise ValueError("the MTP module is not one of the model's MTP modules")

    # ---- a step --------------------------------------------------------------------------------
    def _groups(self, lengths: Sequence[int]) -> dict[int, list[int]]:
        """Row indices by the S their forward runs at. Rows of at most pad_max_s tokens (decodes
        with or without drafts, MTP steps over their newly valid positions) form ONE group padded
        up to its longest row (see the module docstring); longer rows (prefill chunks) group by
        exact length. Without a scratch page nothing is padded (a padded position could land on a
        page the sequence does not own)."""
        groups: dict[int, list[int]] = {}
        pad = self.scratch_page is not None
        small = [i for i, n in enumerate(lengths) if pad and n <= self.pad_max_s]
        if small:
            groups[max(lengths[i] for i in small)] = small
        for i, n in enumerate(lengths):
            if not (pad and n <= self.pad_max_s):
                groups.setdefault(n, []).append(i)
        return groups

    @torch.inference_mode()
    def execute(
        self, seqs: Sequence[ScheduledSeq], ids_on_device: torch.Tensor | None = None
    ) -> ForwardResult:
        """Main-model forward over the scheduled sequences: chunk graph replays for the prefill
        chunks `_chunk_plan` places, then one forward per group of `_groups` of the rest (so one
        for all decodes), each sequence's logits and hidden rows cut to its own tokens.
        A prefill group (more than pad_max_s tokens per row) that no request reads prompt
        logprobs from computes only its last row's logits: the LM head over a 4K-token chunk at
        V3's vocabulary would write 4096 x 129,280 fp32 logits (2.1 GB) to use one row.
        `ids_on_device` [B] (int64, on the device, one per sequence in seqs' order): the input
        id of each one-token decode whose `input_ids` is (PENDING,) (async scheduling: the
        previous step's sampled id, not read back); the other sequences' entries are unread and
        their `input_ids` go up from the host."""
        pending = [i for i, s in enumerate(seqs) if PENDING in s.input_ids]
        pending_set = set(pending)
        if pending and (
            ids_on_device is None
            or ids_on_device.shape != (len(seqs),)
            or any(seqs[i].input_ids != (PENDING,) for i in pending)
        ):
            shape = None if ids_on_device is None else tuple(ids_on_device.shape)
            raise ValueError(
                f"ids_on_device {shape} for {len(seqs)} sequences, {len(pending)} of them "
                "one-token decodes of a pending id: expected one id per sequence, and a pending "
                "id only as a decode's one input"
            )
        logits: list = [None] * len(seqs)
        hidden: list = [None] * len(seqs)
        # prompt logprobs read every row's logits; a chunk graph keeps each chunk's last one's
        chunks = [
            None if s.request.needs_prompt_logprobs else (s.num_tokens, s.start) for s in seqs
        ]
        for graph, idx in self._chunk_plan(chunks):
            group = [seqs[i] for i in idx]
            outs = self._replay_chunks(
                graph,
                [s.request.request_id for s in group],
                [s.start for s in group],
                [s.input_ids for s in group],
            )
            for i, (lg, hd) in zip(idx, outs, strict=True):
                logits[i], hidden[i] = lg, hd
        rest = [i for i in range(len(seqs)) if logits[i] is None]
        for S, in_rest in self._groups([seqs[i].num_tokens for i in rest]).items():
            idx = [rest[k] for k in in_rest]
            group = [seqs[i] for i in idx]
            ids, starts = self.inputs.ids_and_starts(
                [pad_ids(known(s.input_ids), S) for s in group], [s.start for s in group]
            )
            rows = [j for j, i in enumerate(idx) if i in pending_set]
            if rows:
                assert ids_on_device is not None  # (checked above)
                if len(rows) == len(seqs):  # every sequence a pending decode: the ids as they are
                    ids = ids_on_device.view(-1, 1)
                else:  # pending ids into their rows' first column, the rest from the host
                    to, fro = (
                        self.inputs.device_index(rows),
                        self.inputs.device_index([idx[j] for j in rows]),
                    )
                    ids[to, 0] = ids_on_device[fro]
            bt = self.inputs.tables_by_id(
                [s.request.request_id for s in group],
                self.inputs.pages_to(max(s.start for s in group) + S),
            )
            keep = 0
            if S > self.pad_max_s and not any(s.request.needs_prompt_logprobs for s in group):
                keep = 1  # rows of a group have S real tokens: the last row is each one's last
            fresh = all(s.start == 0 for s in group)
            lg, hd = self.forward_group(ids, bt, starts, fresh=fresh, logits_to_keep=keep)
            for j, i in enumerate(idx):
                n = seqs[i].num_tokens
                logits[i] = lg[j, -1:] if keep else lg[j, :n]
                hidden[i] = hd[j, :n]
        return ForwardResult(logits, hidden)

    @torch.inference_mode()
    def execute_mtp(
        self, mtp_module, items: Sequence[tuple[str, int, torch.Tensor, list[int] | torch.Tensor]]
    ):
        """MTP forwards: items = (request_id, start, hidden_SD, next_ids) with S = len(next_ids)
        positions from start (next_ids a list, or a tensor of S ids on the device: the drafts of
        speculative.MTPDrafter, never padded). Returns per item (hidden_SD, logits_SV) of its
        S positions, run in the groups of `_groups` like execute (padded rows get zero hidden
        rows); a prefill chunk that replays its bucket's MTP chunk graph gets the logits of its
        last position only ([1, V]: the draft's)."""
        for rid, _start, h_SD, next_ids in items:
            if h_SD.shape[0] != len(next_ids):
                raise ValueError(
                    f"MTP item {rid!r}: {h_SD.shape[0]} hidden rows for {len(next_ids)} next tokens"
                )
        results: list = [None] * len(items)
        plan = self._chunk_plan([(len(it[3]), it[1]) for it in items], mtp_module)
        for graph, idx in plan:
            group = [items[i] for i in idx]
            outs = self._replay_chunks(
                graph,
                [g[0] for g in group],
                [g[1] for g in group],
                [g[3] for g in group],
                [g[2] for g in group],
            )
            for i, (lg, hd) in zip(idx, outs, strict=True):
                results[i] = (hd, lg)
        rest = [i for i in range(len(items)) if results[i] is None]
        for S, in_rest in self._groups([len(items[i][3]) for i in rest]).items():
            idx = [rest[k] for k in in_rest]
            rows = [items[i] for i in idx]
            host = [[0] * S if isinstance(r[3], torch.Tensor) else r[3] for r in rows]
            ids, starts = self.inputs.ids_and_starts(
                [pad_ids(t, S) for t in host], [r[1] for r in rows]
            )
            dev = [(j, r[3]) for j, r in enumerate(rows) if isinstance(r[3], torch.Tensor)]
            if dev:  # (of S ids each: `chain`'s rows are never padded)
                ids[self.inputs.device_index([j for j, _t in dev])] = torch.stack(
                    [t for _j, t in dev]
                )
            hid = torch.stack(
                [
                    r[2]
                    if r[2].shape[0] == S
                    else torch.cat([r[2], r[2].new_zeros(S - r[2].shape[0], r[2].shape[1])])
                    for r in rows
                ]
            )
            bt = self.inputs.tables_by_id(
                [r[0] for r in rows], self.inputs.pages_to(max(r[1] for r in rows) + S)
            )
            lg, hd = self.forward_group(ids, bt, starts, mtp_module=mtp_module, hidden_BSD=hid)
            for j, i in enumerate(idx):
                n = len(items[i][3])
                results[i] = (hd[j, :n], lg[j, :n])
        return results
