"""mla_decode_block's kernel (the package's __init__ has the wrapper, the reference and why).

Legend: T tokens (<= MAX_TOKENS), D hidden, H heads, N nope dims, R rope dims (R2 = R / 2), V value
dims, C kv_lora_rank, Q = H * (N + R), HV = H * V; NS attention splits; P programs.

Math (the launch-per-step path's, stage by stage; every intermediate rounded to the activation
dtype where that path rounds it, fp32 accumulation):
  SN  x = rmsnorm(xin + delta) * w_in, h = xin + delta  with NORM (one task a token; first)
  S0  qkv [T, Q + C + R] = x [T, D] @ W_qkv^T        q_proj and kv_a_proj_with_mqa, merged rows
      with a q LoRA (QL > 0) qkv [T, QL + C + R] (q_a_proj's rows instead of q_proj's), then
  SQN qa = rmsnorm(qkv[:, :QL]) * w_qa                 q_a_layernorm (one task a token)
  SQB q [T, Q] = qa @ W_qb^T                          q_b_proj, 16-row tiles
  S1  q_lat [T, H, C] = q_nope @ W_UK[h]              W_UK[h] = W_kvb[h, :N]  [N, C]
      q [T, H, C + R] = (q_lat, rope(q_pe))           the packed query (mla_write_pack)
      cache[slot_t] = (rmsnorm(kv_t) * w_kvn, rope(pe_t))
  S2  per (token, 16-head block, split): softmax(q . cache * scale) partials over the split's
      pages (mla_decode's `_attend_pages`), fp32, with their log-sum-exp
  S3  o_lat [T, H, C] = the splits merged (`_merge_split_rows`); v [T, H, V] = o_lat @ W_UV[h]^T
  S4  out [T, D] = v [T, HV] @ W_o^T
"""

from __future__ import annotations

import triton
import triton.language as tl

from moeray.kernels.common import to_dtype_rn
from moeray.kernels.mla_common import _attend_pages, _merge_split_rows
from moeray.kernels.mla_write import _rotate_heads, _write_cache_row
from moeray.kernels.norm import rms_norm_row
from moeray.kernels.persistent import count_in, finish, first_k_step, rows_gemv, wait_count

# Counter index of each stage: S0-S4, then SN, SQN, SQB (task order: SN, S0, SQN, SQB, S1-S4).
STAGES = 8
_STAGES = tl.constexpr(STAGES)  # the kernel's view of STAGES
_SN, _SQN, _SQB = tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)


@triton.jit
def _mla_block_kernel(
    xin_ptr, delta_ptr, nw_ptr, h_ptr,  # NORM: un-normed rows, their deferred add, weight, sum
    x_ptr,  # the normed rows [T, D] (with NORM: written by SN)
    wqkv_ptr, sqkv_ptr, qkv_ptr,  # S0: w_qkv (FP8: its 128x128 block scales), its output
    qan_ptr, qa_ptr, wqb_ptr, sqb_ptr, qb_ptr,  # QL: q_a_layernorm's weight, its output, q_b
    wkvb_ptr, kvn_ptr, cos_ptr, sin_ptr, cache_ptr, slots_ptr, q_ptr,  # S1
    bt_ptr, len_ptr, po_ptr, plse_ptr,  # S2: block table, lengths, the splits' partials
    v_ptr, wo_ptr, so_ptr, out_ptr,  # S3-S4
    cnt_ptr,
    T, eps, norm_eps, q_eps, sm_scale_log2, num_splits,
    stride_x, stride_btb, stride_kvp, stride_kvt,
    D: tl.constexpr, H: tl.constexpr, N: tl.constexpr, R: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr,
    BT: tl.constexpr,  # T padded to a power of two
    BN: tl.constexpr,  # weight rows per S0 / S4 task
    BK: tl.constexpr,  # their K step
    BC: tl.constexpr,  # latent columns per S1 task (divides C)
    BV: tl.constexpr,  # value rows per S3 task (divides V)
    NSP: tl.constexpr,  # num_splits padded to a power of two
    R2P: tl.constexpr,
    PAGE: tl.constexpr,
    UPCAST: tl.constexpr,  # fp32 dots (the interpreter has no bf16 matmul)
    FP8: tl.constexpr,  # w_qkv and w_o in e4m3 with block scales (weight-only: x stays bf16)
    NORM: tl.constexpr,  # SN: x = rmsnorm(xin (+ delta)) first, one task a token
    HAS_DELTA: tl.constexpr,
    DP: tl.constexpr,  # D padded to a power of two (SN's row)
    QL: tl.constexpr,  # q_lora_rank; 0: none (q_proj's rows in w_qkv)
    QLP: tl.constexpr,  # QL padded to a power of two (SQN's row)
    BKQ: tl.constexpr,  # SQB's K step
    MAX_POLLS: tl.constexpr,
):  # fmt: skip
    Q: tl.constexpr = H * (N + R)
    KVO: tl.constexpr = QL if QL > 0 else Q  # where kv_a's rows start in qkv
    NQKV: tl.constexpr = KVO + C + R
    QS: tl.constexpr = Q if QL > 0 else NQKV  # the row stride of the queries' buffer
    K: tl.constexpr = C + R
    HV: tl.constexpr = H * V
    NCB: tl.constexpr = C // BC
    NVB: tl.constexpr = V // BV
    NHB: tl.constexpr = (H + 15) // 16
    act = qkv_ptr.dtype.element_ty
    q_src = qb_ptr if QL > 0 else qkv_ptr  # the queries [T, H * (N + R)], row stride QS
    # Task counts and ends, in stage order.
    nn = T if NORM else 0
    n0 = tl.cdiv(NQKV, BN)
    nqn = T if QL > 0 else 0
    nqb = tl.cdiv(Q, BN) if QL > 0 else 0
    n1 = H * NCB + T
    n2 = T * NHB * num_splits
    n3 = T * H * NVB
    n4 = tl.cdiv(D, BN)
    en = nn
    e0 = en + n0
    eqn = e0 + nqn
    eqb = eqn + nqb
    e1 = eqb + n1
    e2 = e1 + n2
    e3 = e2 + n3
    e4 = e3 + n4
    given_up = cnt_ptr + _STAGES + 1  # GIVEN_UP
    offs_n = tl.arange(0, BN)
    offs_t = tl.arange(0, BT)
    offs_c = tl.arange(0, C)
    offs_j = tl.arange(0, R2P)
    ok_j = offs_j < R // 2
    P = tl.num_programs(0)
    for task in range(tl.program_id(0), e4, P):
        if task < en:  # SN: token `task`'s input norm (and residual add), as rms_norm's row
            xn_row = x_ptr + task * D
            if HAS_DELTA:  # the model's add_forward(delta, x): h = delta + x, stored
                rms_norm_row(delta_ptr + task * D, xin_ptr + task * D, nw_ptr, xn_row,
                             h_ptr + task * D, D, norm_eps, True, DP)  # fmt: skip
            else:
                rms_norm_row(xin_ptr + task * D, xin_ptr, nw_ptr, xn_row, h_ptr, D, norm_eps,
                             False, DP)  # fmt: skip
            count_in(cnt_ptr + _SN)
        elif task < e0:  # S0: 16 rows of qkv for every token (its input: x, or SN's)
            row0 = (task - en) * BN
            rows = row0 + offs_n
            w0 = first_k_step(wqkv_ptr, row0, D, NQKV, BN, BK)
            if NORM:
                wait_count(cnt_ptr + _SN, T, given_up, MAX_POLLS)
            y = rows_gemv(x_ptr, stride_x, T, wqkv_ptr, sqkv_ptr, row0, w0, D, NQKV, BN, BT, BK,
                          FP8)  # fmt: skip
            tl.store(qkv_ptr + offs_t[:, None] * NQKV + rows[None, :], to_dtype_rn(y, act),
                     mask=(offs_t < T)[:, None] & (rows < NQKV)[None, :])  # fmt: skip
            count_in(cnt_ptr + 0)
        elif task < eqn:  # SQN: token t's q_a_layernorm, into qa
            t = task - e0
            wait_count(cnt_ptr + 0, n0, given_up, MAX_POLLS)
            rms_norm_row(qkv_ptr + t * NQKV, qkv_ptr, qan_ptr, qa_ptr + t * QL, qa_ptr, QL, q_eps,
                         False, QLP)  # fmt: skip
            count_in(cnt_ptr + _SQN)
        elif task < eqb:  # SQB: 16 rows of q_b_proj for every token
            row0 = (task - eqn) * BN
            rows = row0 + offs_n
            w0 = first_k_step(wqb_ptr, row0, QL, Q, BN, BKQ)
            wait_count(cnt_ptr + _SQN, T, given_up, MAX_POLLS)
            y = rows_gemv(qa_ptr, QL, T, wqb_ptr, sqb_ptr, row0, w0, QL, Q, BN, BT, BKQ, FP8)
            tl.store(qb_ptr + offs_t[:, None] * Q + rows[None, :], to_dtype_rn(y, act),
                     mask=(offs_t < T)[:, None] & (rows < Q)[None, :])  # fmt: skip
            count_in(cnt_ptr + _SQB)
        elif task < e1:  # S1: a head's latent columns of the query, or a token's cache row
            i = task - eqb
            if i < H * NCB:
                h = i // NCB
                cols = (i % NCB) * BC + tl.arange(0, BC)
                offs_nn = tl.arange(0, N)
                w_uk = tl.load(wkvb_ptr + h * (N + V) * C + offs_nn[:, None] * C + cols[None, :])
                if QL > 0:  # SQB counted in: S0 and SQN have too (their waits came first)
                    wait_count(cnt_ptr + _SQB, nqb, given_up, MAX_POLLS)
                else:
                    wait_count(cnt_ptr + 0, n0, given_up, MAX_POLLS)
                rows16 = tl.arange(0, 16)  # tl.dot's smallest M: rows past T read as zeros
                qn = tl.load(q_src + rows16[:, None] * QS + h * (N + R) + offs_nn[None, :],
                             mask=(rows16 < T)[:, None], other=0.0)  # fmt: skip
                if UPCAST:
                    q_lat = tl.dot(qn.to(tl.float32), w_uk.to(tl.float32), input_precision="ieee")
                else:
                    q_lat = tl.dot(qn, w_uk)
                tl.store(q_ptr + rows16[:, None] * (H * K) + h * K + cols[None, :],
                         to_dtype_rn(q_lat, act), mask=(rows16 < T)[:, None])  # fmt: skip
                if i % NCB == 0:  # the head's rope part, token by token (each its own angle)
                    one = tl.zeros([1], dtype=tl.int32)
                    for t in tl.static_range(BT):
                        if t < T:
                            c = tl.load(cos_ptr + t * (R // 2) + offs_j, mask=ok_j, other=0.0)
                            sn = tl.load(sin_ptr + t * (R // 2) + offs_j, mask=ok_j, other=0.0)
                            _rotate_heads(q_src + t * QS + h * (N + R) + N, 0,
                                          q_ptr + t * (H * K) + h * K + C, 0, one, offs_j,
                                          ok_j[None, :], c, sn, True)  # fmt: skip
            else:
                t = i - H * NCB
                wait_count(cnt_ptr + 0, n0, given_up, MAX_POLLS)
                c = tl.load(cos_ptr + t * (R // 2) + offs_j, mask=ok_j, other=0.0)
                sn = tl.load(sin_ptr + t * (R // 2) + offs_j, mask=ok_j, other=0.0)
                _write_cache_row(
                    cache_ptr + tl.load(slots_ptr + t).to(tl.int64) * K,
                    qkv_ptr + t * NQKV + KVO, qkv_ptr + t * NQKV + KVO + C, kvn_ptr, eps, C,
                    offs_c, offs_c < C, offs_j, ok_j, c, sn, True, True,
                )  # fmt: skip
            count_in(cnt_ptr + 1)
        elif task < e2:  # S2: one (token, head block, split)'s attention partials
            i = task - e1
            split = i % num_splits
            hb = (i // num_splits) % NHB
            t = i // (num_splits * NHB)
            wait_count(cnt_ptr + 1, n1, given_up, MAX_POLLS)
            heads = hb * 16 + tl.arange(0, 16)
            h_ok = heads < H
            offs_p = tl.arange(0, R)
            q_rows = q_ptr + t * (H * K) + heads[:, None] * K
            q_nope = tl.load(q_rows + offs_c[None, :], mask=h_ok[:, None], other=0.0)
            q_rope = tl.load(q_rows + C + offs_p[None, :], mask=h_ok[:, None], other=0.0)
            if UPCAST:
                q_nope = q_nope.to(tl.float32)
                q_rope = q_rope.to(tl.float32)
            seq_len = tl.load(len_ptr + t)
            limit = tl.zeros([16], dtype=tl.int32) + seq_len - 1  # one new token a sequence
            per_split = tl.cdiv(tl.cdiv(seq_len, PAGE), num_splits)
            t_start = split * per_split * PAGE
            t_end = tl.minimum(seq_len, t_start + per_split * PAGE)
            acc, m_i, l_i = _attend_pages(
                q_nope, q_rope, cache_ptr, bt_ptr + t * stride_btb, t_start, t_end, limit,
                sm_scale_log2, stride_kvp, stride_kvt, 16, C, R, C, R, PAGE, UPCAST,
            )  # fmt: skip
            has = l_i > 0.0
            o = acc / tl.where(has, l_i, 1.0)[:, None]
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            part = (t * H + heads) * NSP + split
            tl.store(po_ptr + part[:, None] * C + offs_c[None, :], o, mask=h_ok[:, None])
            tl.store(plse_ptr + part, lse, mask=h_ok)
            count_in(cnt_ptr + 2)
        elif task < e3:  # S3: a head's splits merged, then BV of its value rows
            i = task - e2
            vb = i % NVB
            h = (i // NVB) % H
            t = i // (NVB * H)
            vrows = vb * BV + tl.arange(0, BV)
            w_uv = tl.load(wkvb_ptr + (h * (N + V) + N + vrows[:, None]) * C + offs_c[None, :])
            wait_count(cnt_ptr + 2, n2, given_up, MAX_POLLS)
            one = tl.zeros([1], dtype=tl.int32)
            row = (t * H + h) * NSP
            merged, _ = _merge_split_rows(
                po_ptr + (row + one)[:, None] * C + offs_c[None, :], plse_ptr + row + one,
                C, num_splits, one == 0, offs_c < C, NSP,
            )  # fmt: skip
            o_lat = to_dtype_rn(merged, act).to(tl.float32)  # the merge's stored rounding
            v = tl.sum(w_uv.to(tl.float32) * o_lat, axis=1)
            tl.store(v_ptr + t * HV + h * V + vrows, to_dtype_rn(v, act))
            count_in(cnt_ptr + 3)
        else:  # S4: 16 rows of o_proj for every token
            row0 = (task - e3) * BN
            rows = row0 + offs_n
            w0 = first_k_step(wo_ptr, row0, HV, D, BN, BK)
            wait_count(cnt_ptr + 3, n3, given_up, MAX_POLLS)
            y = rows_gemv(v_ptr, HV, T, wo_ptr, so_ptr, row0, w0, HV, D, BN, BT, BK, FP8)
            tl.store(out_ptr + offs_t[:, None] * D + rows[None, :], to_dtype_rn(y, act),
                     mask=(offs_t < T)[:, None] & (rows < D)[None, :])  # fmt: skip
    # The last program to finish has seen every count: zero them for the next launch (not the
    # given-up waits: the caller reads those).
    finish(cnt_ptr, _STAGES)
