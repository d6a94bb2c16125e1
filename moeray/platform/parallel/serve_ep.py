"""Expert parallelism for serving: one plain model per rank, made expert-parallel from outside,
and the lockstep that keeps the ranks' collectives lined up.

Each rank of an EP gang runs its own engine (its own requests, scheduler and paged latent cache:
data-parallel attention); only the MoE layers talk to the other ranks, dispatching tokens to the
ranks that hold their experts and combining them back with all-to-all (`parallel/expert.py`).
Every MoE all-to-all is a collective, so every rank must run the same number of model forwards in
the same order, whatever its own batch holds; the MTP modules hold MoE layers too (speculative
decoding), so their forwards count as well. `Lockstep` does that in rounds: before each real
forward the runner calls `Lockstep.before_forward`, which joins a small max-all-reduce voting
[has work, -ready] and, for the module it forwards (the main model, or MTP depth d), [forwarding,
its exchange's sizes]; a rank that has run all forwards of its step joins the same all-reduce
voting for no module and, while some rank forwards, runs an empty forward (no tokens of its own,
which still takes part in every MoE exchange: a padded graph replay when the peers replay theirs;
an MTP depth over zero rows, eagerly). Each round forwards ONE module, the first that some rank
votes for (main before MTP); a rank that voted for another (its MTP forward while a peer still runs
a main one) runs an empty forward of the round's module and votes again. A rank runs its main
forwards of a step before its MTP forwards, so every round runs a real forward until none is
left. A round where no rank forwards ends the step on every rank at once; "has work" then says
whether any rank still has requests, and -ready (negated back) is the lowest placement version
staged on every rank, which the ranks switch to together before the next step
(`parallel/serve_placement.py`).

Two exchanges, chosen per forward by `choose_exchange` (the same answer on every rank, from the
round that precedes the forward):
  * all-to-all (`parallel/expert.py`): each (token, expert) row goes to the rank of its slot only.
    Receive sizes depend on the routing (read back to the host), so it cannot be captured in a
    CUDA graph. Prefill chunks take it (at ep > 1).
  * gather (`ServingEPMoE._gathered`): every rank pads its rows to a size the gang agreed on,
    all-gathers rows plus routing (top-k expert ids and weights; the router is replicated, so each
    rank routes its own rows), computes the pairs of all gathered rows that fall on its own slots
    and reduce-scatters (sums) the partial outputs back to the rows' ranks. A pair whose expert has
    several replicas goes to replica (gathered row index) mod (replica count), a rule every rank
    applies alike, so exactly one replica computes it. Shapes depend only on the agreed size, so a
    decode forward runs as a captured graph (`ModelRunner`, keyed by that size). Each rank receives
    ep x rows x D where all-to-all moves K x rows x D in all, so it is for decode sizes: decode
    forwards take it when every rank replays a graph ("auto"), always ("gather", for tests on CPU)
    or never ("all_to_all"). At ep=1 ("auto", "gather") with every expert in its own slot such a
    forward is the plain MoE layer's plus a load count (`ServingEPMoE.forward`), so `--ep 1`
    computes what the plain engine does.
A round carries [has work, -ready] then, per module, [forwarding, prefill, rows, graph batch, S,
-S, no graph] (a rank fills only the module it forwards) and is reduced with MAX: "any rank" for
the flags, the largest rows and graph batch, S's spread, and max(-v) = -min(v) for the versions.
MTP forwards under EP are never graph replays (no graph batch): they run eagerly, gathered in
"gather" mode, else all-to-all.

Costs: one small all-reduce per forward plus one per step (decode: two per step, three with MTP;
none at ep=1, where a rank's vote is the round); a gathered forward: one all-gather and one
reduce-scatter per MoE layer (none at ep=1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moeray.kernels.expert_load import count_expert_load
from moeray.kernels.gate import Routing
from moeray.platform.config import DECODE_EXCHANGES
from moeray.platform.model.moe import MoE
from moeray.platform.model.mtp import MTPModule
from moeray.platform.model.quant import set_fp8_expert_weight
from moeray.platform.model.transformer import Transformer
from moeray.platform.parallel.expert import (
    ExpertParallelMoE,
    all_to_all,
    combine,
    dispatch,
    enable_expert_parallel,
)
from moeray.platform.placement import to_physical


@dataclass(frozen=True)
class ExpertStack:
    """One projection of n experts stacked: weight [n, N, K] in the activation dtype, or e4m3 with
    its 128x128 block scales scale_inv [n, ceil(N/128), ceil(K/128)] (FP8-stored experts, as the
    official checkpoint keeps them: the scales move with the weights)."""

    weight: torch.Tensor
    scale_inv: torch.Tensor | None = None


ExpertStacks = tuple[ExpertStack, ExpertStack, ExpertStack]  # gate_proj, up_proj, down_proj

# The flat-tensor all-gather and reduce-scatter of the gathered exchange, on gloo as on NCCL (gloo
# runs both on torch 2.13). torch 2.13 renamed them (the old names warn); the GPU machines run 2.11.
_all_gather_flat = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def check_decode_exchange(mode: str) -> None:
    if mode not in DECODE_EXCHANGES:
        raise ValueError(f"decode_exchange={mode!r}: accepted {', '.join(DECODE_EXCHANGES)}")


class GatherState:
    """What a rank's MoE layers read in a gathered forward, set before each forward by its
    Lockstep (one object shared by all layers): `on` (this forward gathers), `rows` (each rank's
    rows in the all-gather: this rank's forward is padded up to it; 0 = its own row count, as when
    capturing) and valid_1 (a static device tensor: this rank's first valid_1 rows are real, the
    rest padding; captured graphs read it, so it is filled in place, never replaced)."""

    def __init__(self, device: torch.device) -> None:
        self.on = False
        self.rows = 0
        self.valid_1 = torch.zeros(1, dtype=torch.int64, device=device)

    def set(self, on: bool, rows: int, valid: int) -> None:
        self.on, self.rows = on, rows
        self.valid_1.fill_(valid)


class ServingEPMoE(ExpertParallelMoE):
    """The serving MoE layer: the routing weight of each (token, expert) row travels with it and
    the expert applies it, as the single-device fused MoE does (each row weighted and rounded to
    the activation dtype, then a token's K rows summed in fp32), so a bf16 EP forward rounds
    where the single-device one does. Greedy bf16 decodes of small() (32 requests x 64 tokens,
    random weights, H200, ep=1) equal the plain engine's in 31 of 32 requests this way, against 5
    of 32 when weighting after the exchange (the training layer, whose routing-weight gradient
    flows through combine).

    `load_E` sums the tokens this rank routed to each (global) expert since it was built: the
    per-expert load a placement policy reads (platform/placement.py).

    Redundant experts: the layer runs over P physical slots, S = P / ep_size per rank (slot p on
    rank p // S), each holding one logical expert (`phy2log_P`). Routing stays logical; then
    `placement.to_physical` spreads each expert's tokens over its replicas by token order, and the
    dispatch sends rows to the slots' ranks. Replicas hold identical weights, so the output does
    not depend on which replica computed a row. Built with the identity map (P = E, expert e in
    slot e: the contiguous shard the rank loader reads); `set_placement` swaps in another
    (`parallel/serve_placement.py`)."""

    load_E: torch.Tensor
    rows_computed: torch.Tensor

    def __init__(self, moe, group, ep_rank: int, ep_size: int) -> None:
        super().__init__(moe, group, ep_rank, ep_size)
        E = self.num_global_experts
        device = self.gate.weight.device
        self.register_buffer("load_E", torch.zeros(E, dtype=torch.int64, device=device), False)
        self.num_slots = E
        self.phy2log_P = torch.arange(E)
        # None while the map is the identity: routing ids are slot ids, to_physical is skipped.
        self.log2phy_ER: torch.Tensor | None = None
        self.logcnt_E: torch.Tensor | None = None
        # (token, expert) rows this rank's experts ran (its measured load); a device counter, so
        # a captured decode graph counts its replays too.
        self.register_buffer(
            "rows_computed", torch.zeros((), dtype=torch.int64, device=device), False
        )
        self.gather: GatherState | None = None  # set by parallelize_for_serving

    def held_experts(self) -> list[int]:
        """The logical expert of each slot this rank holds, in slot order."""
        S = self.num_slots // self.ep_size
        return self.phy2log_P[self.ep_rank * S : (self.ep_rank + 1) * S].tolist()

    def set_placement(
        self,
        phy2log_P: torch.Tensor,
        log2phy_ER: torch.Tensor,
        logcnt_E: torch.Tensor,
        weights: ExpertStacks,
    ) -> None:
        """Swap in a new slot map and this rank's stacked (gate, up, down) slot weights (e4m3
        ones with their block scales). Only between forwards: every rank of the gang must switch
        before the same forward."""
        P = phy2log_P.numel()
        n = weights[0].weight.shape[0]
        if P % self.ep_size or n != P // self.ep_size:
            raise ValueError(f"{P} slots over ep={self.ep_size} ranks, but {n} slot weights")
        device = self.gate.weight.device
        for name, stack in zip(("gate_proj", "up_proj", "down_proj"), weights, strict=True):
            if stack.scale_inv is not None:
                set_fp8_expert_weight(self.experts, name, stack.weight, stack.scale_inv)
            else:
                setattr(self.experts, name, nn.Parameter(stack.weight, requires_grad=False))
        self.experts.num_experts = P // self.ep_size
        self.num_slots = P
        self.phy2log_P = phy2log_P.cpu()
        identity = P == self.num_global_experts and bool((self.phy2log_P == torch.arange(P)).all())
        self.log2phy_ER = None if identity else log2phy_ER.to(device)
        self.logcnt_E = None if identity else logcnt_E.to(device)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        g = self.gather
        if g is not None and g.on and self.ep_size == 1 and self.log2phy_ER is None:
            # Alone with every expert in its own slot: the plain MoE layer's forward (padding
            # rows computed and dropped, as the plain engine's graphs do) plus one launch that
            # counts the valid rows' loads. `--ep 1` is held to the plain engine's decode tokens/s
            # (issue 17: within 5%).
            y_BSD = MoE.forward(self, x_BSD)
            assert self.last_routing is not None  # set by MoE.forward
            ids_TK = self.last_routing.expert_ids_TK
            count_expert_load(ids_TK, g.valid_1, self.load_E, self.rows_computed)
            return y_BSD
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        r = self.route(x_TD)
        if g is not None and g.on:
            y_TD = self._gathered(x_TD, r, g)
        else:
            y_TD = self._all_to_all(x_TD, r)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view_as(x_BSD)

    def _all_to_all(self, x_TD: torch.Tensor, r: Routing) -> torch.Tensor:
        self.load_E += r.counts_E
        slots_TK = r.expert_ids_TK
        if self.log2phy_ER is not None and self.logcnt_E is not None:
            slots_TK = to_physical(slots_TK, self.log2phy_ER, self.logcnt_E)
        x_RD, local_R, plan = dispatch(x_TD, slots_TK, self.num_slots, self.group)
        self.rows_computed += sum(plan.recv_counts)
        w_A = r.weights_TK.reshape(-1)[plan.order_A].float().contiguous()
        w_R = all_to_all(w_A, plan.recv_counts, plan.send_counts, self.group)
        y_RD = self.experts(x_RD, local_R[:, None], w_R[:, None]) if local_R.numel() else x_RD
        return combine(y_RD, torch.ones_like(r.weights_TK), plan, self.group)

    def _gathered(self, x_TD: torch.Tensor, r: Routing, g: GatherState) -> torch.Tensor:
        """The fixed-size exchange (module docstring), with no host sync: capturable. Legend
        here: G = ep x rows gathered rows, rank-major. At ep=1 the collectives are identities and
        are skipped: every launch counts in a decode step (`--ep 1` is held to the plain engine's
        tokens/s)."""
        T, K = r.expert_ids_TK.shape
        rows = max(T, g.rows)
        valid_T = torch.arange(rows, device=x_TD.device) < g.valid_1
        ids_TK, w_TK = r.expert_ids_TK, r.weights_TK.float()
        if rows > T:  # eager only: a graph's forward has the agreed rows already
            x_TD, ids_TK, w_TK = (F.pad(t, (0, 0, 0, rows - T)) for t in (x_TD, ids_TK, w_TK))
        ids_TK = torch.where(valid_T[:, None], ids_TK, -1)  # -1: padding, nothing to compute
        counted_A = valid_T[:, None].expand(rows, K).flatten().long()
        self.load_E.scatter_add_(0, ids_TK.clamp(min=0).flatten(), counted_A)
        if self.ep_size > 1:
            x_GD, ids_GK, w_GK = all_gather_rows([x_TD, ids_TK.int(), w_TK], self.group)
            ids_GK = ids_GK.long()
        else:
            x_GD, ids_GK, w_GK = x_TD, ids_TK, w_TK
        slots_GK = ids_GK
        if self.log2phy_ER is not None and self.logcnt_E is not None:
            e_GK = ids_GK.clamp(min=0)
            row_G1 = torch.arange(ids_GK.shape[0], device=x_TD.device)[:, None]
            replica_GK = row_G1 % self.logcnt_E[e_GK]
            slots_GK = torch.where(ids_GK >= 0, self.log2phy_ER[e_GK, replica_GK], -1)
        S = self.num_slots // self.ep_size
        local_GK = slots_GK - self.ep_rank * S
        mine_GK = (slots_GK >= 0) & (local_GK >= 0) & (local_GK < S)
        self.rows_computed += mine_GK.sum()
        # Pairs of other ranks' slots (and padding) get id -1, which the experts skip.
        y_GD = self.experts(x_GD, torch.where(mine_GK, local_GK, -1), w_GK)
        if self.ep_size == 1:
            return y_GD[:T]
        # Partials summed in fp32, as the fused single-device MoE sums a token's K rows (a bf16
        # sum would round once per rank).
        y_rows_D = torch.empty(rows, y_GD.shape[1], dtype=torch.float32, device=y_GD.device)
        _reduce_scatter_flat(y_rows_D, y_GD.float().contiguous(), group=self.group)
        return y_rows_D[:T].to(y_GD.dtype)


def all_gather_rows(parts: list[torch.Tensor], group=None) -> list[torch.Tensor]:
    """All-gather 2-d tensors of one row count and any dtypes in ONE collective (sent as bytes, one
    launch per MoE layer instead of three): each part [rows, n] -> [ep x rows, n], rank-major."""
    world = dist.get_world_size(group)
    rows = parts[0].shape[0]
    bytes_ = [p.contiguous().view(torch.uint8).reshape(rows, -1) for p in parts]
    widths = [b.shape[1] for b in bytes_]
    send = torch.cat(bytes_, dim=1)
    recv = send.new_empty(world * rows, send.shape[1])
    _all_gather_flat(recv, send, group=group)
    out = []
    for p, chunk in zip(parts, recv.split(widths, dim=1), strict=True):
        out.append(chunk.contiguous().view(p.dtype).reshape(world * rows, *p.shape[1:]))
    return out


@dataclass(frozen=True)
class Round:
    """One lockstep round, reduced over the gang (module docstring); the same on every rank. The
    forward fields describe the forwards of `module` only (the first module some rank forwards)."""

    forwarding: int  # 1 if any rank is about to run a real forward
    busy: int  # 1 if any rank has unfinished requests
    ready: int  # the newest placement version every rank has staged
    prefill: int = 0  # 1 if some rank's forward has more tokens per row than a decode's
    rows: int = 0  # the most rows (B x S) of any rank's forward
    graph_batch: int = 0  # the largest padded batch of a forwarding rank's decode graph
    s_max: int = 0  # the largest S of the forwarding ranks
    s_min: int = 0  # the smallest S of the forwarding ranks
    no_graph: int = 0  # 1 if some forwarding rank has no captured graph for its forward
    module: int = 0  # what this round forwards: 0 the main model, d + 1 the MTP depth d


_NO_S = 1 << 30  # the -S entry of a rank that does not forward: never the maximum


@dataclass(frozen=True)
class Exchange:
    """How the MoE layers of one forward exchange tokens: all-to-all (gather False), or gathered
    at `rows` rows per rank; graph_batch > 0: every rank replays its decode graph for that many
    sequences of `tokens` tokens (rows = graph_batch x tokens)."""

    gather: bool = False
    rows: int = 0
    graph_batch: int = 0
    tokens: int = 0


def choose_exchange(r: Round, mode: str, world: int) -> Exchange:
    """The one place that picks a forward's exchange, from the round before it (so every rank picks
    the same). Decode forwards: a graph replay when every forwarding rank holds the graph for its
    batch and all run the same S (graphs are keyed by S), gathered at the largest padded batch;
    otherwise eager, gathered at the most rows ("gather" mode) or all-to-all. A prefill chunk on
    any rank: all-to-all, except at ep=1 (nothing to exchange: the gathered path skips its
    collectives and is the plain MoE, where all-to-all would still sort, count and copy rows)."""
    if mode == "all_to_all":
        return Exchange()
    if r.prefill:
        return Exchange(True, r.rows) if world == 1 else Exchange()
    if not r.no_graph and r.graph_batch > 0 and r.s_max == r.s_min:
        return Exchange(True, r.graph_batch * r.s_max, r.graph_batch, r.s_max)
    if mode == "gather" or world == 1:
        return Exchange(True, r.rows)
    return Exchange()


def expert_loads(model: nn.Module) -> list[list[int]]:
    """Tokens this rank routed to each expert, per MoE layer (ServingEPMoE.load_E), in layer
    order."""
    return [m.load_E.tolist() for m in model.modules() if isinstance(m, ServingEPMoE)]


def rows_computed(model: nn.Module) -> list[int]:
    """(token, expert) rows this rank's experts computed since it was built, per MoE layer."""
    return [int(m.rows_computed) for m in model.modules() if isinstance(m, ServingEPMoE)]


class Lockstep:
    """Keeps the model forwards of a gang's ranks in step and picks their exchange (module
    docstring). The runner calls `before_forward` before each forward, of the main model
    (module 0) or of MTP depth d (module d + 1) (`ModelRunner.gang`); the engine sets
    `replay_padding` (replays a main-model decode graph with padding rows only, False if there is
    none) so that an empty forward replays when its peers do. Empty MTP forwards always run
    eagerly: MTP forwards under EP are not captured (the runner runs them eagerly)."""

    def __init__(self, model: Transformer, group=None, decode_exchange: str = "auto") -> None:
        check_decode_exchange(decode_exchange)
        self.model = model
        self.group = group
        self.mode = decode_exchange
        self.world = dist.get_world_size(group)
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype if param.is_floating_point() else torch.float32
        # The modules a round may forward: the main model, then each MTP depth.
        self.num_modules = 1 + len(model.mtp)
        self.rounds = 0
        self.padding_forwards = 0
        self.gathered_forwards = 0  # forwards (real or empty) that took the gathered exchange
        self.graph_forwards = 0  # of those, the ones every rank replayed as a graph
        self.mtp_forwards = 0  # MTP forwards (real or empty) this rank ran in rounds
        self.ready_version = 0  # this rank's newest staged placement (set by the engine)
        self.last_round = Round(0, 0, 0)  # the round that ended the last step
        self.gather = GatherState(self.device)
        for m in model.modules():
            if isinstance(m, ServingEPMoE):
                m.gather = self.gather
        self.replay_padding: Callable[[int, int], bool] | None = None

    def _round(
        self,
        forwarding: bool,
        busy: bool,
        B: int = 0,
        S: int = 0,
        decode: bool = True,
        graph_batch: int = 0,
        module: int = 0,
    ) -> Round:
        if not 0 <= module < self.num_modules:
            raise ValueError(f"module {module}: accepted 0 to {self.num_modules - 1}")
        vote = [int(busy), -self.ready_version]
        for m in range(self.num_modules):
            mine = forwarding and m == module
            vote += [
                int(mine),
                int(mine and not decode),
                B * S if mine else 0,
                graph_batch if mine else 0,
                S if mine else 0,
                -S if mine else -_NO_S,
                int(mine and graph_batch == 0),
            ]
        if self.world > 1:  # alone, a rank's vote is the round: no collective, no host sync
            vote_n = torch.tensor(vote, dtype=torch.int64, device=self.device)
            dist.all_reduce(vote_n, op=dist.ReduceOp.MAX, group=self.group)
            vote = vote_n.tolist()
        self.rounds += 1
        b, v = vote[:2]
        # The first module some rank forwards goes first: a rank's main forwards of a step come
        # before its MTP forwards, so a rank waiting with an MTP forward never blocks a peer's
        # main forward, and every round makes progress.
        for m in range(self.num_modules):
            f, p, rows, gb, s_max, neg_s_min, no_graph = vote[2 + 7 * m : 9 + 7 * m]
            if f:
                return Round(f, b, -v, p, rows, gb, s_max, -neg_s_min, no_graph, m)
        return Round(0, b, -v)

    def _use(self, ex: Exchange, valid: int) -> None:
        self.gather.set(ex.gather, ex.rows, valid)
        self.gathered_forwards += ex.gather
        self.graph_forwards += ex.graph_batch > 0

    def before_forward(
        self, B: int, S: int, decode: bool, graph_batch: int, module: int = 0
    ) -> int:
        """Collective, before this rank's forward of B sequences x S tokens through `module` (0
        the main model, d + 1 MTP depth d): `decode` (S is a decode's), `graph_batch` (the padded
        batch of the captured graph that would run it, 0 if none). While a round forwards another
        module (peers' main forwards before this rank's MTP forward), runs empty forwards of it.
        Returns the padded batch whose graph every rank replays, or 0 (run eagerly); the MoE
        layers then exchange as agreed."""
        while True:
            r = self._round(True, True, B, S, decode, graph_batch, module)
            ex = choose_exchange(r, self.mode, self.world)
            if r.module == module:
                self._use(ex, B * S)
                self.mtp_forwards += module > 0
                return ex.graph_batch
            self.empty_forward(ex, r.module)

    def empty_forward(self, ex: Exchange, module: int = 0) -> None:
        """A forward of `module` (0 the main model, d + 1 MTP depth d) without tokens of this
        rank: it runs every MoE layer's exchange (padding rows only, in the peers' graph when they
        replay one; an MTP depth over zero rows with hidden input [0, 1, D], eagerly)."""
        self._use(ex, 0)
        ids_BS = torch.empty(0, 1, dtype=torch.long, device=self.device)
        if module > 0:
            D = self.model.config.hidden_size
            hidden_BSD = torch.empty(0, 1, D, dtype=self.dtype, device=self.device)
            positions_BS = torch.empty(0, 1, dtype=torch.long, device=self.device)
            mtp = self.model.mtp[module - 1]
            assert isinstance(mtp, MTPModule)  # the model's MTP depths are MTPModules
            self.model.mtp_step(mtp, hidden_BSD, ids_BS, positions_BS)
            self.mtp_forwards += 1
        else:
            replay = self.replay_padding
            if not (ex.graph_batch and replay is not None and replay(ex.graph_batch, ex.tokens)):
                self.model(ids_BS, return_mtp=False)
        self.padding_forwards += 1

    def finish_step(self, busy: bool) -> bool:
        """After this rank's own forwards of a step: run empty forwards while any peer still runs
        real ones. Returns whether any rank has unfinished requests."""
        while True:
            r = self._round(False, busy)
            if r.forwarding == 0:
                self.last_round = r
                self.gather.set(False, 0, 0)
                return r.busy > 0
            self.empty_forward(choose_exchange(r, self.mode, self.world), r.module)

    @contextmanager
    def graph_capture(self) -> Iterator[None]:
        """Model forwards inside take the gathered exchange at their own row count: how decode
        graphs are captured. Every row counts as padding (the warm-up forwards compute no expert
        pair and add no load; a replay reads the real count from valid_1). Collective: every rank
        captures the same graphs in the same order, so the warm-ups' collectives line up."""
        self.gather.set(True, 0, 0)
        try:
            yield
        finally:
            self.gather.set(False, 0, 0)


def parallelize_for_serving(
    model: Transformer, group=None, decode_exchange: str = "auto"
) -> Lockstep:
    """Make a plain single-device model one rank of an expert-parallel serving gang over `group`
    (the default group when None), in order: (1) every MoE layer (the MTP modules' too) keeps only
    this rank's slice of the routed experts (already-sliced experts from a shard-wise load are
    kept) and exchanges tokens with the other ranks; (2) the lockstep (for the runner to call),
    with the decode exchange `decode_exchange` (DECODE_EXCHANGES). Everything else
    (embedding, attention, dense layers, shared experts, head) stays replicated."""
    check_decode_exchange(decode_exchange)  # before the model changes
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    E = model.config.n_routed_experts
    if E % size:
        raise ValueError(f"{E} routed experts do not split evenly over ep={size} ranks")
    enable_expert_parallel(model, group, rank, size, ServingEPMoE)
    return Lockstep(model, group, decode_exchange)
