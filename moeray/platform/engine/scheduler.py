"""Continuous batching with chunked prefill, FIFO priority and preemption by recompute.

Every request is one list of tokens (prompt, then outputs) and a count of how many of them have
their KV computed. A step computes tokens [num_computed, num_computed + n) for each scheduled
request: a prefill chunk when many are missing, a decode (n = 1, plus the speculative draft
tokens) when only the last sampled token is. A request is sampled when its chunk reaches its last
known token. So a request that was preempted (its pages freed, num_computed reset to 0) simply
prefills its prompt and outputs again when resumed; with prefix caching most of those pages are
usually still cached.

Per step (token budget max_num_batched_tokens):
  1. running requests in arrival order: each gets its decode or its next prefill chunk; when pages
     run out, the latest-arrived running request is preempted (possibly the one being scheduled);
  2. if nobody was preempted, waiting requests in arrival order are admitted while budget, pages and
     max_num_seqs allow; the first that does not fit stops admission (strict FIFO, no overtaking).
Requests leave the batch at any step: finished (eos, stop token, stop string, max_tokens,
max_model_len) or aborted, and their pages are freed at once.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from moeray.platform.engine.detokenize import IncrementalDetokenizer
from moeray.platform.engine.kv_cache import KVCacheManager
from moeray.platform.engine.sampler import Logprobs, SamplingParams

if TYPE_CHECKING:
    import torch


# The id of a token that was sampled on the device and not read back yet (`Scheduler.advance`).
PENDING = -1


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    num_speculative_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be >= 1")
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens={self.num_speculative_tokens} must be >= 0")
        if self.max_num_batched_tokens < 1 + self.num_speculative_tokens:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                f"1 + num_speculative_tokens ({1 + self.num_speculative_tokens})"
            )
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} must be >= 2")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int
    generator: torch.Generator | None = None  # set by the engine
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    text: str = ""
    logprobs: list[Logprobs] = field(default_factory=list)
    spec_token_ids: list[int] = field(default_factory=list)  # drafts to verify next step
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    num_preemptions: int = 0
    first_scheduled: bool = False
    # With params.prompt_logprobs: entry t for prompt token t (None for the first), filled as
    # prefill chunks compute them.
    prompt_logprobs: list[Logprobs | None] = field(default_factory=list)
    # The prompt's ids on the device, kept by the engine for the repetition penalty.
    prompt_ids_tensor: torch.Tensor | None = None
    # `text` grows by this one's deltas (a scheduler with a detokenizer): O(1) tokens decoded a
    # step, where decoding the whole output again was O(length).
    detok: IncrementalDetokenizer | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.prompt_logprobs is not None and not self.prompt_logprobs:
            self.prompt_logprobs = [None]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs are asked and not all computed: its prefill must compute every prompt
        position, so it skips the prefix cache (a cached page's logits are not kept)."""
        return (
            self.params.prompt_logprobs is not None
            and len(self.prompt_logprobs) < self.num_prompt_tokens
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """A copy: O(length). Counting them is `num_output_tokens`."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass(frozen=True)
class ScheduledSeq:
    """Compute tokens [start, start + num_tokens) of request: its known tokens from start, then
    the draft tokens spec_token_ids (which are not in request.token_ids yet). samples: the chunk
    reaches the last known token, so the step samples a new one (fixed when scheduled)."""

    request: Request
    start: int
    num_tokens: int
    spec_token_ids: tuple[int, ...] = ()
    samples: bool = False
    input_ids: tuple[int, ...] = ()

    @classmethod
    def make(
        cls, request: Request, start: int, num_tokens: int, spec_token_ids: tuple[int, ...] = ()
    ) -> ScheduledSeq:
        known = num_tokens - len(spec_token_ids)
        end = start + known
        assert 0 <= start and known >= 1 and end <= len(request.token_ids)
        ids = tuple(request.token_ids[start:end]) + tuple(spec_token_ids)
        return cls(
            request, start, num_tokens, tuple(spec_token_ids), end == len(request.token_ids), ids
        )

    @property
    def is_decode(self) -> bool:
        return self.samples and self.num_tokens == 1 + len(self.spec_token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[str]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


@dataclass(frozen=True)
class RequestOutput:
    """A request's result after a step: its new tokens, and (`output_token_ids`, `logprobs`) its
    whole output so far. Those two are read on access from the request's own lists, which only
    grow (appends), up to their lengths at this step: copying them into every step's output was
    O(length) a request a step (5.7 us at 2.4K tokens on this project's CPU machine)."""

    request_id: str
    new_token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    _token_ids: list[int] = field(repr=False)  # the request's prompt + output ids
    _logprobs: list[Logprobs] = field(repr=False)  # the request's output logprobs
    _num_logprobs: int = 0
    kv_export: object = None  # KVRows of the prompt, for requests added with export_kv_from
    # With params.prompt_logprobs, on the request's first and final outputs: one entry per
    # prompt token (None for the first, which has no context).
    prompt_logprobs: list[Logprobs | None] | None = None

    @property
    def output_token_ids(self) -> list[int]:
        start = self.num_prompt_tokens
        return self._token_ids[start : start + self.num_output_tokens]

    @property
    def logprobs(self) -> list[Logprobs]:
        return self._logprobs[: self._num_logprobs]


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        *,
        eos_token_ids: Iterable[int] = (),
        detokenize: Callable[[Sequence[int]], str] | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.detokenize = detokenize
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # kept in arrival order: the last one is preempted first
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._finished_at_schedule: list[Request] = []
        # Called with a running request right before its pages are freed (KV export for P/D).
        self.before_free: Callable[[Request], None] | None = None
        self.num_preemptions = 0

    # ---- requests in and out -------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError(f"request {request_id!r}: empty prompt")
        if len(prompt) >= self.config.max_model_len:
            raise ValueError(
                f"request {request_id!r}: prompt of {len(prompt)} tokens leaves no room "
                f"under max_model_len={self.config.max_model_len}"
            )
        if self.kv.pages_for(len(prompt) + 1) > self.kv.num_pages:
            raise ValueError(
                f"request {request_id!r}: prompt of {len(prompt)} tokens exceeds the KV "
                f"cache ({self.kv.num_pages} pages of {self.kv.page_size})"
            )
        if params.stop and self.detokenize is None:
            raise ValueError(
                f"request {request_id!r}: stop strings {params.stop!r} need a tokenizer"
            )
        req = Request(request_id, prompt, params, next(self._arrivals), generator)
        self.requests[request_id] = req
        self.waiting.append(req)
        return req

    def add_prefilled(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        generator: torch.Generator | None,
        first_token: int,
        first_logprob: Logprobs | None,
        import_rows: Callable[[int], bool],
    ) -> RequestOutput | None:
        """A request whose prompt KV was computed by another engine (a prefill replica). Takes
        pages for the prompt (its cached prefix shared as usual), calls import_rows(num_cached)
        to fill tokens [num_cached, P), and joins the running batch with its first token. Returns
        that token's output, or None when it could not be placed (no pages, no batch slot, or the
        rows do not cover what is missing): the request then waits for a normal prefill."""
        if params.prompt_logprobs is not None:
            raise ValueError(
                f"request {request_id!r}: prompt_logprobs need the prompt's logits, which a "
                "prefilled request does not have; add it with add_request"
            )
        req = self.add_request(request_id, prompt_token_ids, params, generator)
        P = len(req.prompt_token_ids)
        if len(self.running) >= self.config.max_num_seqs:
            return None
        num_cached = self.kv.admit(request_id, req.token_ids, P)
        if num_cached is None:
            return None
        if not import_rows(num_cached):
            self.kv.free(request_id)
            return None
        self.waiting.remove(req)
        req.num_cached_tokens, req.first_scheduled = num_cached, True
        req.num_computed = P
        req.status = Status.RUNNING
        bisect.insort(self.running, req, key=lambda r: r.arrival)
        self.kv.commit(request_id, req.token_ids, P)
        req.token_ids.append(int(first_token))
        if first_logprob is not None:
            req.logprobs.append(first_logprob)
        self._check_stop(req, int(first_token))
        return self._output(req, [int(first_token)])

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its pages are freed now. False when it is unknown or already done."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        self._finish(req, "abort", None)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _finish(self, req: Request, reason: str, stop_reason) -> None:
        if req.status is Status.RUNNING:
            self.running.remove(req)
            if self.before_free is not None:
                self.before_free(req)
            self.kv.free(req.request_id)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        if req.detok is not None and not isinstance(stop_reason, str):
            # A held-back incomplete character ends the text as decoding the whole output ends
            # it (U+FFFD); a stop string (a str stop_reason) has cut the text before it.
            req.text += req.detok.flush()
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        req.spec_token_ids = []
        self.requests.pop(req.request_id, None)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.status = Status.WAITING
        req.num_computed = 0
        req.spec_token_ids = []
        req.num_preemptions += 1
        self.num_preemptions += 1
        # Back to the queue in arrival order (it arrived before everything still waiting but
        # possibly after other preempted requests).
        pos = 0
        while pos < len(self.waiting) and self.waiting[pos].arrival < req.arrival:
            pos += 1
        self.waiting.insert(pos, req)

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[str] = []
        finished_now: list[
            Request
        ] = []  # ended at scheduling time (cache full); reported by update
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if self.ends_in_flight(req):
                i += 1  # its last token is in flight: nothing more to compute for it
                continue
            missing = len(req.token_ids) - req.num_computed
            assert missing >= 1, (req.request_id, missing)
            spec: tuple[int, ...] = ()
            if missing == 1:
                spec = tuple(req.spec_token_ids[: max(0, budget - 1)])
                n = 1 + len(spec)
            else:
                n = min(missing, budget)
            if self.kv.pages_for(req.num_computed + n) > self.kv.num_pages:
                # The whole cache cannot hold it: drop the drafts, else it has reached the cache's
                # length limit and ends as if at max_model_len.
                spec, n = (), 1
                if self.kv.pages_for(req.num_computed + 1) > self.kv.num_pages:
                    self._finish(req, "length", None)
                    finished_now.append(req)
                    continue
            while not self.kv.grow(req.request_id, req.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break  # it preempted itself: everything after it is preempted too
            req.spec_token_ids = list(spec)
            scheduled.append(ScheduledSeq.make(req, req.num_computed, n, spec))
            budget -= n
            i += 1

        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[0]
                num_cached = self.kv.admit(
                    req.request_id,
                    req.token_ids,
                    budget,
                    use_cache=not req.needs_prompt_logprobs,
                )
                if num_cached is None:
                    break
                self.waiting.popleft()
                if not req.first_scheduled:
                    req.num_cached_tokens = num_cached
                    req.first_scheduled = True
                req.num_computed = num_cached
                req.status = Status.RUNNING
                bisect.insort(self.running, req, key=lambda r: r.arrival)
                n = min(len(req.token_ids) - num_cached, budget)
                scheduled.append(ScheduledSeq.make(req, num_cached, n))
                budget -= n
        self._finished_at_schedule = finished_now
        return SchedulerOutput(scheduled, preempted)

    def update(
        self,
        output: SchedulerOutput,
        sampled: dict[str, list[int]],
        logprobs: dict[str, list[Logprobs | None]] | None = None,
    ) -> list[RequestOutput]:
        """Apply a step's results. sampled[request_id] = the tokens the step produced for each
        scheduled request that samples: the accepted draft tokens then one more token (a single
        token without speculation). Returns an output for every request that produced tokens or
        finished."""
        outs = [self._output(r, []) for r in self._finished_at_schedule]
        self._finished_at_schedule = []
        for s in output.scheduled:
            req = s.request
            if req.status is not Status.RUNNING:
                continue  # aborted during the step
            known = s.num_tokens - len(s.spec_token_ids)
            if not s.samples:
                req.num_computed = s.start + known
                self.kv.commit(req.request_id, req.token_ids, req.num_computed)
                continue
            new = sampled[req.request_id]
            if not 1 <= len(new) <= 1 + len(s.spec_token_ids):
                raise ValueError(
                    f"{req.request_id!r}: {len(new)} tokens for {len(s.spec_token_ids)} drafts"
                )
            assert list(s.spec_token_ids[: len(new) - 1]) == new[:-1], "accepted tokens != drafts"
            # KV is valid for the known tokens and the accepted drafts (which are now known).
            req.num_computed = s.start + known + len(new) - 1
            lps = (logprobs or {}).get(req.request_id) or [None] * len(new)
            added = []
            for tok, lp in zip(new, lps, strict=False):
                req.token_ids.append(tok)
                added.append(tok)
                if lp is not None:
                    req.logprobs.append(lp)
                if self._check_stop(req, tok):
                    break
            if not req.finished:
                self.kv.commit(req.request_id, req.token_ids, req.num_computed)
            outs.append(self._output(req, added))
        return outs

    # ---- async scheduling (engine/overlap.py) ---------------------------------------------------
    def ends_in_flight(self, req: Request) -> bool:
        """Whether a request's in-flight (PENDING) token is its last by length: max_tokens or
        max_model_len. `schedule` leaves it out (its next token would be dropped); the resolve
        of the step in flight finishes it. Never true without async scheduling, where update
        finishes a request at its last token."""
        return (
            bool(req.token_ids)
            and req.token_ids[-1] == PENDING
            and (
                req.num_output_tokens >= req.params.max_tokens
                or len(req.token_ids) >= self.config.max_model_len
            )
        )

    @property
    def finished_at_schedule(self) -> bool:
        """Whether the last `schedule` ended requests (cache full) that `update` reports."""
        return bool(self._finished_at_schedule)

    def advance(self, output: SchedulerOutput) -> None:
        """A step was launched and its tokens are not read back yet: a row that samples (a decode,
        or the prefill chunk that reaches the prompt's end) holds its token's place with PENDING,
        so that the next `schedule` runs the request as a decode of it (its id is taken on the
        device) and the step after that one's `resolve` fills it in; a prefill chunk short of the
        prompt's end counts as computed. KV stays uncommitted until `resolve`."""
        for s in output.scheduled:
            if s.spec_token_ids:
                raise ValueError(f"{s.request.request_id!r}: advance takes no draft tokens")
            if s.samples:
                s.request.token_ids.append(PENDING)
            s.request.num_computed = s.start + s.num_tokens

    def resolve(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[RequestOutput]:
        """`update` for a step that `advance` held open: each sampling row's PENDING id (at
        s.start + s.num_tokens) becomes its sampled token, then the stop checks and outputs run as
        in `update`; a prefill chunk short of the prompt's end commits its KV. Ids held for a
        later step are set aside meanwhile (counts, stop checks and outputs see only known
        tokens) and dropped when the request ends here: that step's token for it is not used."""
        outs = []
        for s in output.scheduled:
            req = s.request
            if req.status is not Status.RUNNING:
                continue  # aborted, or ended at an earlier resolve
            if not s.samples:
                self.kv.commit(req.request_id, req.token_ids, s.start + s.num_tokens)
                continue
            pos = s.start + s.num_tokens
            if pos >= len(req.token_ids) or req.token_ids[pos] != PENDING:
                raise ValueError(f"{req.request_id!r}: no pending token at position {pos}")
            later = req.token_ids[pos + 1 :]
            del req.token_ids[pos + 1 :]
            tok = sampled[req.request_id]
            req.token_ids[pos] = tok
            self._check_stop(req, tok)
            if not req.finished:
                self.kv.commit(req.request_id, req.token_ids, pos)
            outs.append(self._output(req, [tok]))
            if not req.finished:
                req.token_ids.extend(later)
        return outs

    @staticmethod
    def _output(req: Request, added: list[int]) -> RequestOutput:
        first = req.num_output_tokens == len(added)
        prompt_lps = None
        if req.params.prompt_logprobs is not None and (first or req.finished):
            prompt_lps = list(req.prompt_logprobs)
        return RequestOutput(
            req.request_id,
            added,
            req.text,
            req.finished,
            req.finish_reason,
            req.stop_reason,
            req.num_prompt_tokens,
            req.num_cached_tokens,
            req.num_output_tokens,
            req.token_ids,
            req.logprobs,
            len(req.logprobs),
            prompt_logprobs=prompt_lps,
        )

    def _check_stop(self, req: Request, tok: int) -> bool:
        """After appending tok: update the text and finish the request if a stop condition holds."""
        p = req.params
        if self.detokenize is not None:
            prev = len(req.text)
            if req.detok is None:
                req.detok = IncrementalDetokenizer(self.detokenize)
            req.text += req.detok.push((tok,))
            if p.stop:
                # only a match ending in the new text is new; start early enough to catch a stop
                # string that straddles the old and new text
                lo = max(0, prev - max(len(s) for s in p.stop) + 1)
                hits = [(req.text.find(s, lo), s) for s in p.stop]
                hits = [(i, s) for i, s in hits if i >= 0]
                if hits:
                    i, s = min(hits)
                    req.text = req.text[:i]
                    self._finish(req, "stop", s)
                    return True
        if tok in p.stop_token_ids:
            self._finish(req, "stop", tok)
            return True
        if tok in self.eos_token_ids and not p.ignore_eos:
            self._finish(req, "stop", tok)
            return True
        if req.num_output_tokens >= p.max_tokens or len(req.token_ids) >= self.config.max_model_len:
            self._finish(req, "length", None)
            return True
        return False
