"""The device half of an MTP step under async scheduling (engine/spec_overlap.py runs the steps):
the verdict, the drafts and the next step's inputs, and `SpecGraph`, a step in one CUDA graph.

Legend: B rows (requests) of a step, each J = 1 + K tokens: its last known token and K drafts
(K = the drafter's num_speculative_tokens); V vocabulary; D model width.

The step. Row b of step N has inputs [t, d_1 .. d_K] at positions s .. s + K (s = its start).
The verdict (`greedy_verdict`, `sampled_verdict`) gives acc_B (the drafts accepted, 0 .. K) and
toks_BJ, the tokens after positions s .. s + K (toks[j] used only where j <= acc):
    greedy:  toks = argmax of the main logits at each position, acc = how many leading drafts
             equal the toks before them (d_j == toks[j - 1])
    sampled: with p_j the filtered distribution at position s + j, u_j the row's K verdict
             uniforms and t its token uniform: draft d_{j+1} is accepted where u_j < p_j(d_{j+1}),
             acc = how many leading drafts are; toks[j] = d_{j+1} where accepted, else p_j's
             residual without d_{j+1} sampled at t; toks[K] = p_K sampled at t
    drafts_BK  = `spec_drafts`: the argmax of the MTP logits at s + acc, its forward over
                 s .. s + K on inputs (hidden rows, toks_BJ); then (K > 1) the MTP depth again,
                 one position at a time from s + acc + 1, on its own last hidden row and the
                 draft before (speculative.py's chain)
    next ids   = [toks_BJ[b, acc], drafts_BK[b]]                   (the new last token, its drafts)
    next start = s + 1 + acc
This is what the synchronous engine schedules (`MTPDrafter.chain` says why the MTP inputs are exact
whatever the verdict: an accepted draft equals the target before it): its verification
(`speculative.verify`) emits the accepted drafts and the token after them, drawing the same K + 1
uniforms from the request's generator in the same order (the K verdicts', then the token's, whatever
the verdicts), and its drafts after the new last token are the MTP argmax at the last newly valid
position and its chain. So every forward runs on the inputs the synchronous engine would give it,
and the outputs are its outputs, sampled ones included. The uniforms are drawn on the host at launch
(sampled rows only: a greedy row's generator is left untouched, as verification leaves it) and go up
with the step.

Why one graph. Run as the main forward's graph, the verdict, the MTP depth's graph and the next
inputs, a step launched ~35 operations from Python (the graphs' input copies, argmaxes, the
verdict's and the next inputs' elementwise ops): 0.70 ms of host time at batch 1 on an H100 for
0.87 ms of GPU work, so a faster kernel would soon have left the step host-bound (small preset,
benchmarks/results/mtp-cycle-nvidia-h100-80gb-hbm3-b1.json). `SpecGraph` captures all of it for a
greedy batch, and writes the next step's ids and starts over its own static inputs, where its next
replay reads them: a step is then its block table's copy in, one replay and one copy back.
Sampled batches whose rows use temperature and top-p only (min-p and top-k pick their filters'
shapes on the host) have graphs of their own, opt-in until timed (MOERAY_FUSED_SPEC_GRAPH_SAMPLED=1;
kinds "spec_sampled" and "spec_top_p", `spec_graph_kind`): each row's temperature, top-p,
greediness, K + 1 uniforms and (K > 1) its position limit go up in one copy (`spec_graph_rows`),
the filters run as `sampler.apply_filters`, whose rows come out as `filtered_probs` makes them for
the two-graph step, and (K > 1) the verdict is cut at the room the limit leaves past the row's
start, as spec_overlap.py cuts the two-graph step's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moeray.platform.engine.paged_view import KernelPagedView
from moeray.platform.engine.sampler import SamplingParams, apply_filters, sample_from_probs
from moeray.platform.engine.step_graphs import ModelRunner, StepGraph


def greedy_verdict(
    ids_BJ: torch.Tensor, targets_BJ: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A greedy step's verdict (module docstring) -> (acc [B, 1] int64, toks [B, J], plain [B]):
    the targets, the drafts accepted while each is the target before it, plain the token
    without drafts."""
    match_BK = (ids_BJ[:, 1:] == targets_BJ[:, :-1]).long()
    acc_B1 = match_BK.cumprod(1).sum(1, keepdim=True)
    return acc_B1, targets_BJ, targets_BJ[:, 0]


def sampled_verdict(
    ids_BJ: torch.Tensor,
    probs_BJV: torch.Tensor,
    u_BJ: torch.Tensor,
    room_B1: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sampled step's verdict (module docstring), what `speculative.verify` draws from the same
    probabilities (`filtered_probs` of the J rows) and uniforms (u_BJ: the K verdicts' then the
    token's) -> (acc [B, 1] int64, toks [B, J], plain [B]: `sample_from_probs` of p0 at the first
    uniform, what a step without drafts samples). toks[j] is draft j + 1 where its verdict
    accepts it, else the residual of p_j without it sampled at the token's uniform; toks[K] is
    p_K sampled there: the emitted tokens are toks[: acc + 1]. A draft that holds all of p_j's
    mass is accepted whatever its uniform (verify keeps it: its residual is empty). `room_B1`
    (0 .. K a row): the drafts a synchronous step would verify there (max_tokens or
    max_model_len near): acc stops at it and toks[room] is p_room sampled at the token's uniform,
    as verify does after its last draft. On the device, nothing read back; one-hot rows (greedy)
    give the greedy verdict."""
    B, J, V = probs_BJV.shape
    K = J - 1
    p_BKV, d_BK = probs_BJV[:, :K], ids_BJ[:, 1:]
    residual_BKV = p_BKV.scatter(2, d_BK[..., None], 0.0)
    total_BK1 = residual_BKV.sum(-1, keepdim=True)
    ok_BK = (u_BJ[:, :K] < p_BKV.gather(2, d_BK[..., None])[..., 0]) | (total_BK1[..., 0] <= 0)
    acc_B1 = ok_BK.long().cumprod(1).sum(1, keepdim=True)
    # (an empty residual is never sampled from: p stands in so no row divides by zero)
    residual_BKV = torch.where(total_BK1 > 0, residual_BKV / total_BK1, p_BKV)
    t_B = u_BJ[:, K]
    # (an expand: repeat_interleave may sync to size)
    rejected_BK = sample_from_probs(
        residual_BKV.reshape(B * K, V), t_B[:, None].expand(B, K).reshape(B * K)
    ).view(B, K)
    toks_BJ = torch.cat(
        [torch.where(ok_BK, d_BK, rejected_BK), sample_from_probs(probs_BJV[:, K], t_B)[:, None]],
        1,
    )
    if room_B1 is not None:
        acc_B1 = torch.minimum(acc_B1, room_B1)
        bonus_BJ = sample_from_probs(
            probs_BJV.reshape(B * J, V), t_B[:, None].expand(B, J).reshape(B * J)
        ).view(B, J)
        at_room_BJ = torch.arange(J, device=toks_BJ.device)[None] == room_B1
        toks_BJ = torch.where(at_room_BJ, bonus_BJ, toks_BJ)
    return acc_B1, toks_BJ, sample_from_probs(probs_BJV[:, 0], u_BJ[:, 0])


def verdict_room(limit_B: torch.Tensor, starts_B: torch.Tensor, k: int) -> torch.Tensor:
    """[B, 1] int64: the drafts (0 .. k) a synchronous step from each start would verify, given
    each request's `speculative.draft_limit`: `sampled_verdict`'s room."""
    return (limit_B - starts_B).clamp(0, k)[:, None]


# An MTP forward as a step runs it: (ids_BS, starts_B, hidden_BSD) -> (logits_BSV, hidden_BSD),
# over S positions a row from each start (a graph replay, or the forward a whole-step graph
# captures).
MTPForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def spec_drafts(
    mtp_forward: MTPForward,
    toks_BJ: torch.Tensor,
    hidden_BJD: torch.Tensor,
    starts_B: torch.Tensor,
    acc_B1: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """A step's next drafts (module docstring) -> [B, k] int64, on the device, no sync: the MTP
    argmax at position s + acc of its forward over the step's positions, then k - 1 forwards of
    one position each on the MTP's own last hidden row (speculative.py's chain)."""
    logits_BJV, h_BJD = mtp_forward(toks_BJ, starts_B, hidden_BJD)
    drafts = [logits_BJV.argmax(-1).gather(1, acc_B1)]
    if k > 1:
        D = h_BJD.shape[-1]
        h_B1D = h_BJD.gather(1, acc_B1[:, :, None].expand(-1, 1, D))
        at_B = starts_B + acc_B1[:, 0] + 1  # the new last token's position: draft 2's MTP row
        for j in range(2, k + 1):
            logits_B1V, h_B1D = mtp_forward(drafts[-1], at_B + (j - 2), h_B1D)
            drafts.append(logits_B1V.argmax(-1))
    return torch.cat(drafts, 1)


def spec_step_outputs(
    starts_B: torch.Tensor, acc_B1: torch.Tensor, toks_BJ: torch.Tensor, drafts_BK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next step's inputs from a step's verdict and drafts (module docstring): -> (next ids
    [B, J], next starts [B]), on the device, no sync."""
    next_ids_BJ = torch.cat([toks_BJ.gather(1, acc_B1), drafts_BK], 1)
    return next_ids_BJ, starts_B + 1 + acc_B1[:, 0]


# The whole-step graph kinds: greedy batches, and (opt-in) sampled batches without and with top-p.
SPEC_KINDS = ("spec", "spec_sampled", "spec_top_p")


def spec_graph_kind(params: list[SamplingParams], vocab: int) -> str | None:
    """The whole-step graph kind that runs a batch of these rows' settings: "spec" when every row
    is greedy, "spec_sampled" / "spec_top_p" when no row uses min-p or top-k (and some row uses
    top-p: "spec_top_p"), None otherwise (the two-graph step)."""
    if all(p.greedy for p in params):
        return "spec"
    if any(p.min_p or 0 < p.top_k < vocab for p in params if not p.greedy):
        return None
    return "spec_top_p" if any(p.top_p < 1.0 for p in params if not p.greedy) else "spec_sampled"


def spec_graph_rows(
    params: list[SamplingParams],
    uniforms: list[tuple[float, ...]],
    limits: list[int] | None = None,
) -> list:
    """The per-row settings a sampled whole-step graph reads, [temperature (1 if greedy), top_p,
    greedy (0 / 1), the row's K + 1 uniforms (the verdicts', the token's)] a row, and with
    `limits` (K > 1: `speculative.draft_limit`, the last position a row's drafts may reach) that
    limit last. (Positions are exact in float32: below 2**24.)"""
    rows = [
        [1.0 if p.greedy else p.temperature, p.top_p, float(p.greedy), *u]
        for p, u in zip(params, uniforms, strict=True)
    ]
    if limits is not None:
        for row, lim in zip(rows, limits, strict=True):
            row.append(float(lim))
    return rows


class SpecGraph(StepGraph):
    """An MTP step (the module docstring) captured whole for bs rows of `tokens` = 1 + K tokens:
    the main forward, the verdict, `mtp_module`'s forwards over the verdict's tokens (and its
    chain, K > 1), the drafts, the next step's inputs and the [toks (J), acc, plain, drafts (K)]
    the host reads back (`host_BH`). The next step's ids and starts overwrite this graph's static
    inputs (after every read of them, in stream order), so a replay that follows its own needs no
    input copies. `kind` (SPEC_KINDS): a greedy verdict ("spec"), or a sampled one reading each
    row's settings, uniforms and (K > 1) position limit from `rows_BR` (`spec_graph_rows`: R =
    3 + J, plus 1 for K > 1), with top-p ("spec_top_p") or without."""

    def __init__(
        self,
        runner: ModelRunner,
        bs: int,
        mtp_module,
        hidden_dtype: torch.dtype | None = None,
        kind: str = "spec",
        tokens: int = 2,
    ) -> None:
        if kind not in SPEC_KINDS:
            raise ValueError(f"kind={kind!r}: must be one of {SPEC_KINDS}")
        if tokens < 2:
            raise ValueError(
                f"a {kind} graph of tokens={tokens}: accepted 1 + the drafts a step verifies "
                "(2 or more)"
            )
        self.depth = mtp_module  # (these before StepGraph's __init__ captures)
        self.kind = kind
        # padding rows: greedy (a one-hot verdict reads no setting)
        R = 3 + tokens + (tokens > 2)
        self.rows_BR = (
            None if kind == "spec" else torch.ones(bs, R, dtype=torch.float32, device=runner.device)
        )
        super().__init__(runner, bs, tokens)
        self.hidden_dtype = hidden_dtype
        self.replays = 0  # steps run through this graph

    def _forward(self, runner: ModelRunner):
        ids_BJ, starts_B = self.ids_BS, self.starts_B
        J = self.S
        view = KernelPagedView(runner.storage, self.block_table_BM, starts_B, J)
        logits_BJV, hidden_BJD = runner._forward_model(ids_BJ, view, 0)
        if self.rows_BR is None:
            acc_B1, toks_BJ, plain_B = greedy_verdict(ids_BJ, logits_BJV.argmax(-1))
        else:
            bs, _, V = logits_BJV.shape
            R = self.rows_BR.shape[1]
            # a row's settings at each position (an expand: repeat_interleave may sync to size)
            r_BJR = self.rows_BR[:, None].expand(bs, J, R).reshape(bs * J, R)
            top_ps = r_BJR[:, 1] if self.kind == "spec_top_p" else None
            probs_BJV = apply_filters(
                logits_BJV.reshape(bs * J, V), r_BJR[:, 0], r_BJR[:, 2] > 0, top_ps_B=top_ps
            ).view(bs, J, V)
            room_B1 = None
            if J > 2:  # the drafts a synchronous step would verify: its limit past its start
                room_B1 = verdict_room(self.rows_BR[:, 3 + J].long(), starts_B, J - 1)
            acc_B1, toks_BJ, plain_B = sampled_verdict(
                ids_BJ, probs_BJV, self.rows_BR[:, 3 : 3 + J], room_B1
            )

        def mtp_forward(ids_BS, at_B, h_BSD):
            mtp_view = KernelPagedView(runner.storage, self.block_table_BM, at_B, ids_BS.shape[1])
            return runner._forward_mtp(self.depth, h_BSD, ids_BS, mtp_view, 0)

        drafts_BK = spec_drafts(mtp_forward, toks_BJ, hidden_BJD, starts_B, acc_B1, J - 1)
        next_ids_BJ, next_starts_B = spec_step_outputs(starts_B, acc_B1, toks_BJ, drafts_BK)
        host_BH = torch.cat([toks_BJ, acc_B1, plain_B[:, None], drafts_BK], 1)
        ids_BJ.copy_(next_ids_BJ)
        starts_B.copy_(next_starts_B)
        return view, (host_BH,)

    def _keep(self, outputs) -> None:
        (self.host_BH,) = outputs

    def run_step(
        self,
        ids_BJ: torch.Tensor,
        block_table_BM: torch.Tensor,
        starts_B: torch.Tensor,
        rows: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replay one step on B <= bs rows -> (next ids [B, J], next starts [B], [B, 2J + 1] of
        toks, acc, plain, drafts): views of the static buffers, valid until the next replay. Inputs
        that are this graph's own next inputs (the views its last replay returned) are where
        they belong and are not copied. `rows`: a sampled graph's `spec_graph_rows`."""
        b = block_table_BM.shape[0]
        R = None if self.rows_BR is None else self.rows_BR.shape[1]
        if (rows is None) != (R is None) or (
            rows is not None and (len(rows) != b or any(len(r) != R for r in rows))
        ):
            raise ValueError(
                f"a {self.kind} graph of {b} rows was given rows={rows!r}: accepted "
                + ("none" if R is None else f"{b} rows of {R} settings (spec_graph_rows)")
            )
        if self.rows_BR is not None:
            host = torch.tensor(rows, dtype=torch.float32)
            host = host.pin_memory() if self.rows_BR.is_cuda else host
            self.rows_BR[:b].copy_(host, non_blocking=True)
            self.rows_BR[b:].fill_(1.0)
        self._load(ids_BJ, block_table_BM, starts_B)
        self._replay()
        self.replays += 1
        return self.ids_BS[:b], self.starts_B[:b], self.host_BH[:b]
