"""EngineConfig: the engine's settings (engine.py builds the engine from it)."""

from __future__ import annotations

from dataclasses import dataclass

from moeray.platform.config.graphs import (
    check_chunk_seqs,
    check_chunk_tokens,
    check_speculative_tokens,
)

# Decode attention: "kernel" (the paged MLA kernel via cache.attend), "gather", "auto" (kernel on
# GPU, gather on CPU); prefill chunks' MLA path (runner.py says why "auto" is expanded).
ATTENTIONS = ("auto", "kernel", "gather")
PREFILL_ATTENTIONS = ("auto", "expanded", "absorbed")


@dataclass(frozen=True)
class EngineConfig:
    page_size: int = 64
    # Pages in the cache; None sizes it from memory: memory_fraction of free GPU memory, or
    # cpu_cache_bytes on CPU.
    num_pages: int | None = None
    memory_fraction: float = 0.9
    # The share of the GPU's total memory this engine may hold, its weights included (vLLM's
    # gpu_memory_utilization); the cache then takes memory_fraction of that share's unused part
    # (kv_cache.cache_budget_bytes). None: of all free memory (one engine a GPU).
    gpu_memory_utilization: float | None = None
    cpu_cache_bytes: int = 256 * 1024**2
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    # None: the model's max_position_embeddings, capped by what the cache holds.
    max_model_len: int | None = None
    # MTP drafts a decode step verifies (0 off; up to config/graphs.py's MAX_SPECULATIVE_TOKENS).
    # Their steps run under async scheduling (async_scheduling_spec).
    num_speculative_tokens: int = 0
    enable_prefix_caching: bool = True
    use_cuda_graphs: bool = True
    graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    # GPU: capture every decode graph up to max_num_seqs at the start (as vLLM does), not later.
    capture_graphs_at_start: bool = True
    # ... the decode graphs among them; False captures the prefill-chunk graphs only (a P/D
    # prefill replica: its requests end at their first token; a chunk of 1-2 tokens, a token
    # budget's remainder, still captures its decode-shaped graph when it first comes).
    capture_decode_graphs: bool = True
    attention: str = "auto"  # "kernel" (paged MLA kernel via cache.attend), "gather", "auto"
    # MLA path of prefill chunks: "auto"/"expanded" (up-projected K and V), "absorbed" (latent).
    prefill_attention: str = "auto"
    seed: int = 0
    # Ids that end a request besides config.json's eos_token_id (generation_config.json's list).
    eos_token_ids: tuple[int, ...] = ()
    # Launch each greedy decode step before the previous one's ids are read back (overlap.py);
    # step() then returns each step's outputs one call late. None: on for CUDA engines, where it
    # hides the host's 0.3-2.7 ms a step (H200: Moonlight bf16 batch 64 4,774 -> 5,875 tok/s,
    # benchmarks/notes-engine.md), off on CPU, whose forward runs on the host that would overlap it.
    async_scheduling: bool | None = None
    # With async scheduling, sampled (temperature > 0) requests run ahead too: their uniforms are
    # drawn at launch, nothing read back (H200, temperature 1: Moonlight FP8 batch 64 6,009 ->
    # 6,889 tok/s, V3 widths FP8 batch 1 517 -> 633; benchmarks/notes-engine.md).
    async_scheduling_sampled: bool = True
    # ... and steps with prefill chunks (admissions) instead of draining; opt-in: same tokens, but
    # arrival runs timed 0.87-1.38x on an H100 (eager prefill steps' host noise; notes-engine.md).
    async_scheduling_prefill: bool = False
    # ... and MTP speculative steps (sampled ones with async_scheduling_sampled): the verdict and
    # the next step's ids and positions computed on the device, read back one step late
    # (engine/spec_overlap.py). H100, small preset, acceptance ~1: MTP at 1.41x plain decoding at
    # batch 1 and 1.54x at 16, where synchronous MTP steps ran at 1.07x / 0.90x
    # (benchmarks/notes-engine.md).
    async_scheduling_spec: bool = True
    # Prefill chunks of up to this many tokens (one sequence, no prompt logprobs) replay a CUDA
    # graph captured at the start, the chunk padded at its end to the next power of two from 16
    # (engine/step_graphs.py; captured with capture_graphs_at_start), and with MTP speculation
    # so does each chunk's MTP forward; longer chunks run eagerly.
    # 0: every chunk eagerly. Requests arriving while others decode (Moonlight, 128-token
    # prompts, H100): a step with a chunk 67-83 -> 15 ms in FP8, 39-49 -> 22 ms in bf16;
    # tokens/s 3.1-3.6x / 1.5-1.8x (notes-engine.md). The chunks compute MLA's absorbed path
    # (eager chunks the expanded one): tokens equal the eager absorbed prefill's, and part from
    # the expanded path's by bf16 rounding, neither path the more accurate (7.4-8.8% from fp32).
    prefill_graph_tokens: int = 256
    # A step's chunks of one length replay one chunk graph of up to this many sequences (graphs
    # captured at each of graph_batch_sizes up to it, bs x S within max_num_batched_tokens and
    # 1,024 tokens, config/graphs.py): a burst of same-length prompts then reads the weights
    # once a graph, not once a chunk (step_graphs.py). 1: one sequence a chunk graph. Bursts of
    # 16 128-token prompts at Moonlight on an H100: tokens/s 1.36x (FP8) / 1.45x (bf16) against
    # 1, where one chunk a graph lost to eager chunks (0.87x / 0.70x); steady arrivals even
    # (0.995x); an engine's start +5 s for the 14 more captures (notes-engine.md).
    prefill_graph_seqs: int = 8

    def __post_init__(self) -> None:
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages={self.num_pages} must be >= 1 or None")
        if self.page_size < 1:
            raise ValueError(f"page_size={self.page_size} must be >= 1")
        for name in ("max_num_seqs", "max_num_batched_tokens", "cpu_cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len={self.max_model_len} must be >= 1 or None")
        if not self.graph_batch_sizes or min(self.graph_batch_sizes) < 1:
            raise ValueError(
                f"graph_batch_sizes={self.graph_batch_sizes}: accepted one or more sizes >= 1"
            )
        for name, accepted in (
            ("attention", ATTENTIONS),
            ("prefill_attention", PREFILL_ATTENTIONS),
        ):
            if getattr(self, name) not in accepted:
                raise ValueError(f"{name}={getattr(self, name)!r}: accepted {accepted}")
        for name in ("memory_fraction", "gpu_memory_utilization"):
            v = getattr(self, name)
            if v is not None and not 0.0 < v <= 1.0:
                raise ValueError(f"{name}={v} must be in (0, 1]")
        check_speculative_tokens(self.num_speculative_tokens)
        check_chunk_tokens(self.prefill_graph_tokens)
        check_chunk_seqs(self.prefill_graph_seqs)
