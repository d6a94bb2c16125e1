"""What a prefill, decode or colocated replica runs, without Ray: an engine on its own thread.

`EngineLoop` owns one `Engine` and steps it on a background thread (a forward holds the GIL
little and the event loop must keep serving HTTP/handle calls meanwhile). Every engine call goes
through the loop's command queue and runs on that thread between steps, so the engine needs no
locks. Outputs reach asyncio consumers through per-request queues.

The three workers wrap it for the three roles; the Serve deployments in `moeray.actors` are thin
shells around them, and tests build them directly.
  * ColocatedWorker.generate: prefill and decode in one engine.
  * PrefillWorker.prefill: computes a prompt's KV (and its first token) and exports the rows the
    decode side lacks.
  * DecodeWorker.generate: imports the prefill's rows into its own pages and decodes; if the
    prefill or the transfer fails, it computes the prefill itself and the request still completes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import torch

from moeray.platform.config import ServeConfig
from moeray.platform.engine.disagg import KVRows
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.engine.step_graphs import graph_seconds
from moeray.platform.serve.generation_config import eos_token_ids
from moeray.platform.serve.http.protocol import (
    BackendOverloaded,
    GenerationRequest,
    GenerationStep,
)
from moeray.platform.serve.kv_transport.base import KVReceiver, KVSender
from moeray.platform.serve.kv_transport.object_store import ObjectStoreReceiver, ObjectStoreSender

log = logging.getLogger(__name__)


def sampling_params(req: GenerationRequest, *, max_tokens: int | None = None) -> SamplingParams:
    """The ingress enforces stop strings on the text itself (and closes the stream), so the
    engine needs no tokenizer for them."""
    p = req.params
    max_tokens = max_tokens or p.max_tokens
    return SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        seed=p.seed,
        max_tokens=max_tokens,
        min_tokens=min(p.min_tokens, max_tokens),
        stop_token_ids=p.stop_token_ids,
        logprobs=p.logprobs,
        prompt_logprobs=p.prompt_logprobs,
        ignore_eos=p.ignore_eos,
        repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        logit_bias=p.logit_bias,
        structured=p.structured,
    )


async def compile_grammar(loop: EngineLoop, req: GenerationRequest) -> None:
    """Compile the request's grammar off the engine thread (hundreds of ms for a large schema
    over a 129k vocabulary would stall every running request's step); the engine's add_request
    then finds it cached."""
    spec = req.params.structured
    if spec is not None:
        grammars = await loop.call(loop.engine.grammars)  # built once, on the engine thread
        await asyncio.to_thread(grammars.compile, spec)


class EngineLoop:
    """`collective=True`: the engine is one rank of an expert-parallel gang
    (engine/ep.py), whose step() every rank must keep calling, so the loop steps even without
    local work (at most every IDLE_WAIT_S while the whole gang is idle)."""

    IDLE_WAIT_S = 0.05

    def __init__(
        self,
        engine: Engine,
        *,
        max_waiting: int = 256,
        name: str = "engine",
        collective: bool = False,
    ) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.collective = collective
        self._commands: queue.Queue[Callable[[], object]] = queue.Queue()  # results unused
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"moeray-{name}", daemon=True)
        self._thread.start()

    # On the engine thread.
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.engine.has_unfinished()
                cmd = self._commands.get(timeout=0 if busy else self.IDLE_WAIT_S)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                cmd()
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self.collective or self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                except Exception as e:  # a failed step fails its requests, not the replica
                    log.exception("engine step failed")
                    for rid in list(self._streams):
                        self.engine.abort(rid)
                        self._deliver(rid, e)
                    continue
                for out in outputs:
                    self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: Any) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, q = target
        loop.call_soon_threadsafe(q.put_nowait, item)

    # On any thread.
    def call(self, fn: Callable[[], Any]) -> Awaitable[Any]:
        """Run fn on the engine thread between steps; await its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except BaseException as e:
                # Bound now: Python unbinds `e` when the except block ends, before the loop runs
                # this.
                loop.call_soon_threadsafe(_settle, fut, None, e)
            else:
                loop.call_soon_threadsafe(_settle, fut, result, None)

        self._commands.put(run)
        return fut

    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    def free_pages(self) -> int:
        return self.engine.kv.pool.num_available

    async def stream(self, request_id: str, start: Callable[[], Any]) -> AsyncGenerator[Any, None]:
        """Register a stream, run `start` (which adds the request) on the engine thread, then
        yield the request's outputs until it finishes. Closing the generator aborts the request,
        which frees its pages at once."""
        if self.num_waiting() >= self.max_waiting:
            raise BackendOverloaded(
                f"{self.num_waiting()} requests already wait in this replica", retry_after_s=1.0
            )
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        finished = False
        try:
            first = await self.call(start)
            if first is not None:
                yield first
                if first.finished:
                    finished = True
                    return
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(lambda: self.engine.abort(request_id))

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _step(out: Any) -> GenerationStep:
    reason = out.finish_reason if out.finished else None
    if reason == "abort":
        reason = "stop"
    n = len(out.new_token_ids)
    # RequestOutput.logprobs holds the whole output's so far; a step carries its new tokens' own.
    logprobs = tuple(out.logprobs[len(out.logprobs) - n :]) if out.logprobs and n else None
    first = out.num_output_tokens == n
    prompt_lps = tuple(out.prompt_logprobs) if out.prompt_logprobs is not None and first else None
    return GenerationStep(
        token_ids=tuple(out.new_token_ids),
        logprobs=logprobs,
        finish_reason=reason,
        prompt_logprobs=prompt_lps,
    )


class ColocatedWorker:
    """Prefill and decode in one engine (the baseline the P/D split is compared with)."""

    def __init__(self, engine: Engine, **loop_kwargs: Any) -> None:
        self.loop = EngineLoop(engine, name="colocated", **loop_kwargs)

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[GenerationStep, None]:
        engine = self.loop.engine
        await compile_grammar(self.loop, req)
        add = lambda: engine.add_request(list(req.prompt_ids), sampling_params(req), req.request_id)  # noqa: E731
        async with aclosing(self.loop.stream(req.request_id, lambda: add() and None)) as outs:
            async for out in outs:
                if out.new_token_ids or out.finished:
                    yield _step(out)


@dataclass(frozen=True)
class PrefillResult:
    """What the prefill side returns: its first sampled token and a KV ticket (the rows from
    `export_from`, or what the transport needs to fetch them; see serve/kv_transport/)."""

    first: GenerationStep
    kv: Any
    seconds: float  # prefill compute, queueing included, up to the rows being ready to send
    nbytes: int  # bytes of the exported rows
    transport: str


class PrefillWorker:
    def __init__(
        self, engine: Engine, *, sender: KVSender | None = None, **loop_kwargs: Any
    ) -> None:
        self.loop = EngineLoop(engine, name="prefill", **loop_kwargs)
        self.sender = sender if sender is not None else ObjectStoreSender()

    async def prefill(
        self, req: GenerationRequest, export_from: int, dest: Any = None
    ) -> PrefillResult:
        """Prefill `req`, export its KV rows from `export_from`, and hand them to the transport
        for the decode replica at `dest` (a kv_transport.base.DecodeEndpoint)."""
        t0 = time.perf_counter()
        engine = self.loop.engine
        rid = f"{req.request_id}-prefill"
        await compile_grammar(self.loop, req)

        def add() -> None:
            engine.add_request(
                list(req.prompt_ids),
                sampling_params(req, max_tokens=1),
                rid,
                export_kv_from=export_from,
            )

        result = None
        async with aclosing(self.loop.stream(rid, add)) as outs:
            async for out in outs:
                if out.finished:
                    result = out
        if result is None or result.kv_export is None:
            raise RuntimeError(
                f"prefill of {req.request_id!r} ended without KV "
                f"({result and result.finish_reason})"
            )
        seconds = time.perf_counter() - t0
        ticket = await self.sender.send(req.request_id, result.kv_export, dest)
        return PrefillResult(
            _step(result), ticket, seconds, result.kv_export.nbytes, self.sender.name
        )

    def queue_length(self) -> int:
        return self.loop.num_waiting() + self.loop.num_running()


@dataclass
class TransferRecord:
    """One request's KV transfer as the decode replica saw it. `seconds`: from the prefill side
    having the rows to the decode side holding them (the prefill call's wall time minus the
    prefill's own compute, plus the receive), so every transport is timed over the same span."""

    request_id: str
    bytes: int
    seconds: float
    recomputed: bool
    transport: str = "object_store"
    # The receive alone (after the ticket arrived): the data movement of rdt/channel; ~0 for the
    # object store, whose rows arrive inside the prefill call's reply.
    receive_seconds: float = 0.0


class DecodeWorker:
    """Decode with KV from a prefill replica. `fetch(req, export_from, endpoint)` returns a
    PrefillResult (over a Serve handle in production, a direct call in tests); `receiver`
    (serve/kv_transport/) turns its ticket into rows. A fetch that fails or has not returned
    within `prefill_timeout_s` (then cancelled) leaves the request to this engine's own prefill."""

    def __init__(
        self,
        engine: Engine,
        fetch: Callable[[GenerationRequest, int, Any], Awaitable[PrefillResult]],
        *,
        receiver: KVReceiver | None = None,
        on_transfer: Callable[[TransferRecord], None] | None = None,
        prefill_timeout_s: float = 300.0,
        **loop_kwargs: Any,
    ) -> None:
        if not prefill_timeout_s > 0:
            raise ValueError(f"prefill_timeout_s={prefill_timeout_s} must be > 0")
        self.loop = EngineLoop(engine, name="decode", **loop_kwargs)
        self.fetch = fetch
        self.prefill_timeout_s = prefill_timeout_s
        self.receiver = receiver if receiver is not None else ObjectStoreReceiver(engine.device)
        self.on_transfer = on_transfer
        self.transfers: list[TransferRecord] = []

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[GenerationStep, None]:
        engine = self.loop.engine
        prompt = list(req.prompt_ids)
        await compile_grammar(self.loop, req)
        if req.params.prompt_logprobs is not None:
            # Prompt logprobs need the logits of every prompt position, which only the engine
            # that prefills has: such a request prefills here (the prefill replica returns KV
            # and the first token only).
            params = sampling_params(req)
            add = lambda: engine.add_request(prompt, params, req.request_id) and None  # noqa: E731
            async with aclosing(self.loop.stream(req.request_id, add)) as outs:
                async for out in outs:
                    if out.new_token_ids or out.finished:
                        yield _step(out)
            return
        # Only the pages this replica lacks cross the wire: ask the prefill for rows from the end
        # of our cached prefix (whole pages; the last, partial page always travels).
        have = await self.loop.call(lambda: engine.cached_prefix_length(prompt))
        t0 = time.perf_counter()
        pre: PrefillResult | None = None
        rows: KVRows | None = None
        t_recv = t0
        # The channel transport posts its receive as soon as the prefill pushes the ticket to
        # our store's queue (same request id as the prefill's `send`), not when the reply
        # arrives; the other transports ignore this.
        self.receiver.expect(req.request_id)
        try:
            pre = await self._fetch(req, have)
            t_recv = time.perf_counter()
            rows = await self.receiver.receive(pre.kv)
        except asyncio.CancelledError:
            # The prefill may still send: its rows are received and dropped, so the send does not
            # wait out its timeout.
            self.receiver.cancel(req.request_id)
            raise
        except Exception as e:
            self.receiver.cancel(req.request_id)
            log.warning(
                "prefill/KV transfer for %s failed (%s: %s); recomputing the prefill here",
                req.request_id,
                type(e).__name__,
                e,
            )
        now = time.perf_counter()
        seconds = now - t0 - (pre.seconds if pre is not None else 0.0)
        receive_seconds = now - t_recv if rows is not None else 0.0
        params = sampling_params(req)
        transport = self.receiver.name

        def start():
            """On the engine thread: import the rows (an output for the first token), or fall
            back to a local prefill when there is nothing to import or the pages moved on."""
            if pre is not None and rows is not None:
                out = engine.add_prefilled_request(
                    prompt,
                    pre.first.token_ids[0],
                    rows,
                    params,
                    req.request_id,
                    first_logprobs=pre.first.logprobs[0] if pre.first.logprobs else None,
                )
                if out is not None:
                    self._record(
                        TransferRecord(
                            req.request_id, rows.nbytes, seconds, False, transport, receive_seconds
                        )
                    )
                    return out
                # Not placed (batch or pages full, or rows past our cached prefix): the engine has
                # queued the request for a normal prefill already.
            else:
                engine.add_request(prompt, params, req.request_id)
            self._record(TransferRecord(req.request_id, 0, seconds, True, transport))
            return None

        async with aclosing(self.loop.stream(req.request_id, start)) as outs:
            async for out in outs:
                if out.new_token_ids or out.finished:
                    yield _step(out)

    async def _fetch(self, req: GenerationRequest, have: int) -> PrefillResult:
        """The prefill replica's reply; past prefill_timeout_s the fetch is cancelled."""
        fetch = self.fetch(req, have, self.receiver.endpoint())
        try:
            return await asyncio.wait_for(fetch, self.prefill_timeout_s)
        except TimeoutError:
            msg = f"no prefill reply within prefill_timeout_s={self.prefill_timeout_s}"
            raise TimeoutError(msg) from None

    def _record(self, rec: TransferRecord) -> None:
        self.transfers.append(rec)
        del self.transfers[:-1000]  # a bounded history for stats()
        if self.on_transfer is not None:
            self.on_transfer(rec)

    def free_pages(self) -> int:
        return self.loop.free_pages()


class DecodeRoutingPolicy:
    """Which decode replica gets a request: the one holding the prompt's longest cached prefix
    (when it has the pages for the rest), else the one with the most free KV pages.

    Prefix ownership is remembered here, on the routing side, from where requests were sent:
    page-aligned prefixes are chain-hashed like the engine's prefix cache (hash of a page =
    hash(previous page's hash, its tokens)), and each hash maps to the replica that last got a
    prompt with it. Free pages come from the replicas' periodic stats (`observe`); between two
    reports the pages a routed prompt needs are debited, so a burst does not all go to the
    replica that looked emptiest at the last report. No Ray here: the Serve router wraps it.
    """

    def __init__(self, page_size: int, *, max_entries: int = 65536) -> None:
        from collections import OrderedDict

        if page_size < 1 or max_entries < 1:
            raise ValueError(f"page_size={page_size} and max_entries={max_entries} must be >= 1")
        self.page_size = page_size
        self.max_entries = max_entries
        self._owner: OrderedDict[int, str] = OrderedDict()
        self._free: dict[str, int] = {}
        self._seq: dict[str, Any] = {}
        self._debit: dict[str, int] = {}

    def prefix_hashes(self, prompt: tuple[int, ...] | list[int]) -> list[int]:
        """One chained hash per full page of the prompt, excluding the last token (the engine
        never caches it either, so a prompt of exactly k pages has k-1 cacheable pages)."""
        out, h = [], 0
        n_full = (len(prompt) - 1) // self.page_size if prompt else 0
        for i in range(n_full):
            h = hash((h, tuple(prompt[i * self.page_size : (i + 1) * self.page_size])))
            out.append(h)
        return out

    def observe(self, replica: str, free_pages: int, seq: Any) -> None:
        if self._seq.get(replica) != seq:
            self._seq[replica] = seq
            self._free[replica] = int(free_pages)
            self._debit[replica] = 0

    def free_pages(self, replica: str) -> float:
        if replica not in self._free:
            return math.inf  # no report yet: a new replica, its cache empty
        return self._free[replica] - self._debit.get(replica, 0)

    def rank(self, prompt: tuple[int, ...] | list[int], replicas: list[str]) -> list[str]:
        """`replicas` in preference order."""
        order = sorted(replicas, key=lambda r: (-self.free_pages(r), r))
        hashes = self.prefix_hashes(prompt)
        live = set(replicas)
        for depth in range(len(hashes), 0, -1):
            owner = self._owner.get(hashes[depth - 1])
            if owner in live:
                # Affinity only when the owner has the pages for the uncached rest of the prompt.
                rest = -(-(len(prompt) - depth * self.page_size) // self.page_size)
                if self.free_pages(owner) >= rest:
                    order.remove(owner)
                    order.insert(0, owner)
                break
        return order

    def routed(self, prompt: tuple[int, ...] | list[int], replica: str) -> None:
        hashes = self.prefix_hashes(prompt)
        cached = 0
        for h in hashes:
            if self._owner.get(h) == replica:
                cached += 1
            self._owner[h] = replica
            self._owner.move_to_end(h)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)
        need = -(-len(prompt) // self.page_size) - cached
        self._debit[replica] = self._debit.get(replica, 0) + max(need, 0)

    def forget(self, replica: str) -> None:
        for d in (self._free, self._seq, self._debit):
            d.pop(replica, None)
        for h in [h for h, r in self._owner.items() if r == replica]:
            del self._owner[h]


def device_and_dtype(cfg: ServeConfig) -> tuple[str, torch.dtype]:
    """The serve config's device ("auto": cuda when this process sees a GPU) and dtype ("auto":
    bfloat16 on GPU, float32 on CPU)."""
    device = (
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = {
        "auto": torch.bfloat16 if device == "cuda" else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[cfg.dtype]
    return device, dtype


def engine_config(cfg: ServeConfig, device: str, *, decodes: bool = True) -> EngineConfig:
    return EngineConfig(
        page_size=cfg.page_size,
        num_pages=cfg.num_pages,
        gpu_memory_utilization=cfg.memory_share(),
        enable_prefix_caching=cfg.enable_prefix_caching,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=cfg.max_model_len,
        num_speculative_tokens=cfg.num_speculative_tokens,
        async_scheduling=cfg.async_scheduling,
        async_scheduling_sampled=cfg.async_scheduling_sampled,
        async_scheduling_prefill=cfg.async_scheduling_prefill,
        async_scheduling_spec=cfg.async_scheduling_spec,
        prefill_graph_tokens=cfg.prefill_graph_tokens,
        prefill_graph_seqs=cfg.prefill_graph_seqs,
        use_cuda_graphs=device == "cuda",
        capture_decode_graphs=decodes,
        eos_token_ids=eos_token_ids(cfg.model),  # generation_config.json's too, as in vLLM
    )


def make_engine(cfg: ServeConfig, *, decodes: bool = True) -> Engine:
    """Load the model directory into an engine as the serve config says (device, dtype, pages).
    `decodes=False` (a prefill replica) captures the prefill-chunk CUDA graphs at start and no
    decode graph: its requests end at their first token. Logs the start's seconds and its CUDA
    graphs by kind."""
    device, dtype = device_and_dtype(cfg)
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(
        cfg.model,
        engine_config(cfg, device, decodes=decodes),
        device=device,
        dtype=dtype,
        keep_fp8=cfg.weights == "fp8",
    )
    # What a replica's start went to: a first engine took 16-59 s at Moonlight / V3 widths on
    # an H100 (33 graphs, a cold Triton cache), nearly all of it the graphs' warm-up forwards,
    # where Triton compiles (Moonlight FP8: 41.5 of 58.5 s; capture ~1-3 s).
    graphs = "; ".join(
        f"{kind} {int(k['graphs'])} in {k['seconds']:.1f} s ({k['warmup_s']:.1f} s warm-up)"
        for kind, k in graph_seconds(engine.runner.graphs).items()
    )
    log.info(
        "engine ready in %.1f s; CUDA graphs %s%s",
        time.perf_counter() - t0,
        engine.runner.graph_status,
        f": {graphs}" if graphs else "",
    )
    return engine


def freeze_gc() -> None:
    """Collect once, then move every object alive (the model, the engine, its graphs: ~190K
    tracked objects on a Moonlight-layered engine) into the collector's permanent generation, as
    vLLM does after start: a full collection, which took 88 ms over those objects on the CPU
    machine, then skips them instead of stalling a decode step. Serve replicas call it once their
    engine is up; objects made later are collected as usual."""
    gc.collect()
    gc.freeze()
