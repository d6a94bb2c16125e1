"""Speculative decoding under async scheduling: an MTP step is launched before the previous one's
verdict is read back (`EngineConfig.async_scheduling_spec`).

Legend: B rows (requests) of a step, each J = 1 + K tokens: its last known token and K drafts
(K = num_speculative_tokens); V vocabulary; D model width.

Why. A synchronous MTP step (engine.py) reads its targets and next drafts back and runs the host's
verify, scheduler update, schedule and input building before the next forward, with the GPU idle
meanwhile. Here the next step's inputs are computed on the device, so its launch needs nothing read
back, and the host's work runs while the GPU computes. On an H100 (small preset, acceptance ~1)
MTP runs at 1.41x plain decoding at batch 1 where synchronous steps run at 1.07x, and at 1.54x
against 0.90x at batch 16; the cycle is GPU-bound (benchmarks/notes-engine.md).

The step on the device (the verdict, the drafts, the next step's inputs: spec_step.py says what
they are and why they are exact) runs as the two forwards' graph replays with eager glue between,
or, where a whole-step graph of the batch's size and kind was captured (all-greedy batches; opt-in,
sampled ones: `spec_step.spec_graph_kind`), as one replay of `spec_step.SpecGraph`.

The host, one step late. Step N + 1 is launched from step N's device outputs, its rows step N's
(those still running, less those that surely end at N), with pages reserved for the farthest it can
reach: s_N + 3K (K + 1 tokens accepted at N, then N + 1's K + 1 positions and its chain's K - 1),
s_N known on the host since step N - 1 was resolved. Then step N is resolved: its tokens, verdicts
and drafts arrive in one device->host copy (pinned, behind step N + 1's launch), the host applies
them through the scheduler's `update` (stop checks, outputs, KV commits) exactly as for a
synchronous step, and notes each row's next drafts (what step N + 1 was fed). A request that ends at
that resolve (EOS, a stop id or string, max_tokens) had step N + 1 in flight: its row there is
dropped (its KV writes land in pages it no longer owns, before any later step that reuses them, in
stream order). A row the synchronous engine would have run with fewer drafts (r < K: max_tokens or
max_model_len near; r is what its drafts were cut to at the last resolve) emits what that step
emits: the verdict over its first r drafts (a greedy target does not depend on the drafts after
it), or with none the first position's token drawn at u0 (`plain`); past r the request ends
there.

The overlap drains (resolves the step in flight and hands back to the synchronous path) when a
request is waiting (its prefill runs synchronously; the decodes then resume here), when a running
request was not in the step in flight, when pages for the next step cannot be reserved, when a row's
next positions would pass max_model_len, or when no row is left. Only rows with K drafts each, no
logprobs, no logits processing, no grammar, outside an expert-parallel gang, greedy or (with
`EngineConfig.async_scheduling_sampled`) sampled, start it (`MTPDrafter.chainable`); every other
step runs as before.

A sampled row's verdict cannot be cut on the host as a greedy one is (the synchronous step of r < K
drafts samples the token after its last draft from p_r, where the device would have judged draft
r + 1), so with K > 1 the device cuts it: r = its last position limit less its start, clamped to
0 .. K (`sampled_verdict`'s room). The limit (`speculative.draft_limit`, the rule the synchronous
drafter cuts by) is the same for the whole request, so the host sends it with the step without
knowing what the step in flight emits (in a sampled whole-step graph's row settings, or as its own
tensor).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from moeray.platform.engine.sampler import filtered_probs, to_device
from moeray.platform.engine.scheduler import (
    Request,
    RequestOutput,
    ScheduledSeq,
    SchedulerOutput,
    Status,
)
from moeray.platform.engine.spec_step import (
    greedy_verdict,
    sampled_verdict,
    spec_drafts,
    spec_graph_kind,
    spec_graph_rows,
    spec_step_outputs,
    verdict_room,
)
from moeray.platform.engine.speculative import draft_limit, token_uniform, verdict_uniform
from moeray.platform.engine.step_inputs import copy_to_host


@dataclass
class _SpecStep:
    """A launched speculative step: its rows' requests, the next step's inputs on the device,
    and the copy of its [toks, acc, plain, drafts] to the host with the event after it (None on
    CPU)."""

    requests: list[Request]
    next_ids_BJ: torch.Tensor
    next_starts_B: torch.Tensor
    host_BH: torch.Tensor
    copied: torch.cuda.Event | None
    launched_at: float


class SpecOverlap:
    """Runs MTP decode steps one ahead of their read-back for a DecodeOverlap."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine  # the Engine (typed loosely: engine.py imports overlap.py, us)
        self.k = max(1, engine.config.num_speculative_tokens)  # drafts a step
        self.sampled = bool(engine.config.async_scheduling_sampled)  # sampled rows run here too
        self.pending: _SpecStep | None = None
        self.fed: dict[str, list[int]] = {}  # request id -> the drafts the step in flight got
        self.overlapped_steps = 0  # steps launched while another was in flight
        self.drained_steps = 0
        # Every step launched: overlapped + drained + the one in flight. A step launched for rows
        # that its predecessor then ends (drafts accepted past max_tokens) stays in flight
        # once nothing is left to run, until the next step() drains it.
        self.launched_steps = 0

    def takes(self, out: SchedulerOutput) -> bool:
        """Whether a synchronously scheduled step can start the overlap: every row a decode with
        K drafts, greedy or (with `sampled`) sampled (`MTPDrafter.chainable`), nothing
        preempted, ended at schedule or exported, and (K > 1) every row's pages grown for its
        chain's positions (up to s + 2K - 1; pages grown for some rows stay theirs)."""
        eng = self.engine
        return (
            eng.drafter is not None
            and not out.preempted
            and not eng.scheduler.finished_at_schedule
            and not eng._exports
            and eng.drafter.chainable(out.scheduled, sampled=self.sampled, drafts=self.k)
            and (
                self.k == 1
                or all(
                    eng.kv.grow(s.request.request_id, s.start + 2 * self.k) for s in out.scheduled
                )
            )
        )

    def start(self, out: SchedulerOutput) -> list[RequestOutput]:
        """Launch a step `takes` allows from its host inputs; its outputs come at the next call."""
        eng = self.engine
        rows = [s.request for s in out.scheduled]
        for s in out.scheduled:
            self.fed[s.request.request_id] = list(s.spec_token_ids)
        ids_BJ, starts_B = eng.runner.inputs.ids_and_starts(
            [list(s.input_ids) for s in out.scheduled], [s.start for s in out.scheduled]
        )
        self.pending = self._launch(rows, ids_BJ, starts_B, max(s.start for s in out.scheduled))
        return []

    def step(self) -> list[RequestOutput]:
        """With a step in flight: launch the next one from its device outputs when the batch
        can go on (else drain), then resolve the one in flight."""
        prev = self.pending
        assert prev is not None
        rows = self._next_rows(prev)
        if rows is None:
            self.pending = None
            self.drained_steps += 1
            outs = self._resolve(prev)
            self.fed.clear()  # nothing was fed: the next step is scheduled synchronously
            return outs
        ids_BJ, starts_B = prev.next_ids_BJ, prev.next_starts_B
        if len(rows) != len(prev.requests):  # rows left: gather the rest's inputs
            keep = {id(r) for r in rows}
            idx = [i for i, r in enumerate(prev.requests) if id(r) in keep]
            dev = self.engine.runner.inputs.device_index(idx)
            ids_BJ, starts_B = ids_BJ[dev], starts_B[dev]
        # the farthest start: a row's step-in-flight start plus K + 1 accepted tokens
        farthest = max(r.num_computed for r in rows) + self.k + 1
        self.pending = self._launch(rows, ids_BJ, starts_B, farthest)
        self.overlapped_steps += 1
        return self._resolve(prev)

    def _next_rows(self, prev: _SpecStep) -> list[Request] | None:
        """The requests of the step after `prev` (prev's rows still running, less those whose
        tokens in flight surely end them), their pages reserved; None to drain."""
        eng, sched, k = self.engine, self.engine.scheduler, self.k
        if sched.waiting or eng._exports:
            return None
        launched = {id(r) for r in prev.requests}
        if any(id(r) not in launched for r in sched.running):
            return None  # joined since (a request added with its prefill done elsewhere)
        max_len = sched.config.max_model_len
        rows = []
        for r in prev.requests:
            if r.status is not Status.RUNNING:
                continue
            # After the previous resolve r's last known token sits at s = num_computed, the
            # step in flight's start; it adds 1 .. K + 1 tokens, the next step reads up to
            # s + 2K + 1 and its chain writes up to s + 3K.
            if r.num_output_tokens + 1 >= r.params.max_tokens or len(r.token_ids) + 1 >= max_len:
                continue  # ends at the step in flight by length
            if len(r.token_ids) + 3 * k > max_len:
                return None  # the next positions could pass max_model_len: run synchronously
            rows.append(r)
        if not rows or (1 + k) * len(rows) > sched.config.max_num_batched_tokens:
            return None
        if not all(sched.kv.grow(r.request_id, r.num_computed + 3 * k + 1) for r in rows):
            return None  # (pages grown for some rows stay theirs; the next steps fill them)
        return rows

    def _launch(
        self, rows: list[Request], ids_BJ: torch.Tensor, starts_B: torch.Tensor, farthest: int
    ) -> _SpecStep:
        """One step's main forward, its verdict, its MTP forwards on the verdict's tokens (graph
        replays on CUDA), the next step's inputs, and the copy of [toks, acc, plain, drafts] to
        the host: queued, no sync. `farthest`: the largest start any row can have (the block
        tables cover it + 2K - 1: the step's positions and its chain's)."""
        eng = self.engine
        runner, drafter, k = eng.runner, eng.drafter, self.k
        t0 = time.perf_counter()
        self.launched_steps += 1
        bt = runner.inputs.tables_by_id(
            [r.request_id for r in rows], runner.inputs.pages_to(farthest + 2 * k)
        )
        params = [r.params for r in rows]
        # (uniforms drawn once, in row order, whichever way the step runs)
        uniforms = None if all(p.greedy for p in params) else self._uniforms(rows)
        # the drafts a synchronous step would verify end at each row's limit (module docstring)
        limits = None
        if uniforms is not None and k > 1:
            max_len = eng.scheduler.config.max_model_len
            limits = [draft_limit(r, max_len) for r in rows]
        kind = spec_graph_kind(params, eng.model_config.vocab_size)
        graph = runner.spec_graph(len(rows), kind) if kind is not None else None
        if graph is not None:  # the whole step in one replay (spec_step.SpecGraph)
            settings = None if uniforms is None else spec_graph_rows(params, uniforms, limits)
            next_ids_BJ, next_starts_B, out_BH = graph.run_step(ids_BJ, bt, starts_B, settings)
            host, copied = copy_to_host(out_BH)
            return _SpecStep(rows, next_ids_BJ, next_starts_B, host, copied, t0)
        logits_BJV, hidden_BJD = runner.forward_group(ids_BJ, bt, starts_B)
        if uniforms is None:
            acc_B1, toks_BJ, plain_B = greedy_verdict(ids_BJ, logits_BJV.argmax(-1))
        else:
            B, J, V = logits_BJV.shape
            every = [p for p in params for _ in range(J)]  # a row's settings at each position
            probs_BJV = filtered_probs(logits_BJV.reshape(J * B, V), every).view(B, J, V)
            u_BJ = to_device(uniforms, torch.float32, eng.device)
            room_B1 = None
            if limits is not None:
                room_B1 = verdict_room(to_device(limits, torch.long, eng.device), starts_B, k)
            acc_B1, toks_BJ, plain_B = sampled_verdict(ids_BJ, probs_BJV, u_BJ, room_B1)
        depth = drafter.model.mtp[0]

        def mtp_forward(ids_BS, at_B, h_BSD):
            return runner.forward_group(ids_BS, bt, at_B, mtp_module=depth, hidden_BSD=h_BSD)

        drafts_BK = spec_drafts(mtp_forward, toks_BJ, hidden_BJD, starts_B, acc_B1, k)
        next_ids_BJ, next_starts_B = spec_step_outputs(starts_B, acc_B1, toks_BJ, drafts_BK)
        host, copied = copy_to_host(torch.cat([toks_BJ, acc_B1, plain_B[:, None], drafts_BK], 1))
        return _SpecStep(rows, next_ids_BJ, next_starts_B, host, copied, t0)

    def _uniforms(self, rows: list[Request]) -> list[tuple[float, ...]]:
        """A sampled row's K + 1 uniforms from its generator, drawn as `speculative.verify` draws
        them (the K verdicts', then the next token's); a greedy row's generator untouched (its
        one-hot verdict reads no uniform: 0.5 stands in)."""
        k = self.k
        return [
            (0.5,) * (k + 1)
            if r.params.greedy
            else (
                *[verdict_uniform(r.generator) for _ in range(k)],
                float(token_uniform(r.generator)[0]),
            )
            for r in rows
        ]

    def _resolve(self, p: _SpecStep) -> list[RequestOutput]:
        """Wait for a step's tokens, verdicts and drafts on the host and apply them as a
        synchronous step's: the scheduler's update, the drafter's counts, each row's next
        drafts."""
        eng, J = self.engine, 1 + self.k
        if p.copied is not None:
            p.copied.synchronize()
        host = p.host_BH.tolist()
        scheduled, sampled, drafts, counted = [], {}, [], []
        for req, row in zip(p.requests, host, strict=True):
            toks, acc, plain = row[:J], row[J], row[J + 1]
            fed = self.fed.pop(req.request_id, None)
            if req.status is not Status.RUNNING:
                continue  # aborted, or ended at an earlier resolve: its row is dropped
            assert fed is not None, req.request_id  # every running row was fed its drafts
            # The step as the synchronous engine scheduled it: from the last known token, with
            # the drafts its request holds (cut to its room at the last resolve). With none it
            # emits what a step without drafts samples, its last.
            r = len(req.spec_token_ids)
            scheduled.append(ScheduledSeq.make(req, req.num_computed, 1 + r, tuple(fed[:r])))
            sampled[req.request_id] = toks[: min(acc, r) + 1] if r else [plain]
            drafts.append(row[J + 2 :])
            counted.append(r)
        outs = eng.scheduler.update(SchedulerOutput(scheduled, []), sampled)
        for s, row_drafts, r in zip(scheduled, drafts, counted, strict=True):
            if r:
                eng.drafter.record(r, len(sampled[s.request.request_id]) - 1)
            if s.request.status is Status.RUNNING:
                self.fed[s.request.request_id] = row_drafts  # what the next step got
        # the requests' own drafts, for a synchronous step after a drain
        eng.drafter.assign_drafts([s.request for s in scheduled], drafts, eng.max_model_len)
        eng.stats.forward_seconds += time.perf_counter() - p.launched_at
        eng.stats.steps += 1
        eng.stats.generated_tokens += sum(len(v) for v in sampled.values())
        return eng._drop_grammars(eng._attach_exports(outs))
