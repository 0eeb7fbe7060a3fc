"""Chunked gated delta rule prefill in Triton (math: shared/design/gdn-math.md).

Three kernels, plus one for long sequences with few heads:

1. `_inverse_kernel`, parallel over (chunk, value head): T = (I + A)^-1 for the chunk's
   A_ij = beta_i exp(G_i - G_j) k_i.k_j (j < i), by forward substitution on the four 16x16
   diagonal blocks and a blockwise merge, all fp32. Writes T: [B, T, HV, 64] fp32.
2. `_recurrence_kernel`, parallel over (partition, value head, column block), sequential
   over the chunks of its partition: U' = T diag(beta) V, U = U' - T diag(beta e^G) (K S), o = scale (e^G Q S + (Q K^T o L) U), S <- e^{G_C} S + K~^T U.
   In MAP mode it computes a partition's affine state map instead of outputs: the end
   state from a zero start (D, the V columns) and from start I with v = 0 (M, K columns).
3. `_chain_kernel`: the partition starts S_p = M_{p-1} S_{p-1} + D_{p-1}, per sequence.

Partitioning is exact (no decay assumption); with one partition per sequence the map and
chain kernels are skipped. Temporary memory: T (64 fp32 per token and value head, less
than q + k + v) and, with partitions, P small [K, V + K] maps.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .common import PRECISIONS, dot_dtype, interpreting, mm, mm_split_a, mm_split_ab, mm_split_b, sm_count

CHUNK_SIZE = 64
CHUNK = tl.constexpr(CHUNK_SIZE)  # the kernels' view of it


@triton.jit
def _load_rows(ptr, base, rows, n_valid, s_t, cols, n_cols, s_d, L2NORM: tl.constexpr):
    """rows x cols tile of one head, zero outside. Kept in the input dtype (an fp32 copy of a
    bf16 tile costs registers the state needs); L2-normalised per row in fp32 if asked."""
    mask = (rows[:, None] < n_valid) & (cols[None, :] < n_cols)
    x = tl.load(ptr + base + rows[:, None] * s_t + cols[None, :] * s_d, mask=mask, other=0.0)
    if L2NORM:
        x = x.to(tl.float32)
        x = x * tl.rsqrt(tl.sum(x * x, 1) + 1e-6)[:, None]
    return x


@triton.jit
def _load_tile(ptr, base, n_rows, n_cols, s_t, s_d, col0, BR: tl.constexpr, BC: tl.constexpr, L2NORM: tl.constexpr):
    """[BR, BC] tile from row 0, column col0 of an [n_rows, n_cols] view at ptr + base, zero
    outside. A block pointer: no per-element address tile in registers."""
    p = tl.make_block_ptr(ptr + base, (n_rows, n_cols), (s_t, s_d), (0, col0), (BR, BC), (1, 0))
    x = tl.load(p, boundary_check=(0, 1), padding_option="zero")
    if L2NORM:
        x = x.to(tl.float32)
        x = x * tl.rsqrt(tl.sum(x * x, 1) + 1e-6)[:, None]
    return x


@triton.jit
def _gram(a, b, DOT: tl.constexpr, EXACT: tl.constexpr):
    """a @ b^T for key/query tiles: one product when they are exact in DOT, else split."""
    if EXACT:
        return mm(a.to(DOT), tl.trans(b.to(DOT)), DOT)
    else:
        return mm_split_ab(a, tl.trans(b), DOT)


@triton.jit
def _diag_inverse(a):
    """(I + a)^-1 for a strictly lower 16x16 tile, by forward substitution."""
    r = tl.arange(0, 16)
    t = (r[:, None] == r[None, :]).to(tl.float32)
    for i in tl.static_range(1, 16):
        sel = r == i
        a_i = tl.sum(tl.where(sel[:, None], a, 0.0), 0)  # row i of a
        # T[i, :] = e_i - sum_{j < i} a[i, j] T[j, :]   (T[i, :] is still e_i here)
        new = sel.to(tl.float32) - tl.sum(a_i[:, None] * t, 0)
        t = tl.where(sel[:, None], new[None, :], t)
    return t


@triton.jit
def _f32mm(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _inverse_kernel(
    k_ptr, g_ptr, beta_ptr, t_ptr, chunk_ptr,
    s_kb, s_kt, s_kh, s_kd, s_gb, s_gt, s_gh, s_bb, s_bt, s_bh, s_tb, s_tt, s_th,
    GROUP: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
    L2NORM: tl.constexpr, K_EXACT: tl.constexpr, DOT: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    b = tl.load(chunk_ptr + i_c * 3).to(tl.int64)
    t0 = tl.load(chunk_ptr + i_c * 3 + 1).to(tl.int64)
    n = tl.load(chunk_ptr + i_c * 3 + 2)
    i_hk = i_h // GROUP
    k_base = b * s_kb + t0 * s_kt + i_hk * s_kh
    g_base = b * s_gb + t0 * s_gt + i_h * s_gh
    be_base = b * s_bb + t0 * s_bt + i_h * s_bh
    r = tl.arange(0, 16)
    ck = tl.arange(0, BK)

    k0 = _load_rows(k_ptr, k_base, r, n, s_kt, ck, K, s_kd, L2NORM)
    k1 = _load_rows(k_ptr, k_base, r + 16, n, s_kt, ck, K, s_kd, L2NORM)
    k2 = _load_rows(k_ptr, k_base, r + 32, n, s_kt, ck, K, s_kd, L2NORM)
    k3 = _load_rows(k_ptr, k_base, r + 48, n, s_kt, ck, K, s_kd, L2NORM)
    g0 = tl.load(g_ptr + g_base + r * s_gt, mask=r < n, other=0.0).to(tl.float32)
    g1 = tl.load(g_ptr + g_base + (r + 16) * s_gt, mask=r + 16 < n, other=0.0).to(tl.float32)
    g2 = tl.load(g_ptr + g_base + (r + 32) * s_gt, mask=r + 32 < n, other=0.0).to(tl.float32)
    g3 = tl.load(g_ptr + g_base + (r + 48) * s_gt, mask=r + 48 < n, other=0.0).to(tl.float32)
    b0 = tl.load(beta_ptr + be_base + r * s_bt, mask=r < n, other=0.0).to(tl.float32)
    b1 = tl.load(beta_ptr + be_base + (r + 16) * s_bt, mask=r + 16 < n, other=0.0).to(tl.float32)
    b2 = tl.load(beta_ptr + be_base + (r + 32) * s_bt, mask=r + 32 < n, other=0.0).to(tl.float32)
    b3 = tl.load(beta_ptr + be_base + (r + 48) * s_bt, mask=r + 48 < n, other=0.0).to(tl.float32)
    # in-chunk cumulative log decay, block by block, in fp64 (see _chunk_step)
    g0, g1, g2, g3 = g0.to(tl.float64), g1.to(tl.float64), g2.to(tl.float64), g3.to(tl.float64)
    G0 = tl.cumsum(g0, 0)
    G1 = tl.cumsum(g1, 0) + tl.sum(g0, 0)
    G2 = tl.cumsum(g2, 0) + tl.sum(g0, 0) + tl.sum(g1, 0)
    G3 = tl.cumsum(g3, 0) + tl.sum(g0, 0) + tl.sum(g1, 0) + tl.sum(g2, 0)

    strict = r[:, None] > r[None, :]
    # diagonal blocks: exponent masked to <= 0 before exp
    a00 = _gram(k0, k0, DOT, K_EXACT) * tl.exp(tl.where(strict, (G0[:, None] - G0[None, :]).to(tl.float32), float("-inf"))) * b0[:, None]
    a11 = _gram(k1, k1, DOT, K_EXACT) * tl.exp(tl.where(strict, (G1[:, None] - G1[None, :]).to(tl.float32), float("-inf"))) * b1[:, None]
    a22 = _gram(k2, k2, DOT, K_EXACT) * tl.exp(tl.where(strict, (G2[:, None] - G2[None, :]).to(tl.float32), float("-inf"))) * b2[:, None]
    a33 = _gram(k3, k3, DOT, K_EXACT) * tl.exp(tl.where(strict, (G3[:, None] - G3[None, :]).to(tl.float32), float("-inf"))) * b3[:, None]
    # below-diagonal blocks: row tokens come after column tokens, so G_i - G_j <= 0
    a10 = _gram(k1, k0, DOT, K_EXACT) * tl.exp((G1[:, None] - G0[None, :]).to(tl.float32)) * b1[:, None]
    a20 = _gram(k2, k0, DOT, K_EXACT) * tl.exp((G2[:, None] - G0[None, :]).to(tl.float32)) * b2[:, None]
    a21 = _gram(k2, k1, DOT, K_EXACT) * tl.exp((G2[:, None] - G1[None, :]).to(tl.float32)) * b2[:, None]
    a30 = _gram(k3, k0, DOT, K_EXACT) * tl.exp((G3[:, None] - G0[None, :]).to(tl.float32)) * b3[:, None]
    a31 = _gram(k3, k1, DOT, K_EXACT) * tl.exp((G3[:, None] - G1[None, :]).to(tl.float32)) * b3[:, None]
    a32 = _gram(k3, k2, DOT, K_EXACT) * tl.exp((G3[:, None] - G2[None, :]).to(tl.float32)) * b3[:, None]

    t00 = _diag_inverse(a00)
    t11 = _diag_inverse(a11)
    t22 = _diag_inverse(a22)
    t33 = _diag_inverse(a33)
    # block forward substitution: T_ij = -T_ii sum_{j <= m < i} A_im T_mj
    t10 = -_f32mm(t11, _f32mm(a10, t00))
    t21 = -_f32mm(t22, _f32mm(a21, t11))
    t32 = -_f32mm(t33, _f32mm(a32, t22))
    t20 = -_f32mm(t22, _f32mm(a20, t00) + _f32mm(a21, t10))
    t31 = -_f32mm(t33, _f32mm(a31, t11) + _f32mm(a32, t21))
    t30 = -_f32mm(t33, _f32mm(a30, t00) + _f32mm(a31, t10) + _f32mm(a32, t20))

    zero = tl.zeros((16, 16), tl.float32)
    base = t_ptr + b * s_tb + t0 * s_tt + i_h * s_th
    p = base + r[:, None] * s_tt + r[None, :]
    tl.store(p, t00, mask=r[:, None] < n)
    tl.store(p + 16, zero, mask=r[:, None] < n)
    tl.store(p + 32, zero, mask=r[:, None] < n)
    tl.store(p + 48, zero, mask=r[:, None] < n)
    p = p + 16 * s_tt
    tl.store(p, t10, mask=r[:, None] + 16 < n)
    tl.store(p + 16, t11, mask=r[:, None] + 16 < n)
    tl.store(p + 32, zero, mask=r[:, None] + 16 < n)
    tl.store(p + 48, zero, mask=r[:, None] + 16 < n)
    p = p + 16 * s_tt
    tl.store(p, t20, mask=r[:, None] + 32 < n)
    tl.store(p + 16, t21, mask=r[:, None] + 32 < n)
    tl.store(p + 32, t22, mask=r[:, None] + 32 < n)
    tl.store(p + 48, zero, mask=r[:, None] + 32 < n)
    p = p + 16 * s_tt
    tl.store(p, t30, mask=r[:, None] + 48 < n)
    tl.store(p + 16, t31, mask=r[:, None] + 48 < n)
    tl.store(p + 32, t32, mask=r[:, None] + 48 < n)
    tl.store(p + 48, t33, mask=r[:, None] + 48 < n)


@triton.jit
def _chunk_step(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, t_ptr, o_ptr, state, b, t0, t_end, i_h, i_hk, c0, is_m,
                s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd,
                s_gb, s_gt, s_gh, s_bb, s_bt, s_bh, s_tb, s_tt, s_th, s_ob, s_ot, s_oh, scale,
                K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MAP: tl.constexpr,
                L2NORM: tl.constexpr, K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, DOT: tl.constexpr,
                PREC: tl.constexpr):
    """One chunk of the recurrence: writes the chunk's outputs (unless MAP), returns the new state."""
    rt = tl.arange(0, CHUNK)
    causal = rt[:, None] >= rt[None, :]
    n = t_end - t0
    n_rows = tl.minimum(n, CHUNK).to(tl.int32)
    k = _load_tile(k_ptr, b * s_kb + t0 * s_kt + i_hk * s_kh, n_rows, K, s_kt, s_kd, 0, CHUNK, BK, L2NORM)
    g = tl.load(g_ptr + b * s_gb + (t0 + rt) * s_gt + i_h * s_gh, mask=rt < n, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + b * s_bb + (t0 + rt) * s_bt + i_h * s_bh, mask=rt < n, other=0.0).to(tl.float32)
    tinv = _load_tile(t_ptr, b * s_tb + t0 * s_tt + i_h * s_th, n_rows, CHUNK, s_tt, 1, 0, CHUNK, CHUNK, False)
    # Prefix sums and their differences in fp64: G_C - G_j and G_i - G_j are differences of
    # large numbers under strong decay (|G| ~ 1e3), where fp32 would lose the recent tokens.
    gate64 = tl.cumsum(g.to(tl.float64), 0)
    gate_last64 = tl.sum(g.to(tl.float64), 0)
    gate_exp = tl.exp(gate64.to(tl.float32))
    t_u = tinv * beta[None, :]
    t_w = t_u * gate_exp[None, :]
    # U = U' - W S with W = T_w K, evaluated as T_w (K S): no [C, K] W tile in registers
    if K_EXACT:
        ks = mm_split_b(k.to(DOT), state, DOT, PREC)  # [C, BV]
    else:
        ks = mm_split_ab(k, state, DOT, PREC)
    u = -mm_split_ab(t_w, ks, DOT, PREC)
    if not is_m:
        v = _load_tile(v_ptr, b * s_vb + t0 * s_vt + i_h * s_vh, n_rows, V, s_vt, s_vd, c0, CHUNK, BV, False)
        if V_EXACT:
            u += mm_split_a(t_u, v.to(DOT), DOT, PREC)
        else:
            u += mm_split_ab(t_u, v, DOT, PREC)
    if not MAP:
        q = _load_tile(q_ptr, b * s_qb + t0 * s_qt + i_hk * s_qh, n_rows, K, s_qt, s_qd, 0, CHUNK, BK, L2NORM)
        # G_i - G_j from fp32 hi + lo parts of G: the hi difference is exact where it cancels
        # (Sterbenz), so this matches an fp64 difference without an fp64 [C, C] tile.
        g_hi = gate64.to(tl.float32)
        g_lo = (gate64 - g_hi.to(tl.float64)).to(tl.float32)
        diff = (g_hi[:, None] - g_hi[None, :]) + (g_lo[:, None] - g_lo[None, :])
        decay = tl.exp(tl.where(causal, diff, float("-inf")))
        a_qk = _gram(q, k, DOT, K_EXACT) * decay
        if K_EXACT:
            o = mm_split_b(q.to(DOT), state, DOT, PREC)
        else:
            o = mm_split_ab(q, state, DOT, PREC)
        o = o * gate_exp[:, None] + mm_split_ab(a_qk, u, DOT, PREC)
        o_p = tl.make_block_ptr(o_ptr + b * s_ob + t0 * s_ot + i_h * s_oh, (n_rows, V), (s_ot, 1), (0, c0),
                                (CHUNK, BV), (1, 0))
        tl.store(o_p, (o * scale).to(o_ptr.dtype.element_ty), boundary_check=(0, 1))
    u_tilde = u * tl.exp((gate_last64 - gate64).to(tl.float32))[:, None]  # exp(G_C - G_j) <= 1
    if K_EXACT:
        upd = mm_split_b(tl.trans(k.to(DOT)), u_tilde, DOT, PREC)
    else:
        upd = mm_split_ab(tl.trans(k), u_tilde, DOT, PREC)
    state = state * tl.exp(gate_last64.to(tl.float32)) + upd
    return state


@triton.jit
def _recurrence_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, t_ptr, o_ptr,
    state_in_ptr, state_out_ptr, map_d_ptr, map_m_ptr, part_ptr,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd,
    s_gb, s_gt, s_gh, s_bb, s_bt, s_bh, s_tb, s_tt, s_th, s_ob, s_ot, s_oh,
    scale,
    HV: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NVB: tl.constexpr, MAP: tl.constexpr, PARTITIONED: tl.constexpr, HAS_STATE_IN: tl.constexpr,
    STORE_FINAL: tl.constexpr, L2NORM: tl.constexpr, K_EXACT: tl.constexpr, V_EXACT: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr, WHILE_LOOPS: tl.constexpr,
):
    i_p = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    row = part_ptr + i_p * 6
    b = tl.load(row).to(tl.int64)
    t_start = tl.load(row + 1).to(tl.int64)
    t_end = tl.load(row + 2).to(tl.int64)
    seq = tl.load(row + 3).to(tl.int64)
    slot = tl.load(row + 4).to(tl.int64)  # partition index (starts) or map row
    is_last = tl.load(row + 5)
    i_hk = i_h // GROUP

    # MAP mode: column blocks [0, NVB) are D (values, zero start), the rest M (start I, v = 0).
    is_m = i_v >= NVB  # always False outside MAP mode: that grid has NVB column blocks
    rk = tl.arange(0, BK)
    c0 = (i_v - NVB * is_m.to(tl.int32)) * BV
    cv = c0 + tl.arange(0, BV)
    n_cols = tl.where(is_m, K, V)
    cmask = cv < n_cols
    smask = (rk[:, None] < K) & cmask[None, :]

    if MAP:
        state = tl.where(is_m & (rk[:, None] == cv[None, :]), 1.0, 0.0)
    else:
        state = tl.zeros((BK, BV), tl.float32)
        if HAS_STATE_IN:
            if PARTITIONED:
                src = slot
            else:
                src = seq
            p = state_in_ptr + (src * HV + i_h) * K * V + rk[:, None] * V + cv[None, :]
            state = tl.load(p, mask=smask, other=0.0).to(tl.float32)

    if WHILE_LOOPS:
        t0 = t_start
        while t0 < t_end:
            state = _chunk_step(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, t_ptr, o_ptr, state, b, t0, t_end, i_h, i_hk,
                                c0, is_m, s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh,
                                s_vd, s_gb, s_gt, s_gh, s_bb, s_bt, s_bh, s_tb, s_tt, s_th, s_ob, s_ot, s_oh, scale,
                                K, V, BK, BV, MAP, L2NORM, K_EXACT, V_EXACT, DOT, PREC)
            t0 += CHUNK
    else:
        for t0 in range(t_start, t_end, CHUNK):
            state = _chunk_step(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, t_ptr, o_ptr, state, b, t0, t_end, i_h, i_hk,
                                c0, is_m, s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh,
                                s_vd, s_gb, s_gt, s_gh, s_bb, s_bt, s_bh, s_tb, s_tt, s_th, s_ob, s_ot, s_oh, scale,
                                K, V, BK, BV, MAP, L2NORM, K_EXACT, V_EXACT, DOT, PREC)

    if MAP:
        if is_m:
            p = map_m_ptr + (slot * HV + i_h) * K * K + rk[:, None] * K + cv[None, :]
        else:
            p = map_d_ptr + (slot * HV + i_h) * K * V + rk[:, None] * V + cv[None, :]
        tl.store(p, state, mask=smask)
    elif STORE_FINAL:
        if is_last != 0:
            p = state_out_ptr + (seq * HV + i_h) * K * V + rk[:, None] * V + cv[None, :]
            tl.store(p, state, mask=smask)


@triton.jit
def _chain_kernel(
    map_d_ptr, map_m_ptr, h0_ptr, starts_ptr, seq_ptr,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKC: tl.constexpr,
    HAS_H0: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """Starts of the partitions of one sequence: S_0 = h0, S_p = M_{p-1} S_{p-1} + D_{p-1}.

    The product contracts over K in slices of BKC rows of S_{p-1}, read back from `starts`
    (this program wrote them; the barrier makes them visible), so the M tile in flight is
    [BK, BKC], not [BK, BK] (which is 256 KB at K = 256).
    """
    i_s = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    row = seq_ptr + i_s * 4
    first = tl.load(row).to(tl.int64)
    count = tl.load(row + 1)
    first_map = tl.load(row + 2).to(tl.int64)
    seq = tl.load(row + 3).to(tl.int64)
    rk = tl.arange(0, BK)
    rc = tl.arange(0, BKC)
    cv = i_v * BV + tl.arange(0, BV)
    smask = (rk[:, None] < K) & (cv[None, :] < V)
    off = rk[:, None] * V + cv[None, :]
    if HAS_H0:
        state = tl.load(h0_ptr + (seq * HV + i_h) * K * V + off, mask=smask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BK, BV), tl.float32)
    tl.store(starts_ptr + (first * HV + i_h) * K * V + off, state, mask=smask)
    j = 1
    while j < count:  # a handful of partitions: a while loop is fine here (and in the interpreter)
        tl.debug_barrier()  # the previous start, stored by all threads, is read back in slices
        m_row = first_map + j - 1
        prev = starts_ptr + ((first + j - 1) * HV + i_h) * K * V
        acc = tl.load(map_d_ptr + (m_row * HV + i_h) * K * V + off, mask=smask, other=0.0)
        for c0 in tl.static_range(0, BK, BKC):
            cols = c0 + rc
            m = tl.load(map_m_ptr + (m_row * HV + i_h) * K * K + rk[:, None] * K + cols[None, :],
                        mask=(rk[:, None] < K) & (cols[None, :] < K), other=0.0)
            s = tl.load(prev + cols[:, None] * V + cv[None, :], mask=(cols[:, None] < K) & (cv[None, :] < V),
                        other=0.0)
            acc += mm_split_ab(m, s, DOT, PREC)
        tl.store(starts_ptr + ((first + j) * HV + i_h) * K * V + off, acc, mask=smask)
        j += 1


# ---------------------------------------------------------------------------------------
# host side


# Launch choices, measured on the GPU (benchmarks/prefill_variants.py, NOTES.md).
TUNING = {
    "precision": "split",  # products with an fp32 operand: "split" | "tf32" | "bf16" (common.PRECISIONS)
    "block_v": None,  # state column block; None: 64 for K <= 128, else 32
    "warps_inverse": 2,
    "warps_recurrence": 4,
}


def _block_v(dk: int, dv: int) -> int:
    """Column block of the state: the [K, BV] fp32 state tile lives in registers."""
    bk = max(16, triton.next_power_of_2(dk))
    bv = TUNING["block_v"] or (64 if bk <= 128 else 32)
    return max(16, min(bv, triton.next_power_of_2(dv)))


def auto_partition_chunks(num_seqs: int, total_chunks: int, longest_chunks: int, hv: int, nvb: int,
                          device: torch.device) -> int:
    """Chunks per partition. One partition per sequence when the (sequence, head, column
    block) programs already make two waves; else split so that the partitions' programs make
    about two waves, never below MIN_PARTITION_CHUNKS chunks: the map pass and the chain cost
    about as much as the output pass, so short partitions lose (sweep in NOTES.md)."""
    if device.type != "cuda":
        return longest_chunks  # CPU / interpreter: no parallelism to win
    target = 2 * sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if num_seqs * hv * nvb >= target:
        return longest_chunks
    return max(MIN_PARTITION_CHUNKS, math.ceil(total_chunks * hv * nvb / target))


MIN_PARTITION_CHUNKS = 32


@functools.lru_cache(maxsize=128)
def _plan(seqs: tuple, partition_chunks: int, device: torch.device):
    """Tables for one sequence layout: chunks, partitions (output pass), maps and chains."""
    chunks, parts, maps, chains = [], [], [], []
    span = partition_chunks * CHUNK_SIZE
    for n, (b, start, end) in enumerate(seqs):
        for t0 in range(start, end, CHUNK_SIZE):
            chunks.append((b, t0, min(CHUNK_SIZE, end - t0)))
        bounds = list(range(start, end, span)) or [start]
        first = len(parts)
        first_map = len(maps)
        for i, t0 in enumerate(bounds):
            t1 = min(t0 + span, end)
            parts.append((b, t0, t1, n, len(parts), int(i == len(bounds) - 1)))
            if i < len(bounds) - 1:
                maps.append((b, t0, t1, n, len(maps), 0))
        chains.append((first, len(bounds), first_map, n))
    as_tensor = lambda rows, width: torch.tensor(rows, dtype=torch.int32).reshape(-1, width).to(device)  # noqa: E731
    return {
        "chunks": as_tensor(chunks, 3),
        "parts": as_tensor(parts, 6),
        "maps": as_tensor(maps, 6),
        "chains": as_tensor(chains, 4),
        "num_chunks": len(chunks),
        "num_parts": len(parts),
        "num_maps": len(maps),
    }


def launch_config(dtype: torch.dtype, dk: int, dv: int, group: int, hv: int, use_qk_l2norm: bool) -> dict:
    """Constexprs and launch options of the prefill kernels for these sizes: the one source
    for the launches below and for the offline sm_90 compile test (tests/triton_kernels)."""
    bk = max(16, triton.next_power_of_2(dk))
    bv = _block_v(dk, dv)
    dot = dot_dtype(dtype)
    exact = dtype == torch.bfloat16  # bf16 q/k/v tiles are exact tensor-core operands
    k_exact = exact and not use_qk_l2norm
    prec = PRECISIONS[TUNING["precision"]]
    # Pipelined tile loads live in shared memory (227 KB a block). fp32 operands at K = 128:
    # 296 KB at 3 stages, 131 KB at 1; bf16 at K = 256: 280 KB at 3, 197 KB at 2.
    stages = 1 if dot == tl.float32 else (2 if bk > 128 else 3)
    warps = 4 if interpreting() else TUNING["warps_recurrence"]
    inverse = dict(GROUP=group, K=dk, BK=bk, L2NORM=use_qk_l2norm, K_EXACT=k_exact, DOT=dot,
                   num_warps=TUNING["warps_inverse"], num_stages=stages)
    recurrence = dict(HV=hv, GROUP=group, K=dk, V=dv, BK=bk, BV=bv, NVB=triton.cdiv(dv, bv), L2NORM=use_qk_l2norm,
                      K_EXACT=k_exact, V_EXACT=exact, DOT=dot, PREC=prec, WHILE_LOOPS=interpreting(),
                      num_warps=warps, num_stages=stages)
    chain = dict(HV=hv, K=dk, V=dv, BK=bk, BV=bv, BKC=min(bk, 64), DOT=dot, PREC=prec, num_warps=warps,
                 num_stages=stages)
    return {"inverse": inverse, "recurrence": recurrence, "chain": chain,
            "nvb": triton.cdiv(dv, bv), "nkb": triton.cdiv(dk, bv)}


def chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                               cu_seqlens=None, use_qk_l2norm=False, partition_chunks: int | None = None,
                               out: torch.Tensor | None = None, final_state_out: torch.Tensor | None = None):
    """Validated inputs in the public layout. Returns (o [B, T, HV, V], final state or None).

    `partition_chunks`: chunks per sequence partition (None: `auto_partition_chunks`; a
    value >= the longest sequence's chunk count means one partition per sequence).
    `out`, `final_state_out`: optional preallocated outputs (the tests poison them).
    """
    bsz, t_len, _, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    group = hv // q.shape[2]
    device = q.device
    if cu_seqlens is not None:
        cu = [int(x) for x in cu_seqlens.tolist()]
        seqs = tuple((0, cu[i], cu[i + 1]) for i in range(len(cu) - 1))
    else:
        seqs = tuple((b, 0, t_len) for b in range(bsz))
    num_seqs = len(seqs)
    cfg = launch_config(q.dtype, dk, dv, group, hv, use_qk_l2norm)
    nvb, nkb = cfg["nvb"], cfg["nkb"]
    chunk_counts = [triton.cdiv(e - s, CHUNK_SIZE) for _, s, e in seqs]
    longest = max(chunk_counts + [1])
    if partition_chunks is None:
        partition_chunks = auto_partition_chunks(num_seqs, sum(chunk_counts), longest, hv, nvb, device)
    partition_chunks = max(1, min(int(partition_chunks), longest))
    plan = _plan(seqs, partition_chunks, device)

    o = out if out is not None else torch.empty(bsz, t_len, hv, dv, dtype=q.dtype, device=device)
    final = None
    if output_final_state:
        final = final_state_out if final_state_out is not None else torch.empty(
            num_seqs, hv, dk, dv, dtype=torch.float32, device=device)
    if t_len == 0 or num_seqs == 0:
        if final is not None:
            final.copy_(initial_state if initial_state is not None else torch.zeros_like(final))
        return o, final
    h0 = initial_state.contiguous() if initial_state is not None else None
    tinv = torch.empty(bsz, t_len, hv, CHUNK_SIZE, dtype=torch.float32, device=device)

    _inverse_kernel[(plan["num_chunks"], hv)](
        k, g, beta, tinv, plan["chunks"], *k.stride(), *g.stride(), *beta.stride(), *tinv.stride()[:3],
        **cfg["inverse"],
    )
    partitioned = plan["num_maps"] > 0
    strides = (*q.stride(), *k.stride(), *v.stride(), *g.stride(), *beta.stride(), *tinv.stride()[:3],
               *o.stride()[:3])
    state_in = h0
    if partitioned:
        map_d = torch.empty(plan["num_maps"], hv, dk, dv, dtype=torch.float32, device=device)
        map_m = torch.empty(plan["num_maps"], hv, dk, dk, dtype=torch.float32, device=device)
        _recurrence_kernel[(plan["num_maps"], hv, nvb + nkb)](
            q, k, v, g, beta, tinv, o, None, None, map_d, map_m, plan["maps"], *strides, scale,
            MAP=True, PARTITIONED=True, HAS_STATE_IN=False, STORE_FINAL=False, **cfg["recurrence"],
        )
        starts = torch.empty(plan["num_parts"], hv, dk, dv, dtype=torch.float32, device=device)
        _chain_kernel[(num_seqs, hv, nvb)](
            map_d, map_m, h0, starts, plan["chains"], HAS_H0=h0 is not None, **cfg["chain"],
        )
        state_in = starts
    _recurrence_kernel[(plan["num_parts"], hv, nvb)](
        q, k, v, g, beta, tinv, o, state_in, final, None, None, plan["parts"], *strides, scale,
        MAP=False, PARTITIONED=partitioned, HAS_STATE_IN=state_in is not None, STORE_FINAL=final is not None,
        **cfg["recurrence"],
    )
    return o, final
