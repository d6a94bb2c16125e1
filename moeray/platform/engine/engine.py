"""The inference engine: scheduler + paged cache + runner + sampler (+ MTP drafts), without Ray.

Use:
    engine = Engine.from_pretrained(hf_dir, EngineConfig(...), device="cuda", dtype=torch.bfloat16)
    outs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_tokens=32))
or drive it step by step (what a Serve replica does): add_request / abort / step.

Each step: the scheduler picks the batch (continuous batching, chunked prefill), the runner runs
the main model over it, each request that reached its last known token gets a token (or, with
speculative decoding, its accepted drafts plus one), the scheduler applies stops and frees pages,
and the MTP drafter proposes the next drafts.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from moeray.platform.engine.kv_cache import (
    CacheShape, KVCacheManager, PagedKVStorage, device_budget_bytes, num_pages_for_budget)
from moeray.platform.engine.runner import ModelRunner
from moeray.platform.engine.sampler import Sampler, SamplingParams, make_generator
from moeray.platform.engine.scheduler import RequestOutput, Scheduler, SchedulerConfig
from moeray.platform.engine.speculative import MTPDrafter, verify


@dataclass(frozen=True)
class EngineConfig:
    page_size: int = 64
    # Pages in the cache; None sizes it from memory: memory_fraction of free GPU memory, or
    # cpu_cache_bytes on CPU.
    num_pages: int | None = None
    memory_fraction: float = 0.9
    cpu_cache_bytes: int = 256 * 1024**2
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    # None: the model's max_position_embeddings, capped by what the cache holds.
    max_model_len: int | None = None
    num_speculative_tokens: int = 0
    enable_prefix_caching: bool = True
    use_cuda_graphs: bool = True
    graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    attention: str = "auto"  # "kernel" (paged MLA kernel via cache.attend), "gather", "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages={self.num_pages} must be >= 1 or None")
        if self.page_size < 1:
            raise ValueError(f"page_size={self.page_size} must be >= 1")
        if self.num_speculative_tokens not in (0, 1):
            raise ValueError(f"num_speculative_tokens={self.num_speculative_tokens}: accepted 0 "
                             "(off) or 1 (one MTP draft per step)")


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0  # computed prompt tokens (prefill work, after prefix-cache hits)
    generated_tokens: int = 0
    forward_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Engine:
    def __init__(self, model, config: EngineConfig = EngineConfig(), *, tokenizer=None) -> None:
        self.model = model.eval()
        self.config = config
        self.model_config = model.config
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype if param.is_floating_point() else torch.float32
        self.tokenizer = tokenizer
        spec = config.num_speculative_tokens
        shape = CacheShape.from_model_config(
            model.config, page_size=config.page_size,
            dtype_bytes=torch.tensor([], dtype=self.dtype).element_size(), include_mtp=spec > 0)
        if config.num_pages is not None:
            num_pages = config.num_pages
        else:
            budget = device_budget_bytes(self.device, fraction=config.memory_fraction,
                                         cpu_budget_bytes=config.cpu_cache_bytes)
            num_pages = num_pages_for_budget(shape, budget) - 1  # one page kept as scratch
            if num_pages < 1:
                raise ValueError(f"{budget} bytes hold no KV page of {shape.bytes_per_page} bytes")
        self.cache_shape = shape
        capacity = num_pages * config.page_size
        max_len = config.max_model_len or model.config.max_position_embeddings
        self.max_model_len = min(max_len, model.config.max_position_embeddings, capacity)
        self.kv = KVCacheManager(num_pages, config.page_size,
                                 enable_prefix_caching=config.enable_prefix_caching)
        # One extra page: CUDA-graph padding rows write there (no block table holds it).
        self.storage = PagedKVStorage(shape, num_pages + 1, device=self.device, dtype=self.dtype)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs,
                            max_num_batched_tokens=config.max_num_batched_tokens,
                            max_model_len=self.max_model_len, num_speculative_tokens=spec),
            self.kv,
            eos_token_ids=[] if model.config.eos_token_id is None else [model.config.eos_token_id],
            detokenize=self._detokenize if tokenizer is not None else None)
        self.runner = ModelRunner(model, self.kv, self.storage, max_model_len=self.max_model_len,
                                  use_cuda_graphs=config.use_cuda_graphs,
                                  graph_batch_sizes=config.graph_batch_sizes,
                                  attention=config.attention)
        self.sampler = Sampler()
        self.drafter = MTPDrafter(model, self.runner, spec) if spec else None
        self._rng = torch.Generator().manual_seed(config.seed)
        self._ids = itertools.count()
        self.stats = EngineStats()

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig = EngineConfig(), *,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        tokenizer=None) -> "Engine":
        from moeray.platform.checkpoint import load_model

        _cfg, model = load_model(path, device=device, dtype=dtype)
        if tokenizer is None and (Path(path) / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        return cls(model, config, tokenizer=tokenizer)

    # ---- tokenizer ---------------------------------------------------------------------------
    def _detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: pass token ids")
        enc = self.tokenizer.encode(text)
        return list(enc.ids if hasattr(enc, "ids") else enc)

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, prompt: Sequence[int] | str, params: SamplingParams = SamplingParams(),
                    request_id: str | None = None) -> str:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        V = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= int(t) < V]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {V})")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        self.scheduler.add_request(rid, ids, params, make_generator(params.seed, self._rng))
        return rid

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step --------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if not out.scheduled:
            return self.scheduler.update(out, {})
        t0 = time.perf_counter()
        fwd = self.runner.execute(out.scheduled)
        sampled: dict[str, list[int]] = {}
        logprobs: dict[str, list] = {}
        plain = [i for i, s in enumerate(out.scheduled) if s.samples and not s.spec_token_ids]
        if plain:
            seqs = [out.scheduled[i] for i in plain]
            rows = torch.stack([fwd.logits[i][-1] for i in plain])
            res = self.sampler(rows, [s.request.params for s in seqs],
                               [s.request.generator for s in seqs])
            for s, tok, lp in zip(seqs, res.token_ids, res.logprobs):
                sampled[s.request.request_id] = [tok]
                logprobs[s.request.request_id] = [lp]
        for i, s in enumerate(out.scheduled):
            if s.samples and s.spec_token_ids:
                toks, lps = verify(fwd.logits[i], s.spec_token_ids, s.request.params,
                                   s.request.generator)
                sampled[s.request.request_id] = toks
                logprobs[s.request.request_id] = lps
                self.drafter.record(len(s.spec_token_ids), len(toks) - 1)
        outs = self.scheduler.update(out, sampled, logprobs)
        if self.drafter is not None:
            self.drafter.propose(out.scheduled, fwd.hidden, self.max_model_len)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.forward_seconds += time.perf_counter() - t0
        self.stats.steps += 1
        self.stats.prompt_tokens += sum(s.num_tokens for s in out.scheduled if not s.is_decode)
        self.stats.generated_tokens += sum(len(v) for v in sampled.values())
        return outs

    def generate(self, prompts: Sequence[Sequence[int] | str],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams()
                 ) -> list[RequestOutput]:
        """Run the prompts to completion (with whatever else is queued); outputs in prompt order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for o in self.step():
                if o.finished:
                    final[o.request_id] = o
            if not self.has_unfinished() and len(final) < len(ids):
                raise RuntimeError("engine idle with unfinished requests")
        return [final[i] for i in ids]

    def metrics(self) -> dict[str, Any]:
        m = {"steps": self.stats.steps, "num_pages": self.kv.num_pages,
             "free_pages": self.kv.pool.num_available, "prefix_hit_rate": self.kv.prefix_hit_rate,
             "preemptions": self.scheduler.num_preemptions,
             "cuda_graphs": self.runner.graph_status,
             "attention_calls": dict(self.runner.attention_calls)}
        if self.drafter is not None:
            m["mtp"] = self.drafter.stats.as_dict()
        return m
