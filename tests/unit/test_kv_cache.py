import random

import pytest
import torch

from moeray.platform.engine.kv_cache import (
    CacheShape,
    KVCacheManager,
    PagedKVStorage,
    PagePool,
    cache_budget_bytes,
    device_budget_bytes,
    hash_page,
    num_pages_for_budget,
    page_hashes,
)


def test_v3_bytes_per_token_and_budget():
    # docs/deepseek-v3.md, "Model config": 61 layers x (512 + 64) x 2 bytes = 70,272 bytes per token
    shape = CacheShape(num_layers=61, kv_lora_rank=512, rope_dim=64)
    assert shape.values_per_token == 576
    assert shape.bytes_per_token == 70_272
    assert shape.bytes_per_page == 64 * 70_272
    assert num_pages_for_budget(shape, 10 * shape.bytes_per_page + 1) == 10
    assert num_pages_for_budget(shape, shape.bytes_per_page - 1) == 0
    assert device_budget_bytes("cpu", cpu_budget_bytes=12345) == 12345
    with pytest.raises(ValueError, match="cpu_budget_bytes"):
        device_budget_bytes("cpu")
    with pytest.raises(ValueError, match="page_size"):
        CacheShape(num_layers=1, kv_lora_rank=8, rope_dim=4, page_size=0)


def test_cache_budget_keeps_to_the_memory_share():
    GB = 1 << 30
    # One engine a GPU: 0.9 of what is free, whatever this process holds.
    assert cache_budget_bytes(60 * GB, 80 * GB, 16 * GB) == int(54 * GB)
    # Two engines packed on an 80 GB GPU at half each. The first starts alone (64 GB free after
    # its 16 GB of weights) yet keeps to its 40 GB: 0.9 x (40 - 16) = 21.6 GB of cache.
    first = cache_budget_bytes(64 * GB, 80 * GB, 16 * GB, memory_utilization=0.5)
    assert first == int(0.9 * 24 * GB)
    # The second comes up beside it (its weights loaded, the first's cache taken): the same.
    free = 80 * GB - 16 * GB - first - 16 * GB
    assert cache_budget_bytes(free, 80 * GB, 16 * GB, memory_utilization=0.5) == first
    # A share larger than what is free is capped by what is free; weights past the share: none.
    assert cache_budget_bytes(10 * GB, 80 * GB, 16 * GB, memory_utilization=0.9) == 9 * GB
    assert cache_budget_bytes(60 * GB, 80 * GB, 50 * GB, memory_utilization=0.5) == 0
    for bad in ({"memory_utilization": 0.0}, {"memory_utilization": 1.5}, {"fraction": 0.0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}={next(iter(bad.values()))}"):
            cache_budget_bytes(GB, GB, 0, **bad)


def test_from_model_config_counts_mtp_layers():
    class Cfg:
        num_hidden_layers, kv_lora_rank, qk_rope_head_dim, num_nextn_predict_layers = 3, 32, 8, 1

    s = CacheShape.from_model_config(Cfg, dtype_bytes=4)
    assert (s.num_layers, s.values_per_token, s.bytes_per_token) == (4, 40, 4 * 40 * 4)
    assert CacheShape.from_model_config(Cfg, include_mtp=False).num_layers == 3


def test_hash_chain_depends_on_whole_prefix():
    a = list(range(8))
    b = [99, *list(range(1, 8))]
    ha, hb = page_hashes(a, 4), page_hashes(b, 4)
    assert len(ha) == 2 and ha[0] != hb[0]
    assert ha[1] != hb[1]  # same tokens in page 1, different page 0 -> different hash
    assert ha[1] == hash_page(ha[0], a[4:])
    assert page_hashes([*a, 1, 2, 3], 4) == ha  # partial page not hashed
    assert hash_page(None, [1, 2]) != hash_page(None, [2, 1])
    assert hash_page(None, [256]) != hash_page(None, [1, 0])


def test_pool_refcounts_states_and_lru_eviction():
    pool = PagePool(4)
    pages = [pool.allocate() for _ in range(4)]
    assert sorted(pages) == [0, 1, 2, 3] and pool.num_available == 0
    with pytest.raises(MemoryError):
        pool.allocate()
    assert pool.register(pages[0], b"h0") and pool.register(pages[1], b"h1")
    assert not pool.register(pages[2], b"h0")  # duplicate hash stays private
    pool.incref(pages[0])
    pool.release(pages[0])
    assert pool.num_available == 0  # still held once
    pool.release(pages[1])  # cached first -> evicted first
    pool.release(pages[0])
    pool.release(pages[2])  # unregistered -> free list
    assert pool.num_available == 3 and pool.num_cached == 2
    assert pool.allocate() == pages[2]  # free pages are used before evicting cached ones
    assert pool.allocate() == pages[1] and pool.lookup(b"h1") is None and pool.evictions == 1
    assert pool.lookup(b"h0") == pages[0]
    pool.incref(pages[0])  # revive from the cache
    assert pool.num_available == 0 and pool.refcount[pages[0]] == 1
    with pytest.raises(ValueError, match="refcount"):
        pool.release(pages[1]) or pool.release(pages[1])


def test_prefix_sharing_reuses_full_pages_and_not_the_last_token():
    kv = KVCacheManager(num_pages=16, page_size=4)
    prompt = list(range(100, 111))  # 11 tokens: 2 full pages + 3
    assert kv.admit("a", prompt, 100) == 0
    assert len(kv.tables["a"].pages) == 3
    kv.commit("a", prompt, 11)
    assert len(kv.tables["a"].hashes) == 2
    # same prompt: both full pages shared, the partial one recomputed
    assert kv.admit("b", prompt, 100) == 8
    ta, tb = kv.tables["a"], kv.tables["b"]
    assert tb.pages[:2] == ta.pages[:2] and tb.pages[2] != ta.pages[2]
    assert kv.pool.refcount[ta.pages[0]] == 2
    # exactly 8 tokens = 2 full pages: only 1 page may be reused so the last token is computed
    assert kv.admit("c", prompt[:8], 100) == 4
    # diverging in page 1 shares page 0 only
    other = [*prompt[:5], 7, *prompt[6:]]
    assert kv.admit("d", other, 100) == 4
    assert kv.prefix_hit_rate == pytest.approx((0 + 8 + 4 + 4) / (11 + 11 + 8 + 11))
    # freeing everything: the shared pages stay cached, a new request still hits them
    for s in "abcd":
        kv.free(s)
    assert kv.pool.num_available == 16 and kv.pool.num_cached == 2
    assert kv.admit("e", [*prompt, 5, 6], 3) == 8


def test_uncomputed_pages_are_not_shared():
    kv = KVCacheManager(num_pages=8, page_size=4)
    prompt = list(range(9))
    assert kv.admit("a", prompt, 4) == 0  # first chunk: 4 tokens allocated, not computed yet
    assert kv.admit("b", prompt, 9) == 0  # nothing registered before commit
    kv.commit("a", prompt, 4)
    assert kv.match_length(prompt) == 4
    kv.commit("b", prompt, 8)  # b computed the same page 0: duplicate stays private
    assert (
        kv.tables["b"].hashes
        and kv.pool.lookup(kv.tables["b"].hashes[0]) == kv.tables["a"].pages[0]
    )
    assert kv.match_length(prompt) == 8  # page 1 registered from b


def test_admit_fails_atomically_and_grow():
    kv = KVCacheManager(num_pages=3, page_size=4)
    assert kv.admit("a", list(range(9)), 9) == 0  # 3 pages
    before = list(kv.pool.refcount)
    assert kv.admit("b", [1, 2], 2) is None
    assert kv.pool.refcount == before and "b" not in kv.tables
    assert not kv.grow("a", 13) and len(kv.tables["a"].pages) == 3
    assert kv.grow("a", 12)
    kv.free("a")
    assert kv.grow.__self__.pool.num_available == 3
    with pytest.raises(ValueError, match="already"):
        kv.admit("x", [1], 1) or kv.admit("x", [1], 1)


def test_revived_cached_pages_count_against_capacity():
    kv = KVCacheManager(num_pages=3, page_size=4)
    p = list(range(9))
    kv.admit("a", p, 9)
    kv.commit("a", p, 9)
    kv.free("a")  # 2 cached + 1 free
    kv.admit("big", [50 + i for i in range(8)], 8)  # takes the free page and evicts one cached
    assert kv.pool.evictions == 1
    # the tail page (page 1 of the prefix) is evicted first, page 0 survives
    assert kv.match_length(p) == 4


def test_slots_and_free_order():
    kv = KVCacheManager(num_pages=8, page_size=4)
    kv.admit("a", list(range(6)), 6)
    pages = kv.tables["a"].pages
    assert kv.slots("a", 3, 6) == [pages[0] * 4 + 3, pages[1] * 4, pages[1] * 4 + 1]
    with pytest.raises(ValueError, match="exceed"):
        kv.slots("a", 0, 9)


def test_random_workload_keeps_refcounts_consistent():
    rng = random.Random(0)
    kv = KVCacheManager(num_pages=40, page_size=4)
    live: dict[str, list[int]] = {}
    bases = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    for step in range(300):
        if live and rng.random() < 0.4:
            sid = rng.choice(sorted(live))
            kv.free(sid)
            del live[sid]
        else:
            toks = rng.choice(bases)[: rng.randrange(1, 13)] + [
                rng.randrange(50) for _ in range(rng.randrange(6))
            ]
            if not toks:
                continue
            sid = f"s{step}"
            cached = kv.admit(sid, toks, len(toks))
            if cached is None:
                continue
            assert cached % 4 == 0 and cached < len(toks)
            kv.commit(sid, toks, len(toks))
            live[sid] = toks
        # invariant: refcount of each page == number of tables holding it
        held = [0] * 40
        for t in kv.tables.values():
            for p in t.pages:
                held[p] += 1
        assert held == kv.pool.refcount
        assert kv.pool.num_available == sum(1 for h in held if h == 0)
        # shared pages hold the same tokens: equal hashes at equal page index
        for sid, toks in live.items():
            t = kv.tables[sid]
            assert t.hashes == page_hashes(toks, 4)[: len(t.hashes)]


def test_storage_write_read_roundtrip():
    shape = CacheShape(num_layers=2, kv_lora_rank=6, rope_dim=3, page_size=4, dtype_bytes=4)
    st = PagedKVStorage(shape, 5, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    kv, pe = torch.randn(7, 6, generator=g), torch.randn(7, 3, generator=g)
    slots = torch.tensor([19, 0, 5, 6, 7, 8, 13])
    st.write(1, slots, kv, pe)
    rk, rp = st.read(1, slots.view(7, 1))
    assert torch.equal(rk[:, 0], kv) and torch.equal(rp[:, 0], pe)
    assert st.kv_LPNK[0].abs().sum() == 0  # other layer untouched
    assert torch.equal(st.kv_LPNK[1, 4, 3, :6], kv[0])  # slot 19 = page 4, offset 3
