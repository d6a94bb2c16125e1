"""Paged latent KV cache: a page pool with reference counts, block tables and prefix sharing.

MLA caches one compressed vector per token per layer instead of per-head keys and values: the
normalized latent (kv_lora_rank = 512 values for V3) and the rotated rope key
(qk_rope_head_dim = 64), 576 values in all, stored side by side as FlashMLA does. Pages hold 64
tokens (FlashMLA's page size).

Legend: L cached layers (the main layers plus the MTP layers), P pages, N tokens per page (64),
K = C + R values per token, C = kv_lora_rank, R = qk_rope_head_dim, B sequences, S new tokens per
sequence, T context tokens per sequence (cached + new).

Prefix sharing: once a page is full and its KV computed, it is registered under a hash chained over
the previous page's hash and the page's 64 token ids, so equal hashes mean equal whole prefixes. A
new request whose prompt starts with registered pages takes them (reference count + 1) instead of
recomputing them. Pages nobody holds but that are still registered stay cached; they are reused for
new allocations in least-recently-freed order, so hot prefixes survive longest.

Writers only ever write into their own last page or fresh pages: a shared page is always full, and a
prompt match stops short of the prompt's last token (its logits are needed), so no copy-on-write.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily by the functions that need it
    import torch

PAGE_SIZE = 64


@dataclass(frozen=True)
class CacheShape:
    """What one page holds: num_layers x page_size tokens x (kv_lora_rank + rope_dim) values."""

    num_layers: int
    kv_lora_rank: int
    rope_dim: int
    page_size: int = PAGE_SIZE
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for name in ("num_layers", "kv_lora_rank", "rope_dim", "page_size", "dtype_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"CacheShape.{name}={getattr(self, name)} must be >= 1")

    @property
    def values_per_token(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    @property
    def bytes_per_token(self) -> int:
        """All layers; V3 (61 layers, bf16): 61 * 576 * 2 = 70,272 bytes."""
        return self.num_layers * self.values_per_token * self.dtype_bytes

    @property
    def bytes_per_page(self) -> int:
        return self.page_size * self.bytes_per_token

    @classmethod
    def from_model_config(
        cls, cfg, *, page_size: int = PAGE_SIZE, dtype_bytes: int = 2, include_mtp: bool = True
    ) -> CacheShape:
        """Cache shape of an HF-style model config; the MTP layers get layer indices after the
        main ones (layer_idx = num_hidden_layers + k), as in the checkpoint."""
        mtp = int(getattr(cfg, "num_nextn_predict_layers", 0) or 0) if include_mtp else 0
        return cls(
            num_layers=cfg.num_hidden_layers + mtp,
            kv_lora_rank=cfg.kv_lora_rank,
            rope_dim=cfg.qk_rope_head_dim,
            page_size=page_size,
            dtype_bytes=dtype_bytes,
        )


def num_pages_for_budget(shape: CacheShape, budget_bytes: int) -> int:
    """How many whole pages fit in budget_bytes."""
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes={budget_bytes} must be >= 0")
    return int(budget_bytes) // shape.bytes_per_page


def cache_budget_bytes(
    free: int,
    total: int,
    held: int,
    *,
    fraction: float = 0.9,
    memory_utilization: float | None = None,
    reserve_bytes: int = 0,
) -> int:
    """Bytes a GPU's KV cache may take: `fraction` of what this engine may still use, minus
    `reserve_bytes`. Without `memory_utilization` that is the device's free memory. With it (vLLM's
    gpu_memory_utilization: the share of the device's `total` memory this process may hold,
    weights and working memory included) it is that share less the `held` bytes, capped by what
    is free: engines that share one GPU (fractional Ray GPUs) each size from their own share, in
    whatever order they start, instead of the first taking 90% of the card. The (1 - fraction)
    kept back is for activations, CUDA graphs and memory outside PyTorch's allocator (the CUDA
    context, ~0.5 GB)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    available = free
    if memory_utilization is not None:
        if not 0.0 < memory_utilization <= 1.0:
            raise ValueError(f"memory_utilization={memory_utilization} must be in (0, 1]")
        available = min(free, int(total * memory_utilization) - held)
    return max(0, int(available * fraction) - int(reserve_bytes))


def device_budget_bytes(
    device,
    *,
    fraction: float = 0.9,
    memory_utilization: float | None = None,
    cpu_budget_bytes: int | None = None,
    reserve_bytes: int = 0,
) -> int:
    """Bytes the cache may take: on GPU `cache_budget_bytes` of the device's free and total
    memory and what PyTorch's allocator holds for this process; on CPU the caller's byte budget
    (there is no free-memory query worth trusting on a shared host)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return cache_budget_bytes(
            free,
            total,
            torch.cuda.memory_reserved(device),
            fraction=fraction,
            memory_utilization=memory_utilization,
            reserve_bytes=reserve_bytes,
        )
    if cpu_budget_bytes is None:
        raise ValueError(f"device {device} has no free-memory query: pass cpu_budget_bytes")
    return int(cpu_budget_bytes)


def hash_page(prev_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained hash of a full page: equal hashes mean equal token prefixes up to this page.
    blake2b (16 bytes) rather than Python's hash(): stable across processes, so a prefill replica
    and a decode replica agree, and a collision (2^-64 by birthday) is out of reach."""
    h = hashlib.blake2b(digest_size=16)
    h.update(prev_hash if prev_hash is not None else b"\x00" * 16)
    h.update(b"".join(int(t).to_bytes(4, "little", signed=False) for t in token_ids))
    return h.digest()


def page_hashes(
    token_ids: Sequence[int],
    page_size: int,
    prev: bytes | None = None,
    start_page: int = 0,
    num_pages: int | None = None,
) -> list[bytes]:
    """Hashes of the full pages of token_ids, from start_page (with prev = hash of the page
    before)."""
    full = len(token_ids) // page_size
    end = full if num_pages is None else min(full, start_page + num_pages)
    out = []
    for p in range(start_page, end):
        prev = hash_page(prev, token_ids[p * page_size : (p + 1) * page_size])
        out.append(prev)
    return out


class PagePool:
    """Page ids 0..num_pages-1 with reference counts and a hash -> page prefix index.

    A page is in exactly one of three states: held (refcount > 0), cached (refcount 0 but still
    registered under a hash, in LRU order) or free (refcount 0, no hash). Free pages are handed out
    first; then the least recently released cached page is evicted (its hash forgotten)."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages={num_pages} must be >= 1")
        self.num_pages = num_pages
        self.refcount = [0] * num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() gives page 0 first
        self._cached: OrderedDict[int, None] = OrderedDict()  # refcount-0 registered pages, LRU
        self._hash_to_page: dict[bytes, int] = {}
        self._page_hash: dict[int, bytes] = {}
        self.evictions = 0

    @property
    def num_available(self) -> int:
        """Pages an allocation could get now: free plus evictable cached."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def allocate(self) -> int:
        if self._free:
            page = self._free.pop()
        elif self._cached:
            page, _ = self._cached.popitem(last=False)
            del self._hash_to_page[self._page_hash.pop(page)]
            self.evictions += 1
        else:
            raise MemoryError("KV cache out of pages")
        assert self.refcount[page] == 0
        self.refcount[page] = 1
        return page

    def incref(self, page: int) -> None:
        if self.refcount[page] == 0:
            # Reviving a cached page: it must be registered, else it would be on the free list.
            assert page in self._cached, f"page {page} is free, not cached"
            del self._cached[page]
        self.refcount[page] += 1

    def release(self, page: int) -> None:
        if self.refcount[page] <= 0:
            raise ValueError(f"page {page} released with refcount {self.refcount[page]}")
        self.refcount[page] -= 1
        if self.refcount[page] == 0:
            if page in self._page_hash:
                self._cached[page] = None  # most recently released: evicted last
            else:
                self._free.append(page)

    def lookup(self, page_hash: bytes) -> int | None:
        return self._hash_to_page.get(page_hash)

    def is_cached_unheld(self, page: int) -> bool:
        return page in self._cached

    def register(self, page: int, page_hash: bytes) -> bool:
        """Index a full, computed, held page under its hash. False when the hash already has a page
        (two requests computed the same prefix in the same step): the page stays private."""
        assert self.refcount[page] > 0, f"register of unheld page {page}"
        if page_hash in self._hash_to_page or page in self._page_hash:
            return False
        self._hash_to_page[page_hash] = page
        self._page_hash[page] = page_hash
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every hash; cached pages become free (held pages stay held but unregistered)."""
        for page in self._cached:
            self._free.append(page)
        self._cached.clear()
        self._hash_to_page.clear()
        self._page_hash.clear()


@dataclass
class BlockTable:
    """One sequence's pages in order, and the chained hashes of its leading registered pages."""

    pages: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)


class KVCacheManager:
    """Block tables over a PagePool: what the scheduler calls to admit, grow and free sequences."""

    def __init__(
        self, num_pages: int, page_size: int = PAGE_SIZE, *, enable_prefix_caching: bool = True
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size={page_size} must be >= 1")
        self.page_size = page_size
        self.pool = PagePool(num_pages)
        self.enable_prefix_caching = enable_prefix_caching
        self.tables: dict[str, BlockTable] = {}
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of them, found cached

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _match(self, token_ids: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """Registered pages matching the prompt's leading full pages, never covering its last
        token."""
        if not self.enable_prefix_caching:
            return [], []
        pages, hashes, prev = [], [], None
        for p in range((len(token_ids) - 1) // self.page_size):
            prev = hash_page(prev, token_ids[p * self.page_size : (p + 1) * self.page_size])
            page = self.pool.lookup(prev)
            if page is None:
                break
            pages.append(page)
            hashes.append(prev)
        return pages, hashes

    def match_length(self, token_ids: Sequence[int]) -> int:
        """Leading prompt tokens already cached (whole pages, never the last token)."""
        return len(self._match(token_ids)[0]) * self.page_size

    def admit(
        self,
        seq_id: str,
        token_ids: Sequence[int],
        max_new_tokens: int,
        *,
        use_cache: bool = True,
    ) -> int | None:
        """Create seq_id's block table: take its cached prefix pages (none when not use_cache),
        then allocate pages for up to max_new_tokens more tokens (the first prefill chunk).
        Returns the number of tokens already cached, or None (changing nothing) when the pages
        do not fit."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id!r} already has a block table")
        if not token_ids:
            raise ValueError(f"sequence {seq_id!r} has no tokens")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        pages, hashes = self._match(token_ids) if use_cache else ([], [])
        num_cached = len(pages) * self.page_size
        num_tokens = num_cached + min(len(token_ids) - num_cached, max_new_tokens)
        need_new = self.pages_for(num_tokens) - len(pages)
        revived = sum(1 for p in pages if self.pool.is_cached_unheld(p))
        if need_new + revived > self.pool.num_available:
            return None
        for p in pages:
            self.pool.incref(p)
        table = BlockTable(pages=list(pages), hashes=list(hashes))
        for _ in range(need_new):
            table.pages.append(self.pool.allocate())
        self.tables[seq_id] = table
        self.prefix_queries += len(token_ids)
        self.prefix_hits += num_cached
        return num_cached

    def can_grow(self, seq_id: str, num_tokens: int) -> int:
        """Pages seq_id still needs to hold num_tokens tokens (0 when it already can)."""
        return max(0, self.pages_for(num_tokens) - len(self.tables[seq_id].pages))

    def grow(self, seq_id: str, num_tokens: int) -> bool:
        """Make seq_id hold num_tokens tokens; False (nothing allocated) when pages run out."""
        need = self.can_grow(seq_id, num_tokens)
        if need > self.pool.num_available:
            return False
        table = self.tables[seq_id]
        for _ in range(need):
            table.pages.append(self.pool.allocate())
        return True

    def commit(self, seq_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Register the full pages whose KV is now computed (tokens [0, num_computed)), so later
        requests can share them. Called after each step with the sequence's known tokens."""
        if not self.enable_prefix_caching:
            return
        table = self.tables[seq_id]
        full = min(num_computed, len(token_ids)) // self.page_size
        done = len(table.hashes)
        if full <= done:
            return
        prev = table.hashes[-1] if table.hashes else None
        for p, h in enumerate(
            page_hashes(token_ids, self.page_size, prev, done, full - done), done
        ):
            self.pool.register(table.pages[p], h)
            table.hashes.append(h)

    def free(self, seq_id: str) -> None:
        """Release seq_id's pages, last page first so that, among equally old cached pages, a
        prefix's tail is evicted before its head (the head is the part other prompts share)."""
        table = self.tables.pop(seq_id)
        for page in reversed(table.pages):
            self.pool.release(page)

    def slots(self, seq_id: str, start: int, end: int) -> list[int]:
        """Flat slot index (page * page_size + offset) of tokens [start, end) of seq_id."""
        pages, n = self.tables[seq_id].pages, self.page_size
        if end > len(pages) * n:
            raise ValueError(f"tokens up to {end} exceed the {len(pages) * n} slots of {seq_id!r}")
        return [pages[t // n] * n + t % n for t in range(start, end)]

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class PagedKVStorage:
    """The cache tensor: kv_LPNK, latent (first C values) and rope key (last R) side by side."""

    def __init__(self, shape: CacheShape, num_pages: int, *, device="cpu", dtype=None) -> None:
        import torch

        self.shape = shape
        self.num_pages = num_pages
        self.dtype = dtype if dtype is not None else torch.bfloat16
        self.kv_LPNK = torch.zeros(
            shape.num_layers,
            num_pages,
            shape.page_size,
            shape.values_per_token,
            device=device,
            dtype=self.dtype,
        )

    @property
    def device(self):
        return self.kv_LPNK.device

    def layer_flat(self, layer_idx: int) -> torch.Tensor:
        """[P*N, K] view of one layer: row = slot index."""
        return self.kv_LPNK[layer_idx].view(-1, self.shape.values_per_token)

    def write(
        self, layer_idx: int, slots_T: torch.Tensor, kv_TC: torch.Tensor, pe_TR: torch.Tensor
    ) -> None:
        flat = self.layer_flat(layer_idx)
        C = self.shape.kv_lora_rank
        flat[slots_T, :C] = kv_TC.to(self.dtype)
        flat[slots_T, C:] = pe_TR.to(self.dtype)

    def read(self, layer_idx: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather rows by slot index (any shape); returns (kv[..., C], pe[..., R])."""
        rows = self.layer_flat(layer_idx)[slots]
        C = self.shape.kv_lora_rank
        return rows[..., :C], rows[..., C:]
