"""Chunked gated delta rule prefill in Triton (math: shared/design/gdn-math.md).

Three kernels, plus one for long sequences with few heads:

1. `_inverse_kernel`, parallel over (chunk, value head): T = (I + A)^-1 for the chunk's
   A_ij = beta_i exp(G_i - G_j) k_i.k_j (j < i), by blocked substitution with doubling
   block sizes on 64 x 64 tiles (tensor cores, fp32-accurate products). Writes
   T_u = T diag(beta) [B, T, HV, 64] (fp32, or a bf16 hi + lo pair for bf16 inputs) and
   the in-chunk prefix sums G of g, in log2 units (G log2 e), as fp32 hi + lo [B, T, HV, 2].
   On Hopper with the Gluon passes: `inverse_sm90._inverse_kernel` (the same steps).
2. `_recurrence_kernel`, parallel over (partition, value head, column block), sequential
   over the chunks of its partition: U = T_u (V - e^G (K S)),
   o = scale (e^G Q S + (Q K^T o L) U), S <- e^{G_C} S + K^T (e^{G_C - G} U).
   In MAP mode it computes a partition's affine state map instead of outputs: the end
   state from a zero start (D, the V columns) and from start I with v = 0 (M, K columns).
   On Hopper, bf16: in Gluon (`chunk_sm90._recurrence_kernel`), at K = 128 and, with column
   blocks of 32, K = 256.
3. `_chain_kernel`: the partition starts S_p = M_{p-1} S_{p-1} + D_{p-1}, per sequence.

Partitioning is exact (no decay assumption); with one partition per sequence the map and
chain kernels are skipped. The in-kernel L2 norm is folded, not applied (chunk_sm90's module
doc has the algebra): the inverse takes beta / (|k|^2 + eps) and stores the rows' norms, the
recurrence scales v's rows by sqrt(|k|^2 + eps) and o's by 1 / sqrt(|q|^2 + eps), and the raw
q, k stay the products' operands (exact for bf16; no fp32 normalised tiles: those needed 333 KB
of shared memory at K = 256, over Hopper's 227). The recurrence reads its chunk tiles through TMA descriptors
where the layout allows (Hopper; block pointers otherwise). Temporary memory: T_u and G
(66 fp32 per token and value head, less than q + k + v) and, with partitions, P small [K, V + K] maps.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

try:  # Gluon (Triton's explicit layer, Hopper): the passes where they cover the launch
    from . import chunk_sm90, inverse_sm90
except ImportError:  # a Triton without Gluon
    chunk_sm90 = inverse_sm90 = None
from ..reference.common import L2NORM_EPS as L2NORM_EPS_
from .launch import call_sites, launch
from .common import (PRECISIONS, cdiv, dot_dtype, hi_lo, interpreting, mm, mm_split_ab, mm_split_b,
                     next_power_of_2, sm_count)

CHUNK_SIZE = 64
CHUNK = tl.constexpr(CHUNK_SIZE)  # the kernels' view of it
LOG2E = tl.constexpr(1.4426950408889634)  # the gates' prefix sums are stored as G log2 e
# with the in-kernel L2 norm, gcum [B, T, HV, 4] holds after G's hi and lo: sqrt(|k|^2 + eps), then
# 1 / sqrt(|q|^2 + eps) (the folded norm: module doc; the same fields as chunk_sm90's)
NORM_K = tl.constexpr(2)
NORM_Q = tl.constexpr(3)
L2NORM_EPS = tl.constexpr(L2NORM_EPS_)


@triton.jit
def _load_rows(ptr, base, rows, n_valid, s_t, cols, n_cols, s_d):
    """rows x cols tile of one head, zero outside. Kept in the input dtype (an fp32 copy of a
    bf16 tile costs registers the state needs)."""
    mask = (rows[:, None] < n_valid) & (cols[None, :] < n_cols)
    return tl.load(ptr + base + rows[:, None] * s_t + cols[None, :] * s_d, mask=mask, other=0.0)


@triton.jit
def _load_tile(ptr, base, n_rows, n_cols, s_t, s_d, col0, BR: tl.constexpr, BC: tl.constexpr):
    """[BR, BC] tile from row 0, column col0 of an [n_rows, n_cols] view at ptr + base, zero
    outside. A block pointer: no per-element address tile in registers."""
    p = tl.make_block_ptr(ptr + base, (n_rows, n_cols), (s_t, s_d), (0, col0), (BR, BC), (1, 0))
    return tl.load(p, boundary_check=(0, 1), padding_option="zero")


@triton.jit
def _load_chunk(src, base, row, head, dim, col0, n_rows, n_cols, s_t, s_d, BR: tl.constexpr, BC: tl.constexpr,
                TMA: tl.constexpr):
    """[BR, BC] tile of one head's tokens. TMA: `src` is a descriptor of the tensor viewed as
    [B * T, heads * dim], the tile at (row, head * dim + col0): one bulk copy into shared
    memory, no per-thread addresses; rows past the chunk belong to the next sequence (or are
    zero past the tensor): the caller masks what they feed. Else a block pointer from
    `src` + `base`, zero past n_rows."""
    if TMA:
        x = src.load([row.to(tl.int32), (head * dim + col0).to(tl.int32)])
    else:
        x = _load_tile(src, base, n_rows, n_cols, s_t, s_d, col0, BR, BC)
    return x


@triton.jit
def _gram(a, b_t, DOT: tl.constexpr, GRAM_DOT: tl.constexpr):
    """a @ b_t for key/query tiles (b_t: a tile transposed, also batched [n, d, rows]): one
    product in GRAM_DOT, the tensor-core type the inputs are exact in (bf16 or fp16; exact
    products, fp32 sums), or split in DOT where there is none (GRAM_DOT None)."""
    if GRAM_DOT is not None:
        return mm(a.to(GRAM_DOT), b_t.to(GRAM_DOT), GRAM_DOT)
    else:
        return mm_split_ab(a, b_t, DOT)


@triton.jit
def _store_hi_lo(ptr, x, mask):
    """fp64 x as two fp32 numbers at ptr and ptr + 1: hi + lo carries ~48 bits."""
    hi = x.to(tl.float32)
    tl.store(ptr, hi, mask=mask)
    tl.store(ptr + 1, (x - hi.to(tl.float64)).to(tl.float32), mask=mask)


@triton.jit
def _diagonal_block_inverse(k, G, beta, DOT: tl.constexpr, GRAM_DOT: tl.constexpr):
    """The four 16 x 16 diagonal blocks of T = (I + A)^-1 as a [4, 16, 16] batch: the same
    doubling steps as the full tile (T_2s = T_s - T_s E_s T_s, s = 1, 2, 4, 8).
    k [64, BK]; G, beta [64]."""
    kb = tl.reshape(k, (4, 16, k.shape[1]))
    gram = _gram(kb, tl.permute(kb, (0, 2, 1)), DOT, GRAM_DOT)
    gb = tl.reshape(G, (4, 16))
    bb = tl.reshape(beta, (4, 16))
    r = tl.arange(0, 16)[None, :, None]
    c = tl.arange(0, 16)[None, None, :]
    diff = (gb[:, :, None] - gb[:, None, :]).to(tl.float32)
    a = gram * tl.exp2(tl.where(r > c, diff, float("-inf"))) * bb[:, :, None]
    t = (r == c).to(tl.float32) - tl.where((r % 2 == 1) & (c == r - 1), a, 0.0)
    for level in tl.static_range(1, 4):
        size = 1 << level  # 2, 4, 8
        e = tl.where(((r // size) % 2 == 1) & (c // size == r // size - 1), a, 0.0)
        t = t - mm_split_ab(t, mm_split_ab(e, t, DOT), DOT)
    return t


@triton.jit
def _block_diagonal(t):
    """The [4, 16, 16] diagonal blocks placed in a 64 x 64 tile: block b at rows and columns
    16 b .. 16 b + 15, zeros elsewhere."""
    own = tl.arange(0, 4)[:, None, None, None] == tl.arange(0, 4)[None, None, :, None]
    return tl.reshape(tl.where(own, t[:, :, None, :], 0.0), (64, 64))


@triton.jit
def _quadrants(x):
    """The four [n, n] blocks of a [2n, 2n] tile: top-left, top-right, bottom-left, bottom-right."""
    n: tl.constexpr = x.shape[-1] // 2
    top, bottom = tl.split(tl.permute(tl.reshape(x, (2, n, 2 * n)), (1, 2, 0)))
    t_l, t_r = tl.split(tl.permute(tl.reshape(top, (n, 2, n)), (0, 2, 1)))
    b_l, b_r = tl.split(tl.permute(tl.reshape(bottom, (n, 2, n)), (0, 2, 1)))
    return t_l, t_r, b_l, b_r


@triton.jit
def _stack(x, y):
    """[2, n, m] from two [n, m] tiles."""
    return tl.permute(tl.join(x, y), (2, 0, 1))


@triton.jit
def _lower_block_triangular(t_11, t_21, t_22):
    """[[t_11, 0], [t_21, t_22]] from [B, n, n] blocks: [B, 2n, 2n]."""
    n: tl.constexpr = t_11.shape[-1]
    nb: tl.constexpr = t_11.shape[0]
    top = tl.reshape(tl.permute(tl.join(t_11, tl.zeros_like(t_11)), (0, 1, 3, 2)), (nb, n, 2 * n))
    bottom = tl.reshape(tl.permute(tl.join(t_21, t_22), (0, 1, 3, 2)), (nb, n, 2 * n))
    return tl.reshape(tl.permute(tl.join(top, bottom), (0, 3, 1, 2)), (nb, 2 * n, 2 * n))


@triton.jit
def _store_t(t_ptr, base, rows, cols, x, n, s_tt, s_th, T_SPLIT: tl.constexpr):
    """Rows `rows` and columns `cols` of one chunk's T_u (rows past n unwritten): fp32, or the
    bf16 hi at head 2h and lo at 2h + 1 (`base` points at head 2h then)."""
    p = t_ptr + base + rows[:, None] * s_tt + cols[None, :]
    mask = (rows < n)[:, None]
    if T_SPLIT:
        hi, lo = hi_lo(x, tl.bfloat16)
        tl.store(p, hi, mask=mask)
        tl.store(p + s_th, lo, mask=mask)
    else:
        tl.store(p, x, mask=mask)


@triton.jit
def _merged_block_inverse(a, k, G, beta, t_ptr, base, n, s_tt, s_th, DOT: tl.constexpr, GRAM_DOT: tl.constexpr,
                          T_SPLIT: tl.constexpr):
    """T_u = (I + A)^-1 diag(beta) of one chunk by block substitution on the nonzero blocks
    only, stored: [[T_1, 0], [-T_2 A_21 T_1, T_2]] for the inverses T_1, T_2 of the diagonal
    blocks, applied to 16 x 16 blocks (giving the 32 x 32 ones) and then to 32 x 32 blocks.
    The same steps as the full-tile doubling levels 16 and 32 without their products of zero
    blocks (~1.2 M instead of ~4 M multiply-adds per chunk). a = A [64, 64]; k [64, BK];
    G (fp64), beta [64]."""
    t4 = tl.reshape(_diagonal_block_inverse(k, G, beta, DOT, GRAM_DOT), (2, 2, 16, 16))
    t_odd_even = tl.permute(t4, (0, 2, 3, 1))  # [32-block, 16, 16, which 16-block]
    t_even, t_odd = tl.split(t_odd_even)
    a_11, _, a_21, a_22 = _quadrants(a)
    e = _stack(_quadrants(a_11)[2], _quadrants(a_22)[2])  # A_21 inside each 32 x 32 diagonal block
    # level 16: both 32 x 32 diagonal blocks at once
    t = _lower_block_triangular(t_even, -mm_split_ab(t_odd, mm_split_ab(e, t_even, DOT), DOT), t_odd)
    t_1, t_2 = tl.split(tl.permute(t, (1, 2, 0)))
    # level 32: the lower-left 32 x 32 block of the chunk's T
    t_21 = -mm_split_ab(t_2, mm_split_ab(a_21, t_1, DOT), DOT)
    b_1, b_2 = tl.split(tl.trans(tl.reshape(beta, (2, 32))))
    rows = tl.arange(0, 32)
    _store_t(t_ptr, base, rows, rows, t_1 * b_1[None, :], n, s_tt, s_th, T_SPLIT)
    _store_t(t_ptr, base, rows, rows + 32, tl.zeros((32, 32), tl.float32), n, s_tt, s_th, T_SPLIT)
    _store_t(t_ptr, base, rows + 32, rows, t_21 * b_1[None, :], n, s_tt, s_th, T_SPLIT)
    _store_t(t_ptr, base, rows + 32, rows + 32, t_2 * b_2[None, :], n, s_tt, s_th, T_SPLIT)


@triton.jit
def _inverse_kernel(
    q_ptr, k_ptr, g_ptr, beta_ptr, t_ptr, gcum_ptr, chunk_ptr, bound_ptr,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_gb, s_gt, s_gh, s_bb, s_bt, s_bh, s_tb, s_tt, s_th,
    s_cb, s_ct, s_ch,
    s_ub, s_ut, s_uh,
    GROUP: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
    L2NORM: tl.constexpr, GRAM_DOT: tl.constexpr, DOT: tl.constexpr, T_SPLIT: tl.constexpr,
    BLOCKED16: tl.constexpr = False, BLOCK_MERGE: tl.constexpr = False, DECAY_BOUND: tl.constexpr = False,
):
    """T_u = (I + A)^-1 diag(beta) of one chunk and head, on whole 64 x 64 tiles with the tensor
    cores: blocked substitution with doubling block sizes, T_2 = I - E_1, then
    T_2s = T_s - T_s E_s T_s for s = 2 .. 32 (E_s: the lower-left s x s blocks inside each 2s
    block of A). Each T_s is the exact inverse of the block diagonal of size s (no powers of
    A); products are fp32-accurate (hi + lo bf16 split, or 3xTF32 for fp32 operands).
    DECAY_BOUND: also log2 of a bound on the norm of the chunk's state map M_c, at
    bound_ptr[b, t0, head] (`_warm_start_kernel`).
    L2NORM (gcum [B, T, HV, 4]): the norm folded (module doc): beta is taken as
    beta / (|k|^2 + eps), and gcum's fields NORM_K and NORM_Q get sqrt(|k|^2 + eps) and
    1 / sqrt(|q|^2 + eps), the passes' factors of v's and o's rows. Else q_ptr is unused."""
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    b = tl.load(chunk_ptr + i_c * 3).to(tl.int64)
    t0 = tl.load(chunk_ptr + i_c * 3 + 1).to(tl.int64)
    n = tl.load(chunk_ptr + i_c * 3 + 2)
    i_hk = i_h // GROUP
    rt = tl.arange(0, CHUNK)
    k = _load_rows(k_ptr, b * s_kb + t0 * s_kt + i_hk * s_kh, rt, n, s_kt, tl.arange(0, BK), K, s_kd)
    g = tl.load(g_ptr + b * s_gb + (t0 + rt) * s_gt + i_h * s_gh, mask=rt < n, other=0.0).to(tl.float64)
    beta = tl.load(beta_ptr + b * s_bb + (t0 + rt) * s_bt + i_h * s_bh, mask=rt < n, other=0.0).to(tl.float32)
    if L2NORM:
        norms = gcum_ptr + b * s_cb + (t0 + rt) * s_ct + i_h * s_ch
        kf = k.to(tl.float32)
        k2 = tl.sum(kf * kf, 1) + L2NORM_EPS
        tl.store(norms + NORM_K, tl.sqrt_rn(k2), mask=rt < n)
        beta = beta / k2  # the normalised keys' beta
        q = _load_rows(q_ptr, b * s_qb + t0 * s_qt + i_hk * s_qh, rt, n, s_qt, tl.arange(0, BK), K, s_qd)
        qf = q.to(tl.float32)
        tl.store(norms + NORM_Q, tl.div_rn(1.0, tl.sqrt_rn(tl.sum(qf * qf, 1) + L2NORM_EPS)), mask=rt < n)
    # fp64: differences of large sums stay exact (strong decay); in log2 units (G log2 e), so
    # every gate is one exp2 of a difference
    G = tl.cumsum(g, 0) * tl.full([], LOG2E, tl.float64)
    _store_hi_lo(gcum_ptr + b * s_cb + (t0 + rt) * s_ct + i_h * s_ch, G, rt < n)
    if T_SPLIT:
        base = b * s_tb + t0 * s_tt + 2 * i_h * s_th
    else:
        base = b * s_tb + t0 * s_tt + i_h * s_th
    row = rt[:, None]
    col = rt[None, :]
    gram = _gram(k, tl.trans(k), DOT, GRAM_DOT)
    if DECAY_BOUND:
        # one token's map is e^{g_t} (I - beta_t k_t k_t^T), of norm e^{g_t} max(1, |1 - beta_t |k_t|^2|);
        # the chunk's is at most their product (padded rows: g = beta = 0, a factor 1)
        norm2 = tl.sum(tl.where(row == col, gram, 0.0), 1)
        growth = tl.log2(tl.maximum(tl.abs(1.0 - beta * norm2), 1.0))
        bound = (tl.sum(g, 0) * tl.full([], LOG2E, tl.float64)).to(tl.float32) + tl.sum(growth, 0)
        tl.store(bound_ptr + b * s_ub + t0 * s_ut + i_h * s_uh, bound)
    a = gram * tl.exp2(tl.where(row > col, (G[:, None] - G[None, :]).to(tl.float32), float("-inf"))) * beta[:, None]
    if BLOCK_MERGE:
        _merged_block_inverse(a, k, G, beta, t_ptr, base, n, s_tt, s_th, DOT, GRAM_DOT, T_SPLIT)
    else:
        if BLOCKED16:
            # levels 2, 4, 8 inside the four 16 x 16 diagonal blocks, as one batched product of
            # [4, 16, 16] tiles (1/16 of the full tile's work), then placed block-diagonally
            t = _block_diagonal(_diagonal_block_inverse(k, G, beta, DOT, GRAM_DOT))
        else:
            t = (row == col).to(tl.float32) - tl.where((row % 2 == 1) & (col == row - 1), a, 0.0)
        for level in tl.static_range(1, 6):
            if level >= 4 or not BLOCKED16:
                size = 1 << level  # 2, 4, 8, 16, 32
                e = tl.where(((row // size) % 2 == 1) & (col // size == row // size - 1), a, 0.0)
                t = t - mm_split_ab(t, mm_split_ab(e, t, DOT), DOT)
        _store_t(t_ptr, base, rt, rt, t * beta[None, :], n, s_tt, s_th, T_SPLIT)  # T_u = T diag(beta)


@triton.jit
def _times_state(x, state, s_hi, s_lo, DOT: tl.constexpr, K_EXACT: tl.constexpr, PREC: tl.constexpr):
    """x @ S for a key or query tile x; S as its hi + lo pair (s_hi, s_lo) when x is exact in
    DOT (one rounding of S costs 1.2e-3 of the state without decay: NOTES.md, precision study)."""
    if DOT == tl.float32:
        return mm(x, state, DOT)
    elif K_EXACT:
        return tl.dot(x.to(DOT), s_lo, tl.dot(x.to(DOT), s_hi))
    else:
        return mm_split_ab(x, state, DOT, PREC)


@triton.jit
def _chunk_step(q_ptr, k_ptr, v_ptr, gcum_ptr, t_ptr, o_ptr, state, b, t0, t_end, t_total, i_h, i_hk, c0, is_m,
                s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd,
                s_cb, s_ct, s_ch, s_tb, s_tt, s_th, s_ob, s_ot, s_oh, scale,
                K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MAP: tl.constexpr,
                L2NORM: tl.constexpr, K_EXACT: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                TMA: tl.constexpr, T_SPLIT: tl.constexpr, FUSED_ACC: tl.constexpr, EARLY_QS: tl.constexpr,
                TMA_T: tl.constexpr, GRAM_DOT: tl.constexpr):
    """One chunk of the recurrence: writes the chunk's outputs (unless MAP), returns the new state.

    U = T_u (V - e^G (K S)) with T_u = (I + A)^-1 diag(beta) from the inverse kernel;
    o = scale (e^G (Q S) + (Q K^T o L) U); S <- e^{G_C} S + K^T (e^{G_C - G} U).
    """
    rt = tl.arange(0, CHUNK)
    n = t_end - t0
    n_rows = tl.minimum(n, CHUNK).to(tl.int32)
    row = b * t_total + t0  # in the [B * T, heads * dim] view of the TMA descriptors
    k = _load_chunk(k_ptr, b * s_kb + t0 * s_kt + i_hk * s_kh, row, i_hk, K, 0, n_rows, K, s_kt, s_kd, CHUNK, BK,
                    TMA)
    if T_SPLIT:
        t_hi = _load_chunk(t_ptr, b * s_tb + t0 * s_tt + 2 * i_h * s_th, row, 2 * i_h, CHUNK, 0, n_rows, CHUNK,
                           s_tt, 1, CHUNK, CHUNK, TMA_T)
        t_lo = _load_chunk(t_ptr, b * s_tb + t0 * s_tt + (2 * i_h + 1) * s_th, row, 2 * i_h + 1, CHUNK, 0, n_rows,
                           CHUNK, s_tt, 1, CHUNK, CHUNK, TMA_T)
    else:
        t_u = _load_chunk(t_ptr, b * s_tb + t0 * s_tt + i_h * s_th, row, i_h, CHUNK, 0, n_rows, CHUNK, s_tt, 1,
                          CHUNK, CHUNK, TMA_T)
    # prefix sums of g as fp32 hi + lo (fp64 in the inverse kernel): under strong decay
    # G_C - G_j is a difference of numbers ~1e3, where one fp32 would lose the recent tokens
    c_row = gcum_ptr + b * s_cb + t0 * s_ct + i_h * s_ch
    g_hi = tl.load(c_row + rt * s_ct, mask=rt < n, other=0.0)
    g_lo = tl.load(c_row + rt * s_ct + 1, mask=rt < n, other=0.0)
    last_hi = tl.load(c_row + (n_rows - 1) * s_ct)
    last_lo = tl.load(c_row + (n_rows - 1) * s_ct + 1)
    gate_exp = tl.exp2(g_hi)
    if DOT == tl.float32:
        s_hi, s_lo = state, state  # unused: fp32 products take the state as it is
    else:
        s_hi, s_lo = hi_lo(state, DOT)
    ks = _times_state(k, state, s_hi, s_lo, DOT, K_EXACT, PREC)
    if EARLY_QS and not MAP:
        q = _load_chunk(q_ptr, b * s_qb + t0 * s_qt + i_hk * s_qh, row, i_hk, K, 0, n_rows, K, s_qt, s_qd, CHUNK,
                        BK, TMA)
        qs = _times_state(q, state, s_hi, s_lo, DOT, K_EXACT, PREC)
    # a select, not a branch on is_m: Triton 3.6 miscompiles the branch here (layout pass)
    v = _load_chunk(v_ptr, b * s_vb + t0 * s_vt + i_h * s_vh, row, i_h, V, c0, n_rows, V, s_vt, s_vd, CHUNK, BV,
                    TMA)
    v = v.to(tl.float32)
    if L2NORM:  # the folded norm: v's rows times sqrt(|k|^2 + eps) (module doc)
        v = v * tl.load(c_row + rt * s_ct + NORM_K, mask=rt < n, other=0.0)[:, None]
    x = tl.where(is_m, 0.0, v) - gate_exp[:, None] * ks
    if T_SPLIT:
        x_hi, x_lo = hi_lo(x, DOT)
        t_hi, t_lo = t_hi.to(DOT), t_lo.to(DOT)  # no-ops on the GPU
        u = tl.dot(t_hi, x_lo, tl.dot(t_lo, x_hi, tl.dot(t_hi, x_hi)))
    else:
        u = mm_split_ab(t_u, x, DOT, PREC)
    # rows past the chunk's tokens are zero (with TMA they hold the next sequence's T_u)
    u = tl.where((rt < n)[:, None], u, 0.0)
    if not MAP:
        causal = rt[:, None] >= rt[None, :]
        if not EARLY_QS:
            q = _load_chunk(q_ptr, b * s_qb + t0 * s_qt + i_hk * s_qh, row, i_hk, K, 0, n_rows, K, s_qt, s_qd,
                            CHUNK, BK, TMA)
        # G_i - G_j from the hi + lo parts: the hi difference is exact where it cancels (Sterbenz)
        diff = (g_hi[:, None] - g_hi[None, :]) + (g_lo[:, None] - g_lo[None, :])
        a_qk = _gram(q, tl.trans(k), DOT, GRAM_DOT) * tl.exp2(tl.where(causal, diff, float("-inf")))
        if EARLY_QS:
            o = qs
        else:
            o = _times_state(q, state, s_hi, s_lo, DOT, K_EXACT, PREC)
        if FUSED_ACC:  # accumulate onto e^G (Q S) in place: one [64, BV] tile live, not two
            o = mm_split_ab(a_qk, u, DOT, PREC, o * gate_exp[:, None])
        else:
            o = o * gate_exp[:, None] + mm_split_ab(a_qk, u, DOT, PREC)
        o_p = tl.make_block_ptr(o_ptr + b * s_ob + t0 * s_ot + i_h * s_oh, (n_rows, V), (s_ot, 1), (0, c0),
                                (CHUNK, BV), (1, 0))
        if L2NORM:  # the folded norm: o's rows over sqrt(|q|^2 + eps)
            o = o * tl.load(c_row + rt * s_ct + NORM_Q, mask=rt < n, other=0.0)[:, None]
        tl.store(o_p, (o * scale).to(o_ptr.dtype.element_ty), boundary_check=(0, 1))
    u_tilde = u * tl.exp2((last_hi - g_hi) + (last_lo - g_lo))[:, None]  # exp(G_C - G_j) <= 1
    if FUSED_ACC:  # the update accumulates onto the decayed state: one [K, BV] tile live, not two
        decayed = state * tl.exp2(last_hi + last_lo)
        if K_EXACT:
            return mm_split_b(tl.trans(k.to(DOT)), u_tilde, DOT, PREC, decayed)
        else:
            return mm_split_ab(tl.trans(k), u_tilde, DOT, PREC, decayed)
    if K_EXACT:
        upd = mm_split_b(tl.trans(k.to(DOT)), u_tilde, DOT, PREC)
    else:
        upd = mm_split_ab(tl.trans(k), u_tilde, DOT, PREC)
    return state * tl.exp2(last_hi + last_lo) + upd


@triton.jit
def _program(HV: tl.constexpr, NCB: tl.constexpr):
    """(row, value head, column block) of this program in a 1-D grid of rows x HV x NCB, the
    row slowest: a row's programs start together, and rows start in table order."""
    pid = tl.program_id(0)
    return pid // (HV * NCB), (pid // NCB) % HV, pid % NCB


# A partition's state map M whose norm is below 2^NEGLIGIBLE_LOG2 is not computed (taken as 0):
# for any finite fp32 state S (|S| < 2^136 at K, V <= 256), M S < 2^-164 in every element,
# under the smallest fp32 number (2^-149), let alone its rounding of anything the map adds to.
# Likewise D, the map's zero-start part, starts where what came before is damped that much.
NEGLIGIBLE_LOG2 = -300.0


@triton.jit
def _warm_start_kernel(bound_ptr, map_ptr, warm_ptr, s_ub, s_ut, s_uh, HV: tl.constexpr, LIMIT: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Per map row and value head, from the chunks' map-norm bounds (log2, `_inverse_kernel`'s
    DECAY_BOUND): warm[row, head] = (first token of D's run, 1 if M is negligible else 0).

    The state entering chunk j reaches the partition's end through chunks j .. n-1, whose
    bounds sum to suffix(j). M (j = 0) is negligible where suffix(0) <= LIMIT; D's run starts
    at the last chunk j with suffix(j) <= LIMIT (what entered it is negligible at the end), or
    at the partition's start where none is. No assumption on the gates: the bound includes
    the keys' norms and beta, so a map that grows is never dropped."""
    i_m = tl.program_id(0)
    i_h = tl.program_id(1)
    row = map_ptr + i_m * 6
    b = tl.load(row).to(tl.int64)
    t_start = tl.load(row + 1).to(tl.int64)
    t_end = tl.load(row + 2).to(tl.int64)
    n = ((t_end - t_start + CHUNK - 1) // CHUNK).to(tl.int32)
    base = bound_ptr + b * s_ub + t_start * s_ut + i_h * s_uh
    after = tl.zeros([], tl.float32)  # the bounds of the chunks after the current block
    best = tl.full([], -1, tl.int32)
    j0 = ((n - 1) // BLOCK) * BLOCK
    while j0 >= 0:  # blocks from the last: a partition has a few hundred chunks at most
        idx = j0 + tl.arange(0, BLOCK)
        x = tl.load(base + idx.to(tl.int64) * CHUNK * s_ut, mask=idx < n, other=0.0)
        suffix = tl.cumsum(x, 0, reverse=True) + after
        best = tl.maximum(best, tl.max(tl.where((idx < n) & (suffix <= LIMIT), idx, -1), 0))
        after += tl.sum(x, 0)
        j0 -= BLOCK
    out = warm_ptr + (i_m * HV + i_h) * 2
    tl.store(out, (t_start + CHUNK * tl.maximum(best, 0)).to(tl.int32))
    tl.store(out + 1, (after <= LIMIT).to(tl.int32))


@triton.jit
def _choose_plan_kernel(warm_ab_ptr, rows_a_ptr, rows_b_ptr, rows_ptr, warm_ptr, n_rows, n_maps,
                        HV: tl.constexpr, NVB: tl.constexpr, NKB: tl.constexpr, SLOTS: tl.constexpr,
                        BLOCK: tl.constexpr):
    """The lead plan (rows A) or the same partitions with empty leads (rows B, `_plan`'s
    `adaptive`), chosen from the gates: B where its map pass fits in one round of SLOTS
    programs, counting D's programs (maps x HV x NVB) and the M programs that are not
    negligible (`_warm_start_kernel`'s table of A's then B's maps, warm_ab). Then B's map pass
    is at most one partition long, shorter than A's lead, and B's partitions are shorter
    than A's. Copies the chosen rows ([leads; maps; parts] x 6) and warm table (one program)."""
    idx = tl.arange(0, BLOCK)
    long_m = tl.zeros([], tl.int32)
    i = 0
    while i < n_maps * HV:  # B's half of the table (while loops: runtime bounds, also in the interpreter)
        j = i + idx
        skip = tl.load(warm_ab_ptr + (n_maps * HV + j) * 2 + 1, mask=j < n_maps * HV, other=1)
        long_m += tl.sum((skip == 0).to(tl.int32), 0)
        i += BLOCK
    use_b = n_maps * HV * NVB + long_m * NKB <= SLOTS
    i = 0
    while i < n_rows * 6:
        j = i + idx
        a = tl.load(rows_a_ptr + j, mask=j < n_rows * 6)
        b = tl.load(rows_b_ptr + j, mask=j < n_rows * 6)
        tl.store(rows_ptr + j, tl.where(use_b, b, a), mask=j < n_rows * 6)
        i += BLOCK
    i = 0
    while i < n_maps * HV * 2:
        j = i + idx
        a = tl.load(warm_ab_ptr + j, mask=j < n_maps * HV * 2)
        b = tl.load(warm_ab_ptr + n_maps * HV * 2 + j, mask=j < n_maps * HV * 2)
        tl.store(warm_ptr + j, tl.where(use_b, b, a), mask=j < n_maps * HV * 2)
        i += BLOCK


@triton.jit
def _recurrence_kernel(
    q_ptr, k_ptr, v_ptr, gcum_ptr, t_ptr, o_ptr,
    state_in_ptr, state_out_ptr, map_d_ptr, map_m_ptr, part_ptr, warm_ptr,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd,
    s_cb, s_ct, s_ch, s_tb, s_tt, s_th, s_ob, s_ot, s_oh,
    scale, t_total,
    HV: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NVB: tl.constexpr, MAP: tl.constexpr, PARTITIONED: tl.constexpr, HAS_STATE_IN: tl.constexpr,
    STORE_FINAL: tl.constexpr, L2NORM: tl.constexpr, K_EXACT: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr, WHILE_LOOPS: tl.constexpr, TMA: tl.constexpr, T_SPLIT: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr = False, FUSED_ACC: tl.constexpr = False, EARLY_QS: tl.constexpr = False,
    TMA_T: tl.constexpr = False, WARM: tl.constexpr = False, GRAM_DOT: tl.constexpr = None,
):
    """q_ptr, k_ptr, v_ptr: tensor descriptors when TMA, else pointers (+ strides); t_ptr: a
    descriptor when TMA_T (which implies TMA), else a pointer;
    t_total: T of the [B, T, ...] inputs. WARM (MAP): `_warm_start_kernel`'s table at warm_ptr
    says where D's run starts and whether M is negligible (then written as 0, not run)."""
    if MAP:
        i_p, i_h, i_v = _program(HV, NVB + (K + BV - 1) // BV)
    else:
        i_p, i_h, i_v = _program(HV, NVB)
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

    t_begin = t_start
    if MAP:
        run_m = is_m
        if WARM:
            warm = warm_ptr + (i_p * HV + i_h) * 2
            skip = tl.load(warm + 1)
            run_m = is_m & (skip == 0)
            t_begin = tl.where(is_m, tl.where(skip != 0, t_end, t_start), tl.load(warm).to(tl.int64))
        state = tl.where(run_m & (rk[:, None] == cv[None, :]), 1.0, 0.0)
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
        t0 = t_begin
        while t0 < t_end:
            state = _chunk_step(q_ptr, k_ptr, v_ptr, gcum_ptr, t_ptr, o_ptr, state, b, t0, t_end, t_total, i_h, i_hk,
                                c0, is_m, s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh,
                                s_vd, s_cb, s_ct, s_ch, s_tb, s_tt, s_th, s_ob, s_ot, s_oh, scale,
                                K, V, BK, BV, MAP, L2NORM, K_EXACT, DOT, PREC, TMA, T_SPLIT, FUSED_ACC, EARLY_QS,
                                TMA_T, GRAM_DOT)
            t0 += CHUNK
    else:
        for t0 in tl.range(t_begin, t_end, CHUNK, warp_specialize=WARP_SPECIALIZE):
            state = _chunk_step(q_ptr, k_ptr, v_ptr, gcum_ptr, t_ptr, o_ptr, state, b, t0, t_end, t_total, i_h, i_hk,
                                c0, is_m, s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh,
                                s_vd, s_cb, s_ct, s_ch, s_tb, s_tt, s_th, s_ob, s_ot, s_oh, scale,
                                K, V, BK, BV, MAP, L2NORM, K_EXACT, DOT, PREC, TMA, T_SPLIT, FUSED_ACC, EARLY_QS,
                                TMA_T, GRAM_DOT)

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
def _row_halves(x):
    """Rows [0, n) and [n, 2n) of a [2n, m] tile."""
    n: tl.constexpr = x.shape[0] // 2
    return tl.split(tl.permute(tl.reshape(x, (2, n, x.shape[1])), (1, 2, 0)))


@triton.jit
def _map_slice(map_m_ptr, m_base, rk, c0, BKC: tl.constexpr, K: tl.constexpr, valid=True):
    """Columns [c0, c0 + BKC) of a [K, K] map M (rows rk), zero outside (and where not `valid`)."""
    cols = c0 + tl.arange(0, BKC)
    return tl.load(map_m_ptr + m_base + rk[:, None] * K + cols[None, :],
                   mask=(rk[:, None] < K) & (cols[None, :] < K) & valid, other=0.0)


@triton.jit
def _chain_kernel(
    map_d_ptr, map_m_ptr, h0_ptr, starts_ptr, seq_ptr,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKC: tl.constexpr,
    HAS_H0: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, IN_REGISTERS: tl.constexpr = False,
    LEAD: tl.constexpr = False, PREFETCH: tl.constexpr = False,
):
    """Starts of the partitions of one sequence: S_0 = h0, S_p = M_{p-1} S_{p-1} + D_{p-1}.
    LEAD: a sequence of several partitions had its first one run by the lead pass, which wrote
    S_1 (starts[first + 1]); the chain goes on from there, with maps from the second partition.

    The product contracts over K in slices of BKC rows of S_{p-1}, so the M tile in flight is
    [BK, BKC], not [BK, BK] (which is 256 KB at K = 256). IN_REGISTERS: the slices are cut
    out of the register tile (one or two: K <= 128); else read back from `starts` (this
    program wrote them; the barrier makes them visible). PREFETCH (two slices in registers): the
    next link's M and D are loaded before this link's products, which do not wait on them (a
    link was one load latency plus its products; the same products in the same order).
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
    if LEAD:
        lead = (count > 1).to(tl.int32)
    else:
        lead = 0
    if lead != 0:
        state = tl.load(starts_ptr + ((first + 1) * HV + i_h) * K * V + off, mask=smask, other=0.0)
    elif HAS_H0:
        state = tl.load(h0_ptr + (seq * HV + i_h) * K * V + off, mask=smask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BK, BV), tl.float32)
    if lead == 0:
        tl.store(starts_ptr + (first * HV + i_h) * K * V + off, state, mask=smask)
    j = 1 + lead
    if PREFETCH:  # (IN_REGISTERS, two slices) link j's M and D are loaded during link j - 1's products
        tl.static_assert(IN_REGISTERS and BK == 2 * BKC, "prefetch: the two-slice register form")
        m_row = first_map + j - 1 - lead
        m_base = (m_row * HV + i_h) * K * K
        d_next = tl.load(map_d_ptr + (m_row * HV + i_h) * K * V + off, mask=smask & (j < count), other=0.0)
        m0_next = _map_slice(map_m_ptr, m_base, rk, 0, BKC, K, j < count)
        m1_next = _map_slice(map_m_ptr, m_base, rk, BKC, BKC, K, j < count)
        while j < count:
            acc = d_next
            m_0 = m0_next
            m_1 = m1_next
            m_base += HV * K * K  # the next link's map row (loads masked past the last link)
            d_next = tl.load(map_d_ptr + ((m_row + 1) * HV + i_h) * K * V + off, mask=smask & (j + 1 < count),
                             other=0.0)
            m0_next = _map_slice(map_m_ptr, m_base, rk, 0, BKC, K, j + 1 < count)
            m1_next = _map_slice(map_m_ptr, m_base, rk, BKC, BKC, K, j + 1 < count)
            s_0, s_1 = _row_halves(state)
            acc += mm_split_ab(m_0, s_0, DOT, PREC)
            acc += mm_split_ab(m_1, s_1, DOT, PREC)
            state = acc
            tl.store(starts_ptr + ((first + j) * HV + i_h) * K * V + off, acc, mask=smask)
            m_row += 1
            j += 1
    else:
        while j < count:  # a handful of partitions: a while loop is fine here (and in the interpreter)
            m_row = first_map + j - 1 - lead
            m_base = (m_row * HV + i_h) * K * K
            acc = tl.load(map_d_ptr + (m_row * HV + i_h) * K * V + off, mask=smask, other=0.0)
            if IN_REGISTERS:
                if BK == BKC:
                    acc += mm_split_ab(_map_slice(map_m_ptr, m_base, rk, 0, BKC, K), state, DOT, PREC)
                else:
                    tl.static_assert(BK == 2 * BKC, "in registers: one or two slices (K <= 128)")
                    s_0, s_1 = _row_halves(state)
                    acc += mm_split_ab(_map_slice(map_m_ptr, m_base, rk, 0, BKC, K), s_0, DOT, PREC)
                    acc += mm_split_ab(_map_slice(map_m_ptr, m_base, rk, BKC, BKC, K), s_1, DOT, PREC)
            else:
                tl.debug_barrier()  # the previous start, stored by all threads, is read back in slices
                prev = starts_ptr + ((first + j - 1) * HV + i_h) * K * V
                for c0 in tl.static_range(0, BK, BKC):
                    cols = c0 + rc
                    s = tl.load(prev + cols[:, None] * V + cv[None, :], mask=(cols[:, None] < K) & (cv[None, :] < V),
                                other=0.0)
                    acc += mm_split_ab(_map_slice(map_m_ptr, m_base, rk, c0, BKC, K), s, DOT, PREC)
            state = acc
            tl.store(starts_ptr + ((first + j) * HV + i_h) * K * V + off, acc, mask=smask)
            j += 1


# ---------------------------------------------------------------------------------------
# host side


# Launch choices, measured on the GPU (benchmarks/prefill_variants.py, NOTES.md).
TUNING = {
    "precision": "split",  # products with an fp32 operand: "split" | "tf32" | "bf16" (common.PRECISIONS)
    "block_v": None,  # state column block; None: 64 for K <= 128, else 32
    "warps_inverse": 4,
    "warps_recurrence": 4,
    "warps_chain": None,  # None: 8 with chain_prefetch, else as the recurrence (8: 46 -> 37 us at 1x8K, v4.5)
    # the chain's state column block (None: as the recurrence): 32 doubles its programs;
    # with chain_in_registers 45 -> 32 us at 1x8K (H100, NOTES.md v4.5); 16: 26 -> 24 us at
    # 1x8K, 27 -> 24 at 1x32K (v4.9)
    "block_v_chain": 16,
    # the chain's S_{p-1} row slices cut out of registers, not stored, synchronised and read
    # back: 46 -> 45 us alone, with 32 columns above. K <= 128 (where it was timed; at K = 256
    # it spills 1160 B offline)
    "chain_in_registers": True,
    # with it at K = 128, the chain loads link j + 1's map and D during link j's products (8 warps,
    # None above: at 4 it spills 560 B offline, 200 registers at 8): bitwise the same starts; H100
    # chain 26-28 -> 20-21 us per partitioned call, bf16 (8 warps alone: 25-26; NOTES.md v5.6);
    # fp32 operands (fp32 inputs) compile to 197 registers without spill (not timed)
    "chain_prefetch": True,
    # pipeline stages of the output pass's tile loads; None: 2, or 1 at BV 64 where its grid
    # has more programs than SMs (1 stage lets two share an SM: -8 to -17% there, +15% at
    # 1x8K where there is one program per SM; BV 32 at 1 stage faults on the GPU: NOTES.md)
    "stages": None,
    "stages_map": 2,  # the same for the map pass (2 programs per SM at 2 stages already)
    "maxnreg": None,  # register cap of the output pass (more programs per SM); None: the compiler's choice
    "maxnreg_map": None,  # the same for the map pass; None: as "maxnreg"
    # the same for the inverse kernel (bf16 operands, K <= 128: where it was measured): 168
    # lets 3 programs share an SM (240 registers: 2): -11 to -13% of the inverse at every
    # shape; 128 spills, +30% (NOTES.md)
    "maxnreg_inverse": 168,
    # the inverse's first doubling levels (block sizes 2, 4, 8) on the four 16 x 16 diagonal
    # blocks as batched products instead of full 64 x 64 tiles: 18 of its 31 products become
    # 1/16 of the size. Exact either way (the same substitution). H100, bf16: inverse -23 to
    # -25% at every shape, prefill -5 to -8% (NOTES.md, v4.3). bf16 inputs only: with fp32
    # operands it spills 744 B (offline sm_90) and was not timed
    "inverse_blocked16": True,
    # with it, the last two levels (block sizes 16 and 32) on their nonzero blocks only:
    # [[T_1, 0], [-T_2 A_21 T_1, T_2]] on 16 x 16, then 32 x 32 blocks, instead of full 64 x 64
    # products of mostly zero blocks (4 M -> 1.2 M multiply-adds per chunk). H100: inverse -4 to
    # -6% only (it is bound by instruction issue (splits, conversions), not by its products; NOTES.md, v4.4, v4.5)
    "inverse_block_merge": True,
    "tma": True,  # recurrence tile loads through TMA descriptors where the layout allows (Hopper+)
    # with it, T_u's tiles too (False: block pointers, whose loads are waited at first use
    # instead of at once; offline +112 B of spill)
    "tma_t": True,
    # Triton's automatic warp specialisation of the output pass's chunk loop (a TMA producer
    # warpgroup beside the compute; 12 warps, one program per SM): measured 40-90% slower
    # output pass on the H100 (NOTES.md, v4.2); off
    "warp_specialize": False,
    # Fewer live registers in the output pass, the same products (offline sm_90, bf16,
    # K = 128: spill per thread 368 -> 224 B): "early_qs" computes Q S right after K S, so the
    # state's bf16 hi + lo tiles die there; "fused_accumulate" lets the two sums of a product
    # and a tile (o = e^G Q S + A U, the state update) accumulate onto the tile in place.
    # H100, both: output pass -2 to -5% (1x32K, 8x4K, 1x128K), +0.2% at 1x32K 16/32 (NOTES.md,
    # v4.4). Applied to bf16 inputs: at K = 256 they spill more offline (336 -> 376 B) but the
    # output pass is -8% (H100, v5.11); fp16 inputs (split q, k) without them: +31% with them at
    # K = 128 (1040 B of spill), equal at K = 64; fp32 operands not timed (2088 -> 2240 B)
    "early_qs": True,
    "fused_accumulate": True,
    # fp16 inputs: the grams K K^T and Q K^T as one fp16 product (q, k are exact in fp16; the
    # products exact, fp32 sums) instead of three split bf16 ones (common.dot_dtype); False:
    # the split (A/B checks)
    "gram_fp16": True,
    # the map and output passes in Gluon (chunk_sm90.py: the next chunk's tiles fetched during
    # this one, asynchronous wgmma, shared memory placed by hand, descriptors kept out of the
    # registers) where they cover the launch (sm_90, bf16, K = 128; the in-kernel L2 norm folded).
    # Bitwise equal to the Triton passes; H100: output pass -32 to -35%, map pass -3 to -7%, calls
    # -15 to -24% (NOTES.md v4.7)
    "gluon_sm90": True,
    # at K = 256 (bf16, sm_90), the output and lead passes in Gluon (chunk_sm90.supported_256: state
    # column blocks of 32; the inverse in Gluon with "gluon_inverse", the chain in Triton). H100,
    # 1x32K 16/16: 3.10 -> 2.03 ms (NOTES.md v5.12)
    "gluon_output_256": True,
    # with it, the map pass in Gluon too (`chunk_sm90._recurrence_kernel` with MAP, column blocks of 32)
    "gluon_map_256": True,
    # fp16 inputs on the Gluon passes and inverse too (K = 128 and 256; chunk_sm90 F16: q, k exact
    # fp16 operands, the state's and U~'s pairs in fp16 scaled by a power of two per tile; the
    # map pass then `_recurrence_kernel` with MAP); False: the Triton passes (A/B checks)
    "gluon_fp16": True,
    # the Gluon passes form their hi + lo splits two elements at a time in inline PTX (the same
    # roundings, bitwise equal): H100 map pass -9%, output pass -13 to -18% (NOTES.md v4.8)
    "gluon_packed_split": True,
    # Q S in the Gluon output pass as the split product (True) or from the state's hi alone:
    # one product less per step (output pass -4 to -8%), o error up to 2.4e-3 instead of the
    # 1.7e-3 floor (NOTES.md v4.9)
    "gluon_split_qs": True,
    # the Gluon output pass on transposed tiles (chunk_sm90._output_kernel_t: the intermediates'
    # pairs as register operands, less shared-memory traffic); off: since v5.5 the default pass is
    # faster with or without the split Q S (H100, v5.6: +4 to +15% with it, +1 to +3% without)
    "gluon_transposed": False,
    # the Gluon output pass stores o's full chunks through shared memory by TMA (chunk_sm90
    # O_TMA) instead of 4-byte stores from the registers (NOTES.md v5.4); False: the stores (A/B)
    "gluon_o_tma": True,
    # the Gluon output pass forms K S as one 128-column product K [S_hi | S_lo] (k's tile read
    # once: 16 KB less of the shared-memory pipe per step, -2 to -3% on the H100; NOTES.md v5.5)
    # instead of two; the map pass keeps two (the wide form timed +1.4% there)
    "gluon_wide_ks": True,
    # an experiment, not a precision this library offers: how many of the bf16 Gluon output pass's
    # split products run as one bf16 product (chunk_sm90 SINGLE: 1 K S and Q S, 2 also A U and
    # K^T U~, 3 every product, FLA's precision; the map pass keeps its splits). 0: the splits
    # (the exactness goal); NOTES.md v5.15 has each level's time and error
    "gluon_single": 0,
    # the same experiment in the bf16 transposed map pass (chunk_sm90._map_kernel_t SINGLE: 1 K S,
    # 2 also U~^T K, 3 every product); 0: the splits. NOTES.md v5.16
    "gluon_map_single": 0,
    # the Gluon map pass on transposed tiles (chunk_sm90._map_kernel_t: X's and U~'s pairs as
    # register operands, one shared-memory round per step instead of three, T_u double-buffered).
    # Bitwise the same maps; H100: map pass -5 to -8%, shared-memory wavefronts -30% (NOTES.md
    # v5.6); False: `_recurrence_kernel` with MAP (A/B checks)
    "gluon_map_transposed": True,
    # the inverse in Gluon where the Gluon passes run (inverse_sm90.py: each warp owns 16 rows
    # of every tile, the small products as mma.sync on register first operands; T_u within
    # 2e-7 of the Triton kernel's). H100: inverse -35 to -38%, kernels per call -7 to -12%
    # (NOTES.md v5.3); at K = 256 too, two programs per SM (v5.12); False: the Triton inverse (A/B checks)
    "gluon_inverse": True,
    # where the folded L2 norm's 1 / |q_t| is summed: "output", the output and lead passes from
    # the q tile they hold (q read from HBM once), or "inverse", plain loads there (v5.8). H100,
    # with the norm, 1x128K 16/16: inverse 0.70 -> 0.52 ms, output pass 1.39 -> 1.47; kernels -3
    # to -7% (1x8K to 1x128K, 8x4K, varlen), -0.3 to -2% at 1x32K 16/32 (NOTES.md v5.9)
    "gluon_q_norms": "output",
    # the Gluon inverse stores full chunks' T_u by TMA (inverse_sm90 T_TMA; NOTES.md v5.4)
    "gluon_inverse_tma": True,
    # chunks each Gluon inverse program runs in turn, the next one's k and gates loaded during
    # the current one: at most this many, the count chosen per call for whole waves of four
    # programs per SM (`inverse_sm90.chunks_per_program`; 1: one chunk per program, v5.6's grid).
    # H100: the inverse alone -6 to -13% from 1x8K to 1x128K (NOTES.md v5.7)
    "inverse_chunks_per_program": 16,
    # each sequence's first partition run beside the map pass (`_plan`'s lead rows): None lets
    # `predicted_cost` decide per call (and, with skip_negligible_maps, the GPU between that
    # plan and its empty-lead form: "adaptive"), True / False / "adaptive" force it (NOTES.md v4.8)
    "lead_partition": None,
    # the map pass skips what the gates provably damp below fp32 (NEGLIGIBLE_LOG2): M not run
    # where its norm bound is under 2^-300, D run from the chunk where that holds
    # (`_warm_start_kernel`); False runs every map in full (A/B checks)
    "skip_negligible_maps": True,
    # repeated call layouts launch their compiled kernels without Triton's per-launch binding
    # (launch.py: 25-65 us of host time per launch on the H100 machine); False: every launch
    # through Triton (A/B checks)
    "fast_launch": True,
}


_SIDE_STREAMS: dict = {}


def _sms(device: torch.device) -> int:
    """SMs of a CUDA device (its index, or the current device's)."""
    return sm_count(device.index if device.index is not None else torch.cuda.current_device())


def map_pass_slots(device: torch.device) -> int:
    """Map programs that run at once: two per SM (the map passes: 180-239 registers, 88-107 KB
    of shared memory); 0 off CUDA (`_choose_plan_kernel` then keeps the lead plan)."""
    if device.type != "cuda":
        return 0
    return 2 * _sms(device)


def inverse_slots(device: torch.device, dk: int = 128) -> int:
    """Gluon inverse programs that run at once: four per SM at K = 128 (54 KB, 128 registers), two
    at K = 256 (87 KB); 0 off CUDA."""
    if device.type != "cuda":
        return 0
    return (inverse_sm90.PROGRAMS_PER_SM if dk <= 128 else inverse_sm90.PROGRAMS_PER_SM_256) * _sms(device)


def _side_stream(device: torch.device):
    """The map pass's stream beside the lead pass, one per CUDA device (None off CUDA: in order)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def _block_v(dk: int, dv: int, block_v: int | None) -> int:
    """Column block of the state (`block_v`: TUNING's choice): the [K, BV] fp32 state tile
    lives in registers."""
    bk = max(16, next_power_of_2(dk))
    bv = block_v or (64 if bk <= 128 else 32)
    return max(16, min(bv, next_power_of_2(dv)))


def auto_partition_chunks(chunk_counts: list[int], hv: int, nvb: int, device: torch.device,
                          programs_per_sm: int = 2) -> int:
    """Chunks per partition for sequences of `chunk_counts` chunks. The output pass holds two
    programs per SM (BV 64, one stage: 255 registers, 80 KB shared), so 2 x SMs of its
    (partition, head, column block) programs run at once, and a grid just past that adds a
    second wave as long as the first (1x128K, 16 heads: 9 partitions = 288 programs,
    output pass 3.65 ms; 8 = 256 programs, 3.05 ms; NOTES.md). So: one partition per
    sequence when the sequences' programs already fill those slots, else the shortest
    partitions whose programs still fit in them (one wave), never below MIN_PARTITION_CHUNKS
    chunks (the map pass and the chain cost about as much as the output pass).
    `programs_per_sm`: output programs one SM holds (chunk_sm90.PROGRAMS_PER_SM at K = 128,
    PROGRAMS_PER_SM_256 at K = 256, 2 for the Triton passes)."""
    longest = max(chunk_counts + [1])
    if device.type != "cuda":
        return longest  # CPU / interpreter: no parallelism to win
    slots = programs_per_sm * _sms(device)
    per_partition = hv * nvb
    if len(chunk_counts) * per_partition >= slots:
        return longest
    lo, hi = 1, longest  # `longest` fits: one partition per sequence
    while lo < hi:  # the smallest size whose partitions fit (their count falls as the size grows)
        mid = (lo + hi) // 2
        if sum(-(-n // mid) for n in chunk_counts) * per_partition <= slots:
            hi = mid
        else:
            lo = mid + 1
    if len(chunk_counts) == 1:  # equal partitions: the last one is not a short straggler
        lo = -(-longest // -(-longest // lo))
    return max(MIN_PARTITION_CHUNKS, lo)


def predicted_cost(chunk_counts: list[int], size: int, lead: bool, hv: int, nvb: int, nkb: int, slots: int) -> int:
    """The map and output passes' time at `size` chunks per partition, in map-program chunk
    steps. The model, from the H100 breakdowns (NOTES.md v4.8): a map program's chunk step
    costs 1, an output program's 2 (two programs per SM either way), and a pass takes as many
    rounds of its longest partition as its programs fill `slots`. Plain: maps, then outputs.
    With the lead pass (`_plan`): the lead programs (each as long as two map rounds) beside the
    maps, then the other outputs."""
    rounds = lambda programs: -(-programs // slots)  # noqa: E731
    parts = [-(-n // size) for n in chunk_counts]
    maps = sum(parts) - len(parts)
    leads = sum(c > 1 for c in parts) if lead else 0
    outputs = sum(parts) - leads
    first = rounds((maps - leads) * hv * (nvb + nkb) + 2 * leads * hv * nvb)
    if leads:
        first = max(2, first)
    return min(size, max(chunk_counts)) * (first + 2 * rounds(outputs * hv * nvb))


def auto_partitions(chunk_counts: list[int], hv: int, nvb: int, nkb: int, device: torch.device,
                    programs_per_sm: int = 2, lead: bool | None = None) -> tuple[int, bool]:
    """(chunks per partition, lead) for these sequences: `auto_partition_chunks`' size for the
    plain plan, or, where `predicted_cost` says it is faster, the lead plan at the shortest size
    whose output rows (all partitions but each sequence's first) fit in one wave (1x128K, 16
    heads: 9 partitions, 8 of them in the output pass, against 8). Ties keep the plain plan.
    `lead` True / False: that plan at its own size."""
    size = auto_partition_chunks(chunk_counts, hv, nvb, device, programs_per_sm)
    longest = max(chunk_counts + [1])
    if device.type != "cuda" or size >= longest or lead is False:
        return size, False
    slots = programs_per_sm * _sms(device)
    lo, hi = 1, longest
    while lo < hi:  # the rows left count c - 1 per sequence of c > 1 partitions: falls as the size grows
        mid = (lo + hi) // 2
        if sum(max(1, -(-n // mid) - 1) for n in chunk_counts) * hv * nvb <= slots:
            hi = mid
        else:
            lo = mid + 1
    if len(chunk_counts) == 1:  # equal partitions
        lo = -(-longest // -(-longest // lo))
    lo = max(MIN_PARTITION_CHUNKS, lo)
    if lead or predicted_cost(chunk_counts, lo, True, hv, nvb, nkb, slots) < predicted_cost(
            chunk_counts, size, False, hv, nvb, nkb, slots):
        return lo, True
    return size, False


# Shorter partitions than this lose more in the chain (~7 us per partition, sequential) and the
# map pass's second wave than the output pass gains: H100, 16 heads, kernels: 1x4K 0.386 ms at
# 32 chunks, 0.243 at 16, 0.254 at 8; 1x8K 0.455 at 32, 0.453 at 16, 0.552 at 8 (NOTES.md, v4.4)
MIN_PARTITION_CHUNKS = 16


@functools.lru_cache(maxsize=128)
def _plan(seqs: tuple, partition_chunks: int, device: torch.device, lead: bool = False, adaptive: bool = False):
    """Tables for one sequence layout: chunks, partitions (output pass), maps and chains.

    Partition rows (b, t_start, t_end, seq, slot, is_last): `slot` indexes the partitions'
    start states (all partitions, `num_slots`). With `lead`, the first partition of each
    sequence of several is not an output-pass row but a `lead` row, run beside the map pass
    from the initial state: (b, t_start, t_end, slot of the second partition, seq, 1), so the
    output kernel's state_in index (slot) is the sequence's and its end state lands where the
    second partition starts; maps then cover the second partition to the last but one.

    `adaptive` (with `lead`): also the rows of the same tables with every lead row empty and
    the sequence's other partitions covering it all (the plain plan in the lead plan's shape:
    the same row counts, grids and chains), as "rows_a" (lead) and "rows_b" (empty leads):
    int32 [leads; maps; parts] x 6, from which `_choose_plan_kernel` picks on the GPU."""
    chunks, parts, leads, maps, chains = [], [], [], [], []
    alt_parts, alt_leads, alt_maps = [], [], []
    span = partition_chunks * CHUNK_SIZE
    slots = 0
    for n, (b, start, end) in enumerate(seqs):
        for t0 in range(start, end, CHUNK_SIZE):
            chunks.append((b, t0, min(CHUNK_SIZE, end - t0)))
        bounds = list(range(start, end, span)) or [start]
        first = slots
        first_map = len(maps)
        led = lead and len(bounds) > 1
        for i, t0 in enumerate(bounds):
            t1 = min(t0 + span, end)
            if led and i == 0:
                leads.append((b, t0, t1, first + 1, n, 1))
            else:
                parts.append((b, t0, t1, n, slots, int(i == len(bounds) - 1)))
            if i < len(bounds) - 1 and not (led and i == 0):
                maps.append((b, t0, t1, n, len(maps), 0))
            slots += 1
        chains.append((first, len(bounds), first_map, n))
        if adaptive:
            if led:  # an empty lead, then len(bounds) - 1 near-equal partitions of all the chunks
                alt_leads.append((b, start, start, first + 1, n, 1))
                n_chunks, count = -(-(end - start) // CHUNK_SIZE), len(bounds) - 1
                edges = [min(end, start + CHUNK_SIZE * (i * n_chunks // count)) for i in range(count)] + [end]
                for i in range(count):
                    alt_parts.append((b, edges[i], edges[i + 1], n, first + 1 + i, int(i == count - 1)))
                    if i < count - 1:
                        alt_maps.append((b, edges[i], edges[i + 1], n, first_map + i, 0))
            else:
                alt_parts.extend(parts[len(alt_parts):])
    # longest rows first: the passes' grids run rows slowest (`_program`), and the GPU starts
    # programs in grid order, so the long sequences of a varlen batch start in the first wave
    # and the short ones fill the slots they leave (rows are self-describing: any order works)
    for rows in (parts, leads, maps, alt_parts, alt_leads, alt_maps):
        rows.sort(key=lambda r: r[1] - r[2])
    as_tensor = lambda rows, width: torch.tensor(rows, dtype=torch.int32).reshape(-1, width).to(device)  # noqa: E731
    plan = {
        "chunks": as_tensor(chunks, 3),
        "parts": as_tensor(parts, 6),
        "leads": as_tensor(leads, 6),
        "maps": as_tensor(maps, 6),
        "chains": as_tensor(chains, 4),
        "num_chunks": len(chunks),
        "num_parts": len(parts),
        "num_leads": len(leads),
        "num_maps": len(maps),
        "num_slots": slots,
        "partitioned": slots > len(seqs),
    }
    if adaptive:
        assert (len(alt_leads), len(alt_maps), len(alt_parts)) == (len(leads), len(maps), len(parts))
        plan["rows_a"] = as_tensor(leads + maps + parts, 6)
        plan["rows_b"] = as_tensor(alt_leads + alt_maps + alt_parts, 6)
        plan["maps_ab"] = as_tensor(maps + alt_maps, 6)  # both plans' maps: one warm-start launch
    return plan


def launch_config(dtype: torch.dtype, dk: int, dv: int, group: int, hv: int, use_qk_l2norm: bool,
                  out_programs_per_sm: float = 1.0) -> dict:
    """Constexprs and launch options of the prefill kernels for these sizes: the one source
    for the launches below and for the offline sm_90 compile test (tests/triton_kernels).
    `out_programs_per_sm`: the output pass's grid over the GPU's SMs (chooses its stages).
    The rule is cached (it is part of every call's host time); each call gets fresh dicts."""
    cfg = _launch_config(dtype, dk, dv, group, hv, bool(use_qk_l2norm), out_programs_per_sm > 1,
                         tuple(TUNING.items()), interpreting())
    return {key: dict(x) if isinstance(x, dict) else x for key, x in cfg.items()}


@functools.lru_cache(maxsize=256)
def _launch_config(dtype, dk, dv, group, hv, use_qk_l2norm, many_programs, tuning_items, interpret) -> dict:
    tuning = dict(tuning_items)
    bk = max(16, next_power_of_2(dk))
    bv = _block_v(dk, dv, tuning["block_v"])
    dot = dot_dtype(dtype)
    exact = dtype == torch.bfloat16  # bf16 q/k/v tiles are exact tensor-core operands (the norm folded too)
    # the type q and k are exact in, for their grams (K K^T, Q K^T) as one product: fp16 inputs
    # take one fp16 product there, three split bf16 ones elsewhere (dot_dtype)
    if exact:
        gram_dot = dot
    elif dtype == torch.float16 and tuning["gram_fp16"]:
        gram_dot = tl.float16
    else:
        gram_dot = None
    prec = PRECISIONS[tuning["precision"]]
    # Pipelined tile loads live in shared memory (227 KB a block). fp32 operands at K = 128:
    # 296 KB at 3 stages, 131 KB at 1; bf16 at K = 256: 280 KB at 3, 197 KB at 2.
    fits = 1 if dot == tl.float32 else (2 if bk > 128 else 3)
    stages = min(fits, tuning["stages"] or (1 if many_programs and bv == 64 else 2))
    map_stages = min(fits, tuning["stages_map"] or stages)
    warps = 4 if interpret else tuning["warps_recurrence"]
    if dtype == torch.float32 and bv <= 16 and warps >= 8:
        # (H100, Triton 3.6, K = 256: the output pass's 3xTF32 products then read 512 B past their
        # shared buffer, compute-sanitizer memcheck; the default 32 columns at 4 warps, 16 at 4 and
        # 32 at 8 run clean. NOTES.md v5.15)
        raise ValueError("TUNING: fp32 inputs with block_v 16 at 8 warps fault in Triton 3.6 (invalid shared "
                         "reads); use 4 warps or block_v >= 32")
    # the inputs whose products take bf16 operands on the GPU (common.dot_dtype); the choices
    # below follow the inputs, not DOT, so that the interpreter (fp32 products) checks their data paths
    half = dtype in (torch.bfloat16, torch.float16)
    # T_u as a bf16 hi + lo pair with split products (PREC 0); else fp32
    t_split = half and prec == 0
    reorder = exact  # early_qs / fused_accumulate: where timed (bf16, K = 64-256; fp16: +31% at K = 128)
    inverse = dict(GROUP=group, K=dk, BK=bk, L2NORM=use_qk_l2norm, GRAM_DOT=gram_dot, DOT=dot, T_SPLIT=t_split,
                   BLOCKED16=tuning["inverse_blocked16"] and half,  # where measured
                   BLOCK_MERGE=tuning["inverse_block_merge"] and tuning["inverse_blocked16"] and half,
                   num_warps=tuning["warps_inverse"], num_stages=min(fits, 2))
    recurrence = dict(HV=hv, GROUP=group, K=dk, V=dv, BK=bk, BV=bv, NVB=cdiv(dv, bv), L2NORM=use_qk_l2norm,
                      K_EXACT=exact, GRAM_DOT=gram_dot, DOT=dot, PREC=prec, WHILE_LOOPS=interpret, TMA=tuning["tma"],
                      TMA_T=tuning["tma"] and tuning["tma_t"],
                      T_SPLIT=t_split, WARP_SPECIALIZE=tuning["warp_specialize"] and not interpret,
                      FUSED_ACC=tuning["fused_accumulate"] and reorder, EARLY_QS=tuning["early_qs"] and reorder,
                      num_warps=warps, num_stages=stages)
    bv_chain = max(16, min(tuning["block_v_chain"] or bv, next_power_of_2(dv)))
    prefetch = tuning["chain_prefetch"] and tuning["chain_in_registers"] and bk == 128
    chain = dict(HV=hv, K=dk, V=dv, BK=bk, BV=bv_chain, BKC=min(bk, 64), DOT=dot, PREC=prec,
                 IN_REGISTERS=tuning["chain_in_registers"] and bk <= 128, PREFETCH=prefetch,
                 num_warps=4 if interpret else (tuning["warps_chain"] or (8 if prefetch else warps)),
                 num_stages=min(fits, 2))
    map_launch = dict(num_stages=map_stages)
    if not interpret:  # register caps: launch options of the CUDA backend only
        if tuning["maxnreg_inverse"] and bk <= 128 and dot == tl.bfloat16:  # measured: bf16, K <= 128
            inverse["maxnreg"] = tuning["maxnreg_inverse"]
        if tuning["maxnreg"]:
            recurrence["maxnreg"] = tuning["maxnreg"]
        if tuning["maxnreg_map"] or tuning["maxnreg"]:
            map_launch["maxnreg"] = tuning["maxnreg_map"] or tuning["maxnreg"]
    return {"inverse": inverse, "recurrence": recurrence, "map_launch": map_launch, "chain": chain,
            "nvb": cdiv(dv, bv), "nkb": cdiv(dk, bv), "nvb_chain": cdiv(dv, bv_chain)}


def _tma_readable(x: torch.Tensor, dim: int, cols: int) -> bool:
    """Whether TMA can read [B, T, heads, D] x viewed as [B * T, heads * D] in [CHUNK, cols]
    tiles at column head * D + c (D == dim): heads and D must merge, B and T must merge, the
    inner stride be 1 and the base and row stride 16-byte aligned, and tiles must not
    straddle heads (D a multiple of cols)."""
    bsz, t_len, heads, d = x.shape
    if d != dim or d % cols or x.stride(3) != 1 or (heads > 1 and x.stride(2) != d):
        return False
    if bsz > 1 and x.stride(0) != t_len * x.stride(1):
        return False
    return not (x.data_ptr() % 16 or (x.stride(1) * x.element_size()) % 16 or (cols * x.element_size()) % 16)


def _tma_view(x: torch.Tensor, dim: int, cols: int):
    """Descriptor of x for the Triton passes' tiles (see `_tma_readable`), or None."""
    if not _tma_readable(x, dim, cols):
        return None
    bsz, t_len, heads, d = x.shape
    return TensorDescriptor(x, [bsz * t_len, heads * d], [x.stride(1), 1], [CHUNK_SIZE, cols])


def _tma_supported(device: torch.device) -> bool:
    if interpreting():
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _setup(q, k, v, seqs: tuple, use_qk_l2norm: bool, partition_chunks: int | None) -> tuple:
    """The host's decisions for one call layout: (plan, launch config, recurrence constexprs
    with the TMA choice, whether the Gluon passes run, nvb, adaptive). A function of what the
    call's layout key holds (`launch.call_sites`), so a repeated layout takes them from its table."""
    dk, hv, dv = q.shape[3], v.shape[2], v.shape[3]
    device = q.device
    bv = _block_v(dk, dv, TUNING["block_v"])
    nvb, nkb = cdiv(dv, bv), cdiv(dk, bv)
    chunk_counts = [cdiv(e - s, CHUNK_SIZE) for _, s, e in seqs]
    longest = max(chunk_counts + [1])
    half_ok = q.dtype == torch.bfloat16 or TUNING["gluon_fp16"]
    sm90 = TUNING["gluon_sm90"] and chunk_sm90 is not None and chunk_sm90.may_run(q, v) and half_ok
    sm90_256 = TUNING["gluon_output_256"] and chunk_sm90 is not None and chunk_sm90.may_run_256(q, v) and half_ok
    per_sm_rule = chunk_sm90.PROGRAMS_PER_SM if sm90 else (chunk_sm90.PROGRAMS_PER_SM_256 if sm90_256 else 2)
    lead = TUNING["lead_partition"]  # None: the model decides; True / False forces (A/B checks, tests)
    # "adaptive" (or None with the skip on): the GPU picks the lead plan or its empty-lead form
    adaptive = TUNING["skip_negligible_maps"] and lead in ("adaptive", None)
    if lead == "adaptive":
        lead = True
    if partition_chunks is None:
        partition_chunks, lead = auto_partitions(chunk_counts, hv, nvb, nkb, device, per_sm_rule, lead)
    else:
        partition_chunks = max(1, min(int(partition_chunks), longest))
        if lead is None:  # the model at the caller's size (off CUDA: the plain plan)
            slots = per_sm_rule * _sms(device) if device.type == "cuda" else 0
            lead = slots > 0 and (predicted_cost(chunk_counts, partition_chunks, True, hv, nvb, nkb, slots)
                                  < predicted_cost(chunk_counts, partition_chunks, False, hv, nvb, nkb, slots))
    # the lead plan where the model takes it, or its empty-lead form where the gates make the
    # maps cheap: chosen on the GPU (`_choose_plan_kernel`), no sync
    adaptive = adaptive and bool(lead)
    plan = _plan(seqs, partition_chunks, device, bool(lead), adaptive)
    adaptive = adaptive and plan["num_maps"] > 0
    per_sm = 1.0
    if device.type == "cuda":
        per_sm = plan["num_parts"] * hv * nvb / _sms(device)
    cfg = launch_config(q.dtype, dk, dv, hv // q.shape[2], hv, use_qk_l2norm, per_sm)
    rec = dict(cfg["recurrence"])
    # (T_u, a fresh contiguous buffer of 64-column rows, is always TMA-readable)
    operands = ((q, dk, rec["BK"]), (k, dk, rec["BK"]), (v, dv, rec["BV"]))
    rec["TMA"] = rec["TMA"] and _tma_supported(device) and all(_tma_readable(*x) for x in operands)
    rec["TMA_T"] = rec["TMA"] and rec["TMA_T"]
    # (the folded L2 norm needs the Gluon inverse: it computes the norms and the folded beta)
    gluon = sm90 and chunk_sm90.supported(q, v, rec) and (TUNING["gluon_inverse"] or not use_qk_l2norm)
    # the Gluon passes at K = 256 (column blocks of 32); the inverse in Gluon too with TUNING "gluon_inverse"
    gluon_out = sm90_256 and chunk_sm90.supported_256(q, v, rec)
    return plan, cfg, rec, gluon, gluon_out, nvb, adaptive


def chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                               cu_seqlens=None, use_qk_l2norm=False, seq_offsets=None,
                               partition_chunks: int | None = None,
                               out: torch.Tensor | None = None, final_state_out: torch.Tensor | None = None):
    """Validated inputs in the public layout. Returns (o [B, T, HV, V], final state or None).

    `seq_offsets`: cu_seqlens already read on the host (validation's copy), else read here.
    `partition_chunks`: chunks per sequence partition (None: `auto_partitions`; a value >= the
    longest sequence's chunk count means one partition per sequence). Whether each long
    sequence's first partition runs in the lead pass, beside the map pass: TUNING
    "lead_partition" (None: `predicted_cost` decides).
    `out`, `final_state_out`: optional preallocated outputs (the tests poison them).
    """
    bsz, t_len, _, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    group = hv // q.shape[2]
    device = q.device
    scale = float(scale)  # (a Python int 1 would be specialised as a constant)
    if cu_seqlens is not None:
        cu = list(seq_offsets) if seq_offsets is not None else [int(x) for x in cu_seqlens.tolist()]
        seqs = tuple((0, cu[i], cu[i + 1]) for i in range(len(cu) - 1))
    else:
        seqs = tuple((b, 0, t_len) for b in range(bsz))
    num_seqs = len(seqs)
    # (the public op validates the inputs, but the preallocated outputs only come here, and a wrong
    # size would be written past: NOTES.md v5.16. o is written through its strides, the state dense)
    for name, buf, shape, dtype, dense in (("out", out, (bsz, t_len, hv, dv), q.dtype, False),
                                           ("final_state_out", final_state_out, (num_seqs, hv, dk, dv),
                                            torch.float32, True)):
        if buf is not None and (tuple(buf.shape) != shape or buf.dtype != dtype or buf.device != device
                                or not (buf.is_contiguous() if dense else buf.stride(3) == 1)):
            raise ValueError(f"{name}: expected a {dtype} tensor of shape {shape} on {device} "
                             f"({'contiguous' if dense else 'unit stride in the last dim'}), "
                             f"got {buf.dtype} {tuple(buf.shape)} strides {buf.stride()} on {buf.device}")
    sites, device_index = call_sites(TUNING["fast_launch"], device, (q, k, v, g, beta, initial_state, out,
                                                                      final_state_out),
                                     "chunk", seqs, partition_chunks, bool(output_final_state), bool(use_qk_l2norm),
                                     tuple(TUNING.items()))
    setup = sites.get("setup") if sites is not None else None
    if setup is None:
        setup = _setup(q, k, v, seqs, use_qk_l2norm, partition_chunks)
        if sites is not None:
            sites["setup"] = setup
    plan, cfg, rec, gluon, gluon_out, nvb, adaptive = setup
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
    if cfg["inverse"]["T_SPLIT"]:  # bf16 hi + lo of head h at heads 2h, 2h + 1
        tinv = torch.empty(bsz, t_len, 2 * hv, CHUNK_SIZE, dtype=torch.bfloat16, device=device)
    else:
        tinv = torch.empty(bsz, t_len, hv, CHUNK_SIZE, dtype=torch.float32, device=device)
    # [B, T, HV, 2] stored head-major: a chunk's 64 (hi, lo) pairs of one head are 512
    # contiguous bytes, not 64 lines (H100: inverse -8 to -13%, output pass -1 to -3%; NOTES.md v5.5).
    # The folded L2 norm adds two fields: k's and q's norms (`_inverse_kernel`, chunk_sm90 module
    # doc; on the Gluon path q's are written only where the inverse sums them, TUNING["gluon_q_norms"])
    # the inverse in Gluon where the Gluon passes run (K = 128, and K = 256 since v5.12)
    gluon_inv = (gluon or gluon_out) and TUNING["gluon_inverse"]
    fold = (gluon or gluon_out) and bool(use_qk_l2norm)
    # q's norms summed by the output and lead passes from their q tiles (K = 128), or written by the
    # inverse (the Triton inverse always writes them). At K = 256 the inverse sums them: each of the
    # output pass's V / 32 column blocks would sum them again (H100, K256/V512 6 heads with the norm:
    # 1.76 -> 2.33 ms from the passes, NOTES.md v5.12)
    q_norms_out = fold and gluon and gluon_inv and TUNING["gluon_q_norms"] == "output"
    gcum = torch.empty(bsz, hv, t_len, 4 if use_qk_l2norm else 2, dtype=torch.float32,
                       device=device).transpose(1, 2)
    # the chunks' map-norm bounds (at each chunk's first token) and the warm-start table
    warm = plan["num_maps"] > 0 and TUNING["skip_negligible_maps"]
    bound = torch.empty(bsz, t_len, hv, dtype=torch.float32, device=device) if warm else gcum

    run = lambda name, fn, grid, *args, **kwargs: launch(sites, name, fn, grid, args, kwargs, device_index)  # noqa: E731
    # descriptors are built once per call, only for the passes that run (host time: ~3-14 us each)
    if gluon:
        gluon_descs = chunk_sm90.descriptors(q, k, v, tinv)
        gluon_kw = dict(packed_split=TUNING["gluon_packed_split"], descs=gluon_descs, sites=sites,
                        device_index=device_index, l2norm=fold)
        # (o as TMA writes it, where the caller's `out` allows; the transposed pass stores by rows)
        # (the transposed passes take bf16 only)
        transposed_out = TUNING["gluon_transposed"] and q.dtype == torch.bfloat16
        transposed_map = TUNING["gluon_map_transposed"] and q.dtype == torch.bfloat16
        o_tma = TUNING["gluon_o_tma"] and not transposed_out and _tma_readable(o, dv, chunk_sm90.BLOCK_V)
        o_desc = chunk_sm90.descriptor(o, chunk_sm90.BLOCK_V) if o_tma else None
    elif gluon_out:  # K = 256: the Gluon output, lead (and map) passes, column blocks of BV = 32
        bv = rec["BV"]
        gluon_descs = chunk_sm90.descriptors(q, k, v, tinv, bv)
        o_tma = TUNING["gluon_o_tma"] and _tma_readable(o, dv, bv)
        out_kw = dict(packed_split=TUNING["gluon_packed_split"], descs=gluon_descs, sites=sites,
                      device_index=device_index, l2norm=fold, block_v=bv)
        out_only = dict(split_qs=TUNING["gluon_split_qs"], wide_ks=TUNING["gluon_wide_ks"], q_norms=q_norms_out,
                        o_desc=chunk_sm90.descriptor(o, bv) if o_tma else None)
    if gluon_inv:
        inverse_sm90.inverse(k, g, beta, tinv, gcum, plan["chunks"], plan["num_chunks"], bound, hv, group, warm,
                             gluon_descs[1], sites=sites, device_index=device_index,
                             t_desc=gluon_descs[3] if TUNING["gluon_inverse_tma"] else None,
                             per_program=inverse_sm90.chunks_per_program(
                                 plan["num_chunks"], hv, inverse_slots(device, dk),
                                 TUNING["inverse_chunks_per_program"]),
                             l2norm=fold, q=q if fold and not q_norms_out else None)
    else:
        run("inverse", _inverse_kernel, (plan["num_chunks"], hv),
            q, k, g, beta, tinv, gcum, plan["chunks"], bound, *q.stride(), *k.stride(), *g.stride(), *beta.stride(),
            *tinv.stride()[:3], *gcum.stride()[:3], *bound.stride()[:3], DECAY_BOUND=warm, **cfg["inverse"])
    strides = (*q.stride(), *k.stride(), *v.stride(), *gcum.stride()[:3], *tinv.stride()[:3], *o.stride()[:3])
    # the Triton passes' tiles, where one of them may run
    if not gluon and not (gluon_out and TUNING["gluon_map_256"]):
        if rec["TMA"]:
            descs = [_tma_view(*x) for x in ((q, dk, rec["BK"]), (k, dk, rec["BK"]), (v, dv, rec["BV"]),
                                             (tinv, CHUNK_SIZE, CHUNK_SIZE))]
            tiles = (*descs[:3], gcum, descs[3] if rec["TMA_T"] else tinv, o)
        else:
            tiles = (q, k, v, gcum, tinv, o)
    state_in = h0
    partitioned = plan["partitioned"]
    if partitioned:
        starts = torch.empty(plan["num_slots"], hv, dk, dv, dtype=torch.float32, device=device)
        map_d = torch.empty(max(1, plan["num_maps"]), hv, dk, dv, dtype=torch.float32, device=device)
        map_m = torch.empty(max(1, plan["num_maps"]), hv, dk, dk, dtype=torch.float32, device=device)
        # with lead rows, the map pass runs on a side stream beside the lead pass (each
        # sequence's first partition from h0), which is queued first: its programs are the
        # longest of the two and must be placed before the map pass's fill the GPU
        side = _side_stream(device) if plan["num_leads"] and plan["num_maps"] else None
        warm_table = None
        leads, maps, parts = plan["leads"], plan["maps"], plan["parts"]
        if warm:
            map_rows = plan["maps_ab"] if adaptive else maps
            warm_table = torch.empty(map_rows.shape[0], hv, 2, dtype=torch.int32, device=device)
            run("warm start", _warm_start_kernel, (map_rows.shape[0], hv),
                bound, map_rows, warm_table, *bound.stride(), HV=hv, LIMIT=NEGLIGIBLE_LOG2, BLOCK=64)
        if adaptive:
            rows = torch.empty_like(plan["rows_a"])  # per call: the cached plan stays read-only
            warm_ab, warm_table = warm_table, torch.empty(plan["num_maps"], hv, 2, dtype=torch.int32, device=device)
            run("choose plan", _choose_plan_kernel, (1,),
                warm_ab, plan["rows_a"], plan["rows_b"], rows, warm_table, rows.shape[0], plan["num_maps"],
                HV=hv, NVB=nvb, NKB=cfg["nkb"], SLOTS=map_pass_slots(device), BLOCK=256)
            leads, maps, parts = rows.split([plan["num_leads"], plan["num_maps"], plan["num_parts"]])
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(device))
        if plan["num_leads"]:
            if gluon:
                chunk_sm90.output_pass(q, k, v, gcum, tinv, o, h0, starts, leads, plan["num_leads"], True,
                                       scale, hv, group, split_qs=TUNING["gluon_split_qs"], may_be_empty=adaptive,
                                       site="lead pass", transposed=transposed_out, o_desc=o_desc,
                                       wide_ks=TUNING["gluon_wide_ks"], q_norms=q_norms_out,
                                       single=TUNING["gluon_single"], **gluon_kw)
            elif gluon_out:
                chunk_sm90.output_pass(q, k, v, gcum, tinv, o, h0, starts, leads, plan["num_leads"], True,
                                       scale, hv, group, may_be_empty=adaptive, site="lead pass", **out_kw, **out_only)
            else:
                run("lead pass", _recurrence_kernel, (plan["num_leads"] * hv * nvb,),
                    *tiles, h0, starts, None, None, leads, None, *strides, scale, t_len,
                    MAP=False, PARTITIONED=True, HAS_STATE_IN=h0 is not None, STORE_FINAL=True, **rec)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            if plan["num_maps"] and gluon:
                chunk_sm90.map_pass(q, k, v, gcum, tinv, map_d, map_m, maps, plan["num_maps"], hv, group,
                                    warm=warm_table, transposed=transposed_map, single=TUNING["gluon_map_single"],
                                    **gluon_kw)
            elif plan["num_maps"] and gluon_out and TUNING["gluon_map_256"]:
                chunk_sm90.map_pass(q, k, v, gcum, tinv, map_d, map_m, maps, plan["num_maps"], hv, group,
                                    warm=warm_table, **out_kw)
            elif plan["num_maps"]:
                run("map pass", _recurrence_kernel, (plan["num_maps"] * hv * (nvb + cfg["nkb"]),),
                    *tiles, None, None, map_d, map_m, maps, warm_table, *strides, scale, t_len,
                    MAP=True, PARTITIONED=True, HAS_STATE_IN=False, STORE_FINAL=False, WARM=warm,
                    **{**rec, **cfg["map_launch"]})
        if side is not None:
            torch.cuda.current_stream(device).wait_stream(side)
        run("chain", _chain_kernel, (num_seqs, hv, cfg["nvb_chain"]),
            map_d, map_m, h0, starts, plan["chains"], HAS_H0=h0 is not None, LEAD=plan["num_leads"] > 0,
            **cfg["chain"])
        state_in = starts
    else:
        parts = plan["parts"]
    if gluon:
        chunk_sm90.output_pass(q, k, v, gcum, tinv, o, state_in, final, parts, plan["num_parts"],
                               partitioned, scale, hv, group, split_qs=TUNING["gluon_split_qs"], site="output pass",
                               transposed=transposed_out, o_desc=o_desc,
                               wide_ks=TUNING["gluon_wide_ks"], q_norms=q_norms_out,
                               single=TUNING["gluon_single"], **gluon_kw)
        return o, final
    if gluon_out:
        chunk_sm90.output_pass(q, k, v, gcum, tinv, o, state_in, final, parts, plan["num_parts"], partitioned,
                               scale, hv, group, **out_kw, **out_only)
        return o, final
    run("output pass", _recurrence_kernel, (plan["num_parts"] * hv * nvb,),
        *tiles, state_in, final, None, None, parts, None, *strides, scale, t_len,
        MAP=False, PARTITIONED=partitioned, HAS_STATE_IN=state_in is not None, STORE_FINAL=final is not None,
        **rec)
    return o, final
