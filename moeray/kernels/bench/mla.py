"""Benchmarks of the MLA attention kernels: paged decode (eager and under a CUDA graph, against the
copy-bandwidth ceiling), causal prefill over packed sequences (against torch's SDPA backends,
FlashAttention varlen and flex-attention), and the decode kernel's config sweep."""

from __future__ import annotations

import functools
import inspect
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moeray.kernels.bench.common import _bench, _bench_slow, _graph_ms, _try
from moeray.kernels.mla_decode import mla_decode, mla_decode_ref
from moeray.kernels.mla_prefill import mla_prefill, mla_prefill_ref

GRAPH_TABLE_PAGES = 2560  # 163,840 tokens (DeepSeek-V3's max_position_embeddings) of 64


def _paged_cache(b: int, ctx: int, d: int = 576, page: int = 64):
    """A bf16 latent cache of b sequences of ctx tokens in shuffled pages: (kv, block table)."""
    pages_per = ctx // page
    kv = torch.randn(b * pages_per, page, d, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(b * pages_per, device="cuda", dtype=torch.int32).view(b, pages_per)
    return kv, table


def _mla_decode_row(ceil: dict, heads: int, b: int, ctx: int) -> dict:
    d, r = 576, 512
    kv, table = _paged_cache(b, ctx, d)
    lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(b, heads, d, device="cuda", dtype=torch.bfloat16)
    scale = 192**-0.5
    ms = _bench(lambda: mla_decode(q, kv, table, lens, scale))
    nbytes = kv.numel() * 2 + q.numel() * 2 + b * heads * r * 2
    flops = 2 * b * heads * ctx * (d + r)
    row = {
        "kernel": "mla_decode",
        "batch": b,
        "context": ctx,
        "heads": heads,
        "ms": round(ms, 4),
        "TBps": round(nbytes / ms / 1e9, 3),
        "frac_copy_bw": round(nbytes / ms / 1e9 / ceil["copy_TBps"], 3),
        "TFLOPs": round(flops / ms / 1e9, 1),
    }
    if b * ctx <= 64 * 4096:  # the reference loops over sequences on the host
        q4 = q.unsqueeze(1)
        ref_ms = _bench_slow(lambda: mla_decode_ref(q4, kv, table, lens, scale))
        row["ref_ms"] = round(ref_ms, 3)
        row["speedup_vs_ref"] = round(ref_ms / ms, 1)
    return row


def bench_mla_decode(ceil: dict, quick: bool) -> list[dict]:
    batches = (1, 8, 64, 128) if not quick else (1, 64)
    ctxs = (1024, 4096, 32768) if not quick else (4096,)
    return [
        _mla_decode_row(ceil, heads, b, ctx) for heads in (16, 128) for b in batches for ctx in ctxs
    ]


def _mla_decode_graph_rows(
    ceil: dict, heads: int, b: int, ctx: int, width: int | None = None
) -> list[dict]:
    """Rows of `bench_mla_decode_graph` at one shape; `width`: the block table that many pages
    wide (columns past ctx point at page 0, read by no sequence), as the engine's decode graphs
    are captured at max_model_len's width whatever the lengths."""
    d, r = 576, 512
    kv, table = _paged_cache(b, ctx, d)
    if width is not None:
        table = torch.cat([table, table.new_zeros(b, width - table.shape[1])], dim=1)
    lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
    lens[::3] -= 37  # ragged: every third sequence ends inside a page
    q = torch.randn(b, heads, d, device="cuda", dtype=torch.bfloat16)
    scale = 192**-0.5
    nbytes = kv.numel() * 2 + q.numel() * 2 + b * heads * r * 2
    ref, _ = mla_decode_ref(q[:4].unsqueeze(1), kv, table[:4], lens[:4], scale)
    flops = 2 * int(lens.sum()) * heads * (d + r)
    rows = []
    splits_options = (None, 2, 4, 8) if (heads, b, ctx) == (16, 64, 4096) else (None,)
    # 128 heads: the Triton split kernel, then the wgmma one (kernels/mla_decode_wgmma.py) and
    # its warp-specialized form (kernels/mla_decode_ws.py); at batch 64 / 4K only the plain
    # wgmma form and its stage counts, elsewhere the default (WS) alone
    impls: tuple[str, ...] = ("triton",)
    if heads >= 64:
        plain = ("wgmma",) if (b, ctx) == (64, 4096) else ()
        impls = ("triton", *plain, "wgmma_ws")
    for impl, splits in ((i, s) for i in impls for s in splits_options):
        # wgmma: 2 stages of 64 tokens or 3-4 of 32; its warp-specialized form: 2 of 64
        stage_options = {"wgmma": (2, 3, 4), "wgmma_ws": (2,)}.get(impl, (2, 3))
        for stages in stage_options if splits is None or heads == 16 else (2,):
            # the wgmma kernels take 64-row head blocks (`decode_launch` picks them from 8
            # sequences at 128 heads: at fewer, this row shows what they would give); the Triton
            # rows run with MLA_WGMMA=0, where its rule picks 64 from 33
            block_h = None if impl == "triton" else 64
            fn = functools.partial(
                mla_decode, q, kv, table, lens, scale, num_splits=splits, num_stages=stages,
                block_h=block_h,
            )  # fmt: skip
            switches = {
                "MOERAY_FUSED_MLA_WGMMA": "0" if impl == "triton" else "1",
                "MOERAY_FUSED_MLA_WS": "1" if impl == "wgmma_ws" else "0",
            }
            with mock.patch.dict(os.environ, switches):
                out = fn()
                eager = _bench(fn)
                graph = _graph_ms(fn)
            err = ((out[:4].float() - ref[:, 0]).norm() / ref.norm()).item()
            rows.append(
                {
                    "kernel": {"triton": "mla_decode"}.get(impl, f"mla_decode_{impl}"),
                    "heads": heads,
                    "batch": b,
                    "context": ctx,
                    "num_splits": splits if splits is not None else "auto",
                    "num_stages": stages,
                    "block_h": block_h or "auto",
                    "table_pages": table.shape[1],
                    "eager_ms": round(eager, 4),
                    "graph_ms": round(graph, 4),
                    "graph_TBps": round(nbytes / graph / 1e9, 3),
                    "graph_TFLOPs": round(flops / graph / 1e9, 1),
                    "graph_frac_copy_bw": round(nbytes / graph / 1e9 / ceil["copy_TBps"], 3),
                    "eager_frac_copy_bw": round(nbytes / eager / 1e9 / ceil["copy_TBps"], 3),
                    "rel_err_first4": round(err, 5),
                }
            )
    return rows


def bench_mla_decode_graph(ceil: dict) -> list[dict]:
    """MLA decode timed under a CUDA graph, as the engine's decode steps run it (eager calls add
    the host's launch cost), against do_bench's back-to-back eager calls, for a few split
    counts; at 128 heads the wgmma kernels too, also with fewer sequences of longer contexts
    (the Triton kernel at its own rule, 16-row blocks below 33 sequences, against the WS kernel
    at 64-row blocks: `kernels/mla_launch.py` takes the WS kernel from 8), and short contexts in
    a block table 2,560 pages wide (V3's 163,840-token max_model_len: the width a decode graph is
    captured at)."""
    rows = []
    cases = (
        (16, 64, 4096), (16, 1, 1024), (16, 128, 4096), (128, 64, 4096), (128, 4, 16384),
        (128, 1, 1024), (128, 1, 4096), (128, 1, 32768), (128, 8, 1024), (128, 8, 4096),
        (128, 16, 4096), (128, 32, 2048),
    )  # fmt: skip
    for heads, b, ctx in cases:
        rows += _mla_decode_graph_rows(ceil, heads, b, ctx)
    for b, ctx in ((1, 1024), (1, 4096), (4, 1024), (8, 1024), (16, 1024)):
        rows += _mla_decode_graph_rows(ceil, 128, b, ctx, width=GRAPH_TABLE_PAGES)
    return rows


def _prefill_case(heads: int, lens: list[int]):
    """Inputs as MLA's expanded path holds them: q split into nope/rope views of one projection,
    k_nope and v the two halves of kv_b_proj's output, one rope key per token shared by the
    heads."""
    t = sum(lens)
    q = torch.randn(t, heads, 192, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(t, heads, 256, device="cuda", dtype=torch.bfloat16)
    pe = torch.randn(t, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    q_nope, q_pe = q.split([128, 64], -1)
    k_nope, v = kv.split([128, 128], -1)
    return q, q_nope, q_pe, k_nope, pe, v, cu


def _pad_bhsd(x_TH_, lens, smax):
    """Packed [T, H, D] -> zero-padded [B, H, Smax, D] (right padding)."""

    b = len(lens)
    out = x_TH_.new_zeros(b, smax, *x_TH_.shape[1:])
    s = 0
    for i, n in enumerate(lens):
        out[i, :n] = x_TH_[s : s + n]
        s += n
    return out.transpose(1, 2)


# Candidate tile configs of the Triton prefill kernel; each layout's best one is the number that
# counts.
_PREFILL_TRITON_CFGS = [
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
]


@dataclass(frozen=True)
class _PrefillBaselines:
    """The torch attention methods this torch has, set up once for every prefill layout."""

    flex: Callable[..., Any] | None  # compiled flex_attention, or None
    flex_error: str  # why flex is None
    create_block_mask: Callable[..., Any] | None  # set whenever flex is
    varlen: Callable[..., Any] | None  # torch.nn.attention.varlen.varlen_attn, or None
    varlen_params: dict
    doc_buf: torch.Tensor  # document id of each of the 8192 packed tokens, for flex's mask
    mask_mod: Callable[..., Any]
    t_start: float
    budget_s: float


def _prefill_baselines() -> _PrefillBaselines:
    flex: Callable[..., Any] | None = None
    flex_error = ""
    create_block_mask: Callable[..., Any] | None = None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as e:
        flex_error = f"{type(e).__name__}: {e}"[:200]
    varlen: Callable[..., Any] | None = None
    try:
        from torch.nn.attention.varlen import varlen_attn

        varlen = varlen_attn
        varlen_params = dict(inspect.signature(varlen_attn).parameters)
    except Exception:
        varlen_params = {}
    doc_buf = torch.zeros(8192, dtype=torch.long, device="cuda")

    def mask_mod(b_, h_, q_idx, kv_idx):
        return (doc_buf[q_idx] == doc_buf[kv_idx]) & (q_idx >= kv_idx)

    return _PrefillBaselines(
        flex=flex,
        flex_error=flex_error,
        create_block_mask=create_block_mask,
        varlen=varlen,
        varlen_params=varlen_params,
        doc_buf=doc_buf,
        mask_mod=mask_mod,
        t_start=time.perf_counter(),
        budget_s=240,
    )


def _time_sdpa_padded(q, kk, v, lens, smax, scale, ms: dict, check, unpad) -> None:
    """torch SDPA's backends on right-padded [B, H, Smax, D] copies of q, k and v (the padding built
    outside the timing): their times into `ms`, their outputs to `check`."""
    qp, kp, vp = (
        _pad_bhsd(q, lens, smax),
        _pad_bhsd(kk, lens, smax),
        _pad_bhsd(v.contiguous(), lens, smax),
    )
    vp192 = F.pad(vp, (0, 64))
    for key, backend, vv in (
        ("sdpa_flash_padv192", SDPBackend.FLASH_ATTENTION, vp192),
        ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION, vp),
        ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION, vp),
        ("sdpa_default", None, vp),
    ):

        def fn(backend=backend, vv=vv):
            if backend is None:
                return F.scaled_dot_product_attention(qp, kp, vv, is_causal=True, scale=scale)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qp, kp, vv, is_causal=True, scale=scale)

        ms[key] = _try(fn)
        if isinstance(ms[key], float):
            check(key, unpad(fn()[..., :128]))


def _prefill_row(ceil: dict, base: _PrefillBaselines, heads: int, name: str, lens: list[int]):
    scale = 192**-0.5
    q, q_nope, q_pe, k_nope, pe, v, cu = _prefill_case(heads, lens)
    t, b, smax = sum(lens), len(lens), max(lens)
    flops = 2 * heads * sum(n * (n + 1) // 2 for n in lens) * (192 + 128)
    row: dict = {
        "heads": heads,
        "layout": name,
        "tokens": t,
        "seqs": b,
        "useful_TFLOP": round(flops / 1e12, 3),
    }
    ms: dict = {}
    errs: dict = {}
    # Triton: each candidate config; the best is the number that counts.
    out_tri = None
    for i, cfg in enumerate(_PREFILL_TRITON_CFGS):
        fn = functools.partial(
            mla_prefill, q_nope, q_pe, k_nope, pe, v, cu, scale, max_seqlen=smax, config=cfg
        )
        tms = _try(fn)
        ms[f"triton_cfg{i}"] = tms
        if out_tri is None and isinstance(tms, float):
            out_tri = fn().float()
    tri_ok = [k for k in ms if k.startswith("triton") and isinstance(ms[k], float)]
    if tri_ok:
        best = min(tri_ok, key=lambda k: ms[k])
        ms["triton"] = ms[best]
        row["triton_best_cfg"] = _PREFILL_TRITON_CFGS[int(best.removeprefix("triton_cfg"))]
    if out_tri is not None and heads == 16 and name == "varlen6":
        ref, _ = mla_prefill_ref(q_nope, q_pe, k_nope, pe, v, cu, scale)
        errs["triton_vs_fp32_ref"] = ((out_tri - ref).norm() / ref.norm()).item()
        del ref

    def check(key, out_THV):
        if out_tri is not None:
            errs[key] = ((out_THV.float() - out_tri).norm() / out_tri.norm()).item()

    def unpad(o_BHSV):
        return torch.cat([o_BHSV[i, :, :n].transpose(0, 1) for i, n in enumerate(lens)])

    kk = torch.cat([k_nope, pe[:, None].expand(t, heads, 64)], -1)
    _time_sdpa_padded(q, kk, v, lens, smax, scale, ms, check, unpad)
    # What mla.py's expanded path does today for equal lengths: cat + expand, then SDPA.
    if len(set(lens)) == 1:
        s_ = lens[0]

        def mla_now():
            qb = q.view(b, s_, heads, 192).transpose(1, 2)
            kb = torch.cat(
                [
                    k_nope.reshape(b, s_, heads, 128),
                    pe.view(b, s_, 1, 64).expand(b, s_, heads, 64),
                ],
                -1,
            ).transpose(1, 2)
            return F.scaled_dot_product_attention(
                qb,
                kb,
                v.reshape(b, s_, heads, 128).transpose(1, 2),
                is_causal=True,
                scale=scale,
            )

        ms["mla_py_now_cat_plus_sdpa"] = _try(mla_now)
    # FlashAttention varlen through torch (packed, no padding waste; v padded to 192).
    if base.varlen is not None:
        v192 = F.pad(v, (0, 64))
        kw = {"is_causal": True} if "is_causal" in base.varlen_params else {"window_size": (-1, 0)}
        if "scale" in base.varlen_params:
            kw["scale"] = scale

        def fn_varlen():
            return base.varlen(q, kk, v192, cu, cu, smax, smax, **kw)

        ms["varlen_flash_padv192"] = _try(fn_varlen)
        if isinstance(ms["varlen_flash_padv192"], float):
            o = fn_varlen()
            o = o[0] if isinstance(o, tuple) else o
            check("varlen_flash_padv192", o[..., :128])
        del v192
    # flex-attention: packed [1, H, T, D] with a document-causal block mask.
    if base.flex is not None and time.perf_counter() - base.t_start > base.budget_s:
        ms["flex"] = f"skipped: section past its {base.budget_s} s budget (flex compiles per shape)"
    elif base.flex is not None:
        create_block_mask = base.create_block_mask
        assert create_block_mask is not None  # imported before flex was compiled
        # One mask_mod and one document-id buffer for every layout (all pack 8192 tokens),
        # so torch.compile does not recompile for each layout's closure.
        base.doc_buf.copy_(
            torch.repeat_interleave(
                torch.arange(b, device="cuda"), torch.tensor(lens, device="cuda")
            )
        )
        try:
            t0 = time.perf_counter()
            bmask = create_block_mask(base.mask_mod, None, None, t, t, device="cuda")
            qf, kf, vf = (
                q.transpose(0, 1)[None],
                kk.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
            )

            def fn_flex():
                return base.flex(qf, kf, vf, block_mask=bmask, scale=scale)

            o = fn_flex()
            torch.cuda.synchronize()
            row["flex_first_call_s"] = round(time.perf_counter() - t0, 1)
            ms["flex"] = _try(fn_flex)
            check("flex", o[0].transpose(0, 1))
        except Exception as e:
            ms["flex"] = f"{type(e).__name__}: {str(e)[:160]}"
    else:
        ms["flex"] = base.flex_error
    timed = {
        k: v_ for k, v_ in ms.items() if isinstance(v_, float) and not k.startswith("triton_cfg")
    }
    fastest = min(timed, key=timed.__getitem__) if timed else None
    row.update(
        {
            "ms": {k: (round(v_, 4) if isinstance(v_, float) else v_) for k, v_ in ms.items()},
            "TFLOPs": {k: round(flops / v_ / 1e9, 1) for k, v_ in timed.items()},
            "frac_bf16_peak": {
                k: round(flops / v_ / 1e9 / ceil["bf16_matmul_TFLOPs"], 3)
                for k, v_ in timed.items()
            },
            "rel_err_vs_triton": {k: round(e_, 5) for k, e_ in errs.items()},
            "fastest": fastest,
        }
    )
    return row


def bench_mla_prefill(ceil: dict, quick: bool = False) -> dict:
    """Causal MLA prefill (qk 128+64, v 128) over packed sequences: the Triton kernel against torch
    SDPA backends (on right-padded batches: with a causal mask the valid rows never see padding),
    FlashAttention through torch's varlen API (v zero-padded to 192) and flex-attention."""
    layouts = {
        "1x8192": [8192],
        "4x2048": [2048] * 4,
        "16x512": [512] * 16,
        "varlen6": [3001, 517, 1200, 64, 2410, 1000],
    }
    if quick:
        layouts = {k: layouts[k] for k in ("4x2048", "varlen6")}
    assert all(sum(v) == 8192 for v in layouts.values())  # the flex mask buffer is 8192 long
    base = _prefill_baselines()
    rows = []
    for heads in (16, 128):
        for name, lens in layouts.items():
            rows.append(_prefill_row(ceil, base, heads, name, lens))
            torch.cuda.empty_cache()
    return {"rows": rows}


def sweep_mla_decode() -> list[dict]:
    """Time candidate configs of the Triton MLA decode kernel (its head block, warps, stages and
    split count heuristics come from here; the wgmma kernels, which would take its 64-row
    blocks on Hopper, are switched off)."""
    with mock.patch.dict(os.environ, {"MOERAY_FUSED_MLA_WGMMA": "0"}):
        return _sweep_triton_mla_decode()


def _sweep_triton_mla_decode() -> list[dict]:
    out = []
    for heads, b, ctx in ((16, 64, 4096), (128, 64, 4096), (16, 1, 32768)):
        kv, table = _paged_cache(b, ctx)
        lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(b, heads, 576, device="cuda", dtype=torch.bfloat16)
        nbytes = kv.numel() * 2
        for bh in (16,) if heads == 16 else (16, 32, 64):
            for nw in (4, 8):
                for ns in (1, 2, 3):
                    for splits in (None, 1, 2, 4, 8, 16) if heads == 16 else (None,):
                        tms = _try(
                            functools.partial(
                                mla_decode,
                                q,
                                kv,
                                table,
                                lens,
                                192**-0.5,
                                num_splits=splits,
                                block_h=bh,
                                num_warps=nw,
                                num_stages=ns,
                            )
                        )
                        out.append(
                            {
                                "heads": heads,
                                "batch": b,
                                "context": ctx,
                                "block_h": bh,
                                "num_warps": nw,
                                "num_stages": ns,
                                "num_splits": splits,
                                "ms": tms,
                                "TBps": round(nbytes / tms / 1e9, 3)
                                if isinstance(tms, float)
                                else None,
                            }
                        )
        del kv
    return out
