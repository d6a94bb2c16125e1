"""The CUDA graphs' size rules, which EngineConfig and ServeConfig both check: the prefill-chunk
graphs' (engine/step_graphs.py captures and replays them) and the drafts a decode step verifies
(each decode width is a graph per batch size: engine/runner_graphs.py)."""

from __future__ import annotations

# Chunk buckets: powers of two from 16 (shorter chunks pad to 16) to 1,024 tokens, a bound on the
# memory the captures take (timed up to 256: benchmarks/notes-engine.md); a chunk graph of
# several sequences holds at most CHUNK_GRAPH_MAX tokens too (timed up to 8 x 128).
CHUNK_GRAPH_MIN = 16
CHUNK_GRAPH_MAX = 1024
# Same-length chunks of one step replay one graph of up to this many sequences (a power of two).
CHUNK_GRAPH_MAX_SEQS = 64


def check_chunk_tokens(tokens: int, name: str = "prefill_graph_tokens") -> None:
    """ValueError naming `tokens` unless it is 0 (no chunk graphs) or a power of two from
    CHUNK_GRAPH_MIN to CHUNK_GRAPH_MAX."""
    t = tokens
    if t != 0 and not (CHUNK_GRAPH_MIN <= t <= CHUNK_GRAPH_MAX and t & (t - 1) == 0):
        raise ValueError(
            f"{name}={t}: accepted 0 (off) or a power of two from {CHUNK_GRAPH_MIN} to "
            f"{CHUNK_GRAPH_MAX}"
        )


def check_chunk_seqs(seqs: int, name: str = "prefill_graph_seqs") -> None:
    """ValueError naming `seqs` unless it is a power of two from 1 to CHUNK_GRAPH_MAX_SEQS."""
    if not (1 <= seqs <= CHUNK_GRAPH_MAX_SEQS and seqs & (seqs - 1) == 0):
        raise ValueError(
            f"{name}={seqs}: accepted a power of two from 1 (one sequence a chunk graph) to "
            f"{CHUNK_GRAPH_MAX_SEQS}"
        )


# Drafts a step at most. The one MTP depth drafts the first; each further draft runs it again on its
# own last hidden row (as vLLM and SGLang reuse DeepSeek-V3's one MTP module), and each decode width
# 1 .. 1 + k is a CUDA graph per batch size for the main model and the MTP depth, so past a few
# drafts the captures grow while a draft's chance to be reached falls (acceptance is a product over
# the drafts before it).
MAX_SPECULATIVE_TOKENS = 4


def check_speculative_tokens(k: int, name: str = "num_speculative_tokens") -> None:
    """ValueError naming `k` unless it is 0 (no drafting) to MAX_SPECULATIVE_TOKENS."""
    if not 0 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(
            f"{name}={k}: accepted 0 (off) to {MAX_SPECULATIVE_TOKENS} (MTP drafts a step)"
        )
