"""The inference engine: scheduler + paged cache + runner + sampler (+ MTP drafts), without Ray.

Use:
    engine = Engine.from_pretrained(hf_dir, EngineConfig(...), device="cuda", dtype=torch.bfloat16)
    outs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_tokens=32))
or drive it step by step (what a Serve replica does): add_request / abort / step.

Each step: the scheduler picks the batch (continuous batching, chunked prefill), the runner runs
the main model over it, requests that ask for prompt logprobs get those of the prompt positions
just computed, each request that reached its last known token gets a token sampled from its
processed logits (min_tokens, logit_bias, penalties: one batched pass; with speculative decoding,
its drafts are verified against the same processed distribution, then one more token), the
scheduler applies stops and frees pages, and the MTP drafter proposes the next drafts. Requests
with a `structured` spec sample under their grammar's token mask (engine/grammar.py, one matcher
per request, applied before the processing) and take no drafts.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moeray.kernels.common import switched_off, switched_on
from moeray.platform.checkpoint import load_model
from moeray.platform.engine.disagg import KVRows
from moeray.platform.engine.engine_config import EngineConfig
from moeray.platform.engine.kv_cache import (
    CacheShape,
    KVCacheManager,
    PagedKVStorage,
    device_budget_bytes,
    num_pages_for_budget,
)
from moeray.platform.engine.overlap import DecodeOverlap
from moeray.platform.engine.runner import ForwardResult, ModelRunner
from moeray.platform.engine.sampler import (
    History,
    Sampler,
    SamplingParams,
    last_rows,
    make_generator,
    topk_logprobs,
)
from moeray.platform.engine.scheduler import (
    Request,
    RequestOutput,
    ScheduledSeq,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from moeray.platform.engine.spec_step import SPEC_KINDS
from moeray.platform.engine.speculative import MTPDrafter, greedy_targets, require_mtp, verify
from moeray.platform.model.merge import merge_projections, merged_parts
from moeray.platform.model.quant import keep_bf16_copies
from moeray.platform.model.shared_fuse import fuse_shared_experts
from moeray.platform.model.shared_stream import overlap_shared_experts
from moeray.platform.tokenizer_dir import has_tokenizer, load_tokenizer_dir

if TYPE_CHECKING:  # at run time imported where first needed: see Engine.grammars
    from moeray.platform.engine.grammar import GrammarSet

# The default sampling of add_request and generate (frozen, so one shared instance is safe).
DEFAULT_PARAMS = SamplingParams()


def _generator(req: Request) -> torch.Generator:
    """The request's sampling generator: the engine gives one to every request it adds."""
    if req.generator is None:
        raise RuntimeError(f"request {req.request_id!r} has no generator (not added by the engine)")
    return req.generator


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0  # computed prompt tokens (prefill work, after prefix-cache hits)
    generated_tokens: int = 0
    forward_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def decode_modules(model: nn.Module, drafting: bool) -> list[nn.Module]:
    """The modules of `model` that a decode step may run: all but the parts of merged projections
    (their MergedLinear runs instead: model/merge.py) and, unless `drafting`, the MTP modules."""
    idle = {id(m) for m in merged_parts(model)}
    if not drafting:
        idle |= {id(m) for m in getattr(model, "mtp", nn.ModuleList()).modules()}
    return [m for m in model.modules() if id(m) not in idle]


class Engine:
    def __init__(self, model, config: EngineConfig = EngineConfig(), *, tokenizer=None) -> None:
        self.model = model.eval()
        # The shared experts as extra experts of each MoE layer's fused kernels (model/shared_fuse
        # .py: 3 decode launches fewer per MoE layer), kept where an earlier engine on this model
        # fused them. {MoE module: None, or why its shared experts run apart}.
        self.fused_shared = fuse_shared_experts(model)
        # Then each pair of projections that read one input as one GEMM (model/merge.py: 2 decode
        # launches fewer per layer in bf16, 4 in FP8; not the shared experts' rows of those
        # stacks), before any graph captures the weights. {owner: None, or why apart}.
        self.merged_projections = merge_projections(model)
        # Past 16 tokens, on a second CUDA stream beside the routed ones (model/shared_stream.py).
        self.shared_stream = overlap_shared_experts(model)
        self.config = config
        self.model_config = model.config
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype if param.is_floating_point() else torch.float32
        self.tokenizer = tokenizer
        spec = config.num_speculative_tokens
        if spec:
            require_mtp(model)  # before the cache is allocated
        # The bf16 copies that small FP8 layers run from at 9-64 rows (model/quant.py), made
        # before the KV cache is sized from the free memory; their bytes. Not for layers that
        # never run at those rows: the parts of merged projections, the MTP module unless drafting;
        # none for an fp32 model (quant.fp8_as_bf16).
        self.fp8_as_bf16_bytes = 0
        if self.device.type == "cuda":
            self.fp8_as_bf16_bytes = keep_bf16_copies(decode_modules(model, spec > 0), self.dtype)
        shape = CacheShape.from_model_config(
            model.config,
            page_size=config.page_size,
            dtype_bytes=torch.tensor([], dtype=self.dtype).element_size(),
            include_mtp=spec > 0,
        )
        if config.num_pages is not None:
            num_pages = config.num_pages
        else:
            budget = device_budget_bytes(
                self.device,
                fraction=config.memory_fraction,
                memory_utilization=config.gpu_memory_utilization,
                cpu_budget_bytes=config.cpu_cache_bytes,
            )
            num_pages = num_pages_for_budget(shape, budget) - 1  # one page kept as scratch
            if num_pages < 1:
                share = config.gpu_memory_utilization if self.device.type == "cuda" else None
                raise ValueError(
                    f"{budget} bytes hold no KV page of {shape.bytes_per_page} bytes"
                    + (f" (gpu_memory_utilization={share}: raise it)" if share else "")
                )
        self.cache_shape = shape
        capacity = num_pages * config.page_size
        max_len = config.max_model_len or model.config.max_position_embeddings
        self.max_model_len = min(max_len, model.config.max_position_embeddings, capacity)
        self.kv = KVCacheManager(
            num_pages, config.page_size, enable_prefix_caching=config.enable_prefix_caching
        )
        # One extra page: CUDA-graph padding rows write there (no block table holds it).
        self.storage = PagedKVStorage(shape, num_pages + 1, device=self.device, dtype=self.dtype)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                num_speculative_tokens=spec,
            ),
            self.kv,
            eos_token_ids=[
                *([] if model.config.eos_token_id is None else [model.config.eos_token_id]),
                *config.eos_token_ids,
            ],
            detokenize=self._detokenize if tokenizer is not None else None,
        )
        self.runner = ModelRunner(
            model,
            self.kv,
            self.storage,
            max_model_len=self.max_model_len,
            use_cuda_graphs=config.use_cuda_graphs,
            graph_batch_sizes=config.graph_batch_sizes,
            attention=config.attention,
            prefill_attention=config.prefill_attention,
            prefill_graph_tokens=config.prefill_graph_tokens,
            prefill_graph_seqs=config.prefill_graph_seqs,
            max_chunk_tokens=min(config.max_num_batched_tokens, self.max_model_len),
            max_decode_tokens=1 + spec,
        )
        self.sampler = Sampler(self.scheduler.eos_token_ids)
        self.drafter = MTPDrafter(model, self.runner, spec) if spec else None
        overlap = config.async_scheduling
        if overlap is None:
            overlap = self.device.type == "cuda"
        if config.capture_graphs_at_start:
            self.runner.capture_graphs(
                config.max_num_seqs,
                model.mtp[0] if spec else None,
                self.dtype,
                decode=config.capture_decode_graphs,
                spec=self._spec_graph_kinds(overlap),
            )
        self._grammar_set: GrammarSet | None = None  # built at the first structured request
        self._rng = torch.Generator().manual_seed(config.seed)
        self._ids = itertools.count()
        self.stats = EngineStats()
        # P/D: request id -> first prompt position to export; exported rows until step() returns.
        self._exports: dict[str, int] = {}
        self._exported: dict[str, KVRows] = {}
        self.scheduler.before_free = self._export_before_free
        self._overlap = DecodeOverlap(self) if overlap else None

    def _spec_graph_kinds(self, overlap: bool) -> tuple[str, ...]:
        """The whole-step graphs (spec_step.py) MTP steps under async scheduling replay: greedy
        steps' unless MOERAY_FUSED_SPEC_GRAPH=0 (the A/B switch: two graphs and eager glue), and
        sampled steps' with MOERAY_FUSED_SPEC_GRAPH_SAMPLED=1 (opt-in, not yet timed on a GPU)."""
        if not (overlap and self.config.async_scheduling_spec) or switched_off("SPEC_GRAPH"):
            return ()
        sampled = self.config.async_scheduling_sampled and switched_on("SPEC_GRAPH_SAMPLED")
        return SPEC_KINDS if sampled else SPEC_KINDS[:1]

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: EngineConfig = EngineConfig(),
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        tokenizer=None,
        keep_fp8: bool = False,
    ) -> Engine:
        """An engine over the HF directory at `path`; `keep_fp8` keeps an FP8 checkpoint's e4m3
        weights (load_model)."""
        _cfg, model = load_model(path, device=device, dtype=dtype, keep_fp8=keep_fp8)
        if tokenizer is None and has_tokenizer(path):
            tokenizer = load_tokenizer_dir(path)
        return cls(model, config, tokenizer=tokenizer)

    # ---- tokenizer ---------------------------------------------------------------------------
    def _detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: pass token ids")
        enc = self.tokenizer.encode(text)
        return list(enc.ids if hasattr(enc, "ids") else enc)

    # ---- grammar-constrained decoding -----------------------------------------------------------
    def grammars(self) -> GrammarSet:
        """The engine's GrammarSet (engine/grammar.py), built once from its tokenizer."""
        if self._grammar_set is None:
            if self.tokenizer is None:
                raise ValueError(
                    "structured output needs the engine's tokenizer (the model directory's "
                    "tokenizer.json or tiktoken.model)"
                )
            # Imported here: xgrammar is a native extension only engines that constrain load.
            from moeray.platform.engine.grammar import GrammarSet

            eos = self.model_config.eos_token_id
            self._grammar_set = GrammarSet.from_tokenizer(
                self.tokenizer, self.model_config.vocab_size, [] if eos is None else [eos]
            )
        return self._grammar_set

    def _add_grammar(self, rid: str, params: SamplingParams) -> None:
        if params.structured is not None:
            self.grammars().add(rid, params.structured)

    def _token_mask(self, seqs: Sequence[Any]) -> torch.Tensor | None:
        if self._grammar_set is None:
            return None
        return self._grammar_set.bitmask([s.request.request_id for s in seqs], self.device)

    def _drop_grammars(self, outs: list[RequestOutput]) -> list[RequestOutput]:
        if self._grammar_set is not None:
            for o in outs:
                if o.finished:
                    self._grammar_set.remove(o.request_id)
        return outs

    # ---- requests ------------------------------------------------------------------------------
    def _check_ids(self, prompt: Sequence[int] | str, params: SamplingParams) -> list[int]:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        V = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= int(t) < V]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {V})")
        if params.max_token_id() >= V:
            raise ValueError(
                f"stop_token_ids {list(params.stop_token_ids)} / logit_bias token ids "
                f"{[t for t, _ in params.logit_bias][:5]} must be in the vocabulary [0, {V})"
            )
        return ids

    def add_request(
        self,
        prompt: Sequence[int] | str,
        params: SamplingParams = DEFAULT_PARAMS,
        request_id: str | None = None,
        *,
        export_kv_from: int | None = None,
    ) -> str:
        """Queue a request. With `export_kv_from` (a prefill replica), the finished request's
        output carries `kv_export`: the KV rows of prompt tokens [export_kv_from, P)."""
        ids = self._check_ids(prompt, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if export_kv_from is not None and not 0 <= export_kv_from < len(ids):
            raise ValueError(
                f"export_kv_from={export_kv_from} must be in [0, {len(ids)}) for a "
                f"{len(ids)}-token prompt"
            )
        self._add_grammar(rid, params)  # compiles (cached): a bad schema fails before queueing
        try:
            self.scheduler.add_request(rid, ids, params, make_generator(params.seed, self._rng))
        except BaseException:
            self.abort(rid)
            raise
        if export_kv_from is not None:
            self._exports[rid] = export_kv_from
        return rid

    # ---- prefill/decode disaggregation ----------------------------------------------------------
    def _export_before_free(self, req) -> None:
        start = self._exports.pop(req.request_id, None)
        P = len(req.prompt_token_ids)
        if start is None or req.num_computed < P:
            return  # not exported, or aborted before its prompt was computed
        slots = torch.tensor(self.kv.slots(req.request_id, start, P), device=self.device)
        rows = [self.storage.read(layer, slots) for layer in range(self.storage.shape.num_layers)]
        self._exported[req.request_id] = KVRows(
            start,
            torch.stack([kv for kv, _ in rows]).clone(),
            torch.stack([pe for _, pe in rows]).clone(),
        )

    def _attach_exports(self, outs: list[RequestOutput]) -> list[RequestOutput]:
        if not self._exported:
            return outs
        return [
            dataclasses.replace(o, kv_export=self._exported.pop(o.request_id))
            if o.request_id in self._exported
            else o
            for o in outs
        ]

    def cached_prefix_length(self, prompt: Sequence[int]) -> int:
        """Prompt tokens this engine's prefix cache holds now (whole pages)."""
        return self.kv.match_length(list(prompt))

    def add_prefilled_request(
        self,
        prompt: Sequence[int],
        first_token: int,
        rows: KVRows,
        params: SamplingParams = DEFAULT_PARAMS,
        request_id: str | None = None,
        *,
        first_logprobs=None,
    ):
        """Continue a request whose prompt was prefilled elsewhere: write `rows` (prompt tokens
        [rows.start, P)) into this engine's pages and join the running batch with `first_token`.
        Returns the first token's RequestOutput, or None when the rows could not be used (they
        start after this engine's cached prefix, or no pages are free): then the request is queued
        for a normal prefill here, so it completes either way."""
        ids = self._check_ids(prompt, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        P = len(ids)
        if rows.end != P:
            raise ValueError(
                f"KV rows cover tokens [{rows.start}, {rows.end}) but the prompt has {P}"
            )
        layers = min(rows.kv_LTC.shape[0], self.storage.shape.num_layers)

        def import_rows(num_cached: int) -> bool:
            if rows.start > num_cached:
                return False  # our cached prefix was evicted since the prefill was asked
            slots = torch.tensor(self.kv.slots(rid, num_cached, P), device=self.device)
            off = num_cached - rows.start
            for layer in range(layers):
                self.storage.write(
                    layer,
                    slots,
                    rows.kv_LTC[layer, off:].to(self.device),
                    rows.pe_LTR[layer, off:].to(self.device),
                )
            return True

        self._add_grammar(rid, params)
        out = self.scheduler.add_prefilled(
            rid,
            ids,
            params,
            make_generator(params.seed, self._rng),
            first_token,
            first_logprobs,
            import_rows,
        )
        if out is not None and self._grammar_set is not None:
            # The prefill engine sampled first_token under the same grammar.
            self._grammar_set.accept(rid, [first_token])
            self._drop_grammars([out])
        return out

    def abort(self, request_id: str) -> bool:
        if self._grammar_set is not None:
            self._grammar_set.remove(request_id)
        self._exports.pop(request_id, None)
        self._exported.pop(request_id, None)
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def async_scheduling(self) -> bool:
        """Whether steps run with async scheduling (`EngineConfig.async_scheduling`, resolved)."""
        return self._overlap is not None

    # ---- one step --------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        if self._overlap is not None:
            return self._overlap.step()
        return self._step_scheduled(self.scheduler.schedule())

    def _step_scheduled(self, out: SchedulerOutput) -> list[RequestOutput]:
        """Run a scheduled step to its outputs: forward, sampling, the scheduler's update."""
        if not out.scheduled:
            return self._drop_grammars(self._attach_exports(self.scheduler.update(out, {})))
        t0 = time.perf_counter()
        fwd = self.runner.execute(out.scheduled)
        sampled: dict[str, list[int]] = {}
        logprobs: dict[str, list] = {}
        self._record_prompt_logprobs(out.scheduled, fwd)
        plain = [i for i, s in enumerate(out.scheduled) if s.samples and not s.spec_token_ids]
        if plain:
            seqs = [out.scheduled[i] for i in plain]
            rows = last_rows([fwd.logits[i] for i in plain])
            params = [s.request.params for s in seqs]
            hist = None
            if any(p.processes_logits for p in params):
                hist = [self._history(s.request) for s in seqs]
            res = self.sampler(
                rows,
                params,
                [_generator(s.request) for s in seqs],
                hist,
                token_mask_BW=self._token_mask(seqs),
            )
            for s, tok, lp in zip(seqs, res.token_ids, res.logprobs, strict=True):
                sampled[s.request.request_id] = [tok]
                logprobs[s.request.request_id] = [lp]
                if self._grammar_set is not None:
                    self._grammar_set.accept(s.request.request_id, [tok])
        spec = [i for i, s in enumerate(out.scheduled) if s.samples and s.spec_token_ids]
        target_logits = self._spec_logits(out.scheduled, spec, fwd)
        greedy = [i for i in spec if out.scheduled[i].request.params.greedy]
        drafter = self.drafter
        chained = None  # the MTP forward before verifying: one sync a step (MTPDrafter.chain)
        if drafter is not None and drafter.chains(out.scheduled):
            pairs, chained = drafter.chain(out.scheduled, fwd.logits, fwd.hidden)
            targets = dict(enumerate(pairs))
        else:
            targets = dict(
                zip(greedy, greedy_targets([target_logits[i] for i in greedy]), strict=True)
            )
        for i in spec:
            s = out.scheduled[i]
            assert self.drafter is not None  # drafts come only from the drafter
            toks, lps = verify(
                target_logits[i],
                s.spec_token_ids,
                s.request.params,
                _generator(s.request),
                targets.get(i),
                raw_logits_JV=fwd.logits[i],
                num_verdicts=self.drafter.k,
            )
            sampled[s.request.request_id] = toks
            logprobs[s.request.request_id] = lps
            self.drafter.record(len(s.spec_token_ids), len(toks) - 1)
        outs = self._drop_grammars(
            self._attach_exports(self.scheduler.update(out, sampled, logprobs))
        )
        if drafter is not None and chained is not None:
            drafter.assign(out.scheduled, chained, self.max_model_len)
        elif drafter is not None:
            drafter.propose(out.scheduled, fwd.hidden, self.max_model_len)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.forward_seconds += time.perf_counter() - t0
        self.stats.steps += 1
        self.stats.prompt_tokens += sum(s.num_tokens for s in out.scheduled if not s.is_decode)
        self.stats.generated_tokens += sum(len(v) for v in sampled.values())
        return outs

    def _history(self, req: Request, drafts: Sequence[int] = ()) -> History:
        """What the request's logits processing reads: the prompt only for the repetition
        penalty (uploaded once per request), the output (with drafts) for the rest."""
        prompt: Sequence[int] | torch.Tensor = ()
        if req.params.repetition_penalty != 1.0:
            if req.prompt_ids_tensor is None:
                req.prompt_ids_tensor = torch.tensor(req.prompt_token_ids, device=self.device)
            prompt = req.prompt_ids_tensor
        return History(prompt, req.output_token_ids + list(drafts))

    def _spec_logits(
        self, scheduled: Sequence[ScheduledSeq], spec: Sequence[int], fwd: ForwardResult
    ) -> dict[int, torch.Tensor]:
        """The logits each verifying sequence samples from: its raw [J, V] rows, or, when its
        params process logits, those rows processed in one batched pass, row j with the drafts
        before it counted as output (what plain decoding would have seen there)."""
        out = {i: fwd.logits[i] for i in spec}
        proc = [i for i in spec if scheduled[i].request.params.processes_logits]
        if not proc:
            return out
        params, hist = [], []
        for i in proc:
            s = scheduled[i]
            for j in range(len(s.spec_token_ids) + 1):
                params.append(s.request.params)
                hist.append(self._history(s.request, s.spec_token_ids[:j]))
        rows = torch.cat([fwd.logits[i] for i in proc])
        processed = self.sampler.process(rows, params, hist)
        for i, chunk in zip(
            proc, processed.split([fwd.logits[i].shape[0] for i in proc]), strict=True
        ):
            out[i] = chunk
        return out

    def _record_prompt_logprobs(self, scheduled: Sequence[ScheduledSeq], fwd: ForwardResult):
        """Prompt logprobs of the prompt positions this step computed, for the requests that ask
        for them: the logits at position q score prompt token q + 1. A preempted request
        recomputes from 0 and keeps the entries it has."""
        for i, s in enumerate(scheduled):
            req = s.request
            if not req.needs_prompt_logprobs:
                continue
            have = len(req.prompt_logprobs)  # entries for prompt tokens [0, have)
            lo = have - 1 - s.start  # first row whose target has no entry yet
            known = s.num_tokens - len(s.spec_token_ids)
            hi = min(known, req.num_prompt_tokens - 1 - s.start)
            if lo < 0:
                raise RuntimeError(
                    f"{req.request_id!r}: prompt logprobs missing before position {s.start}"
                )
            if hi <= lo:
                continue
            lg = fwd.logits[i][lo:hi]
            first = s.start + lo + 1
            targets = torch.tensor(req.prompt_token_ids[first : first + hi - lo], device=lg.device)
            k = req.params.prompt_logprobs
            req.prompt_logprobs.extend(topk_logprobs(lg, targets, [k] * (hi - lo)))

    def generate(
        self,
        prompts: Sequence[Sequence[int] | str],
        params: SamplingParams | Sequence[SamplingParams] = DEFAULT_PARAMS,
    ) -> list[RequestOutput]:
        """Run the prompts to completion (with whatever else is queued); outputs in prompt order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for o in self.step():
                if o.finished:
                    final[o.request_id] = o
            if not self.has_unfinished() and len(final) < len(ids):
                raise RuntimeError("engine idle with unfinished requests")
        return [final[i] for i in ids]

    def metrics(self) -> dict[str, Any]:
        m = {
            "steps": self.stats.steps,
            "num_pages": self.kv.num_pages,
            "free_pages": self.kv.pool.num_available,
            "prefix_hit_rate": self.kv.prefix_hit_rate,
            "preemptions": self.scheduler.num_preemptions,
            "cuda_graphs": self.runner.graph_status,
            "attention_calls": dict(self.runner.attention_calls),
            "chunk_graph_replays": self.runner.chunk_graph_replays,
            "async_drains": self._overlap.drains if self._overlap is not None else 0,
        }
        if self.drafter is not None:
            m["mtp"] = self.drafter.stats.as_dict()
        return m
