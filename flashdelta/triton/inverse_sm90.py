"""The prefill's inverse kernel for Hopper (sm_90) in Gluon: T_u = (I + A)^-1 diag(beta) of
each chunk, by the same blocked substitution as `chunk._inverse_kernel` (16 x 16 diagonal
blocks by doubling, then the level-16 and level-32 merges on their nonzero blocks only).

Why a second kernel: the Triton one runs the shared-memory pipe at 73% of its peak (v5.2 ncu)
on the layout conversions around its small products (reshape / permute / split of [4, 16, 16]
and [2, 32, 32] tiles), with the tensor pipe at 15%. Here warp w of the warpgroup owns rows
16 w .. 16 w + 15 of every tile, from the gram's wgmma accumulator on, so the chunk's blocks
are per-warp tensors: [4, 16, N] with the warp as the batch. Every small product is an
mma.sync whose first operand is an accumulator relabelled in registers; only its second
operand is stored (a bf16 pair) and read back with ldmatrix. Products of two per-warp
matrices are batched (warp w: its own second operand); where the second operand is the same
for every warp (the level-32 merge: the chunk's top-left block; the level-16 A_{w, w-1} T_{w-1}:
T_0 or T_2, both computed, one kept per warp) it is a plain product over rows. T_u leaves
through k's tile (free after the gram) in 16-byte rows. v5.3 on the H100: inverse -35 to -38%
against the Triton kernel; ncu: the shared-memory / L1 pipe at 80% of its peak (NOTES.md).
A program runs several chunks in turn (v5.7): the next chunk's k arrives in a second tile and
its g, beta in registers while the current one is solved (inverse -6 to -13% on the H100).

Scope: as `chunk_sm90.supported` (bf16 k, K = 128, T_u as a bf16 pair, TMA-readable k), and at
K = 256 as `chunk_sm90.supported_256` (v5.12; two programs per SM there).
With the in-kernel L2 norm (L2NORM) nothing is normalised: the norms are folded into beta,
v and o (`chunk_sm90` module doc), and this kernel computes them. The results are the
Triton kernel's up to the order of the sums
inside the products (checked on the GPU against it and the fp64 oracle).
"""

from __future__ import annotations

import functools

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .chunk_sm90 import L2NORM_EPS, NORM_K, NORM_Q, _hi_lo, _issue, _tile_row_squares
from .launch import launch

LOG2E = gl.constexpr(1.4426950408889634)
NUM_WARPS = 4  # one warpgroup: the gram's wgmma
# four programs per SM: 54 KB each, and at most 128 registers. The chunk loop needs the cap:
# LLVM hoists the layouts' per-thread offsets out of it (uncapped 161-167 registers; capped 128,
# no spill, and a loop body of 1595-1790 SASS instructions against v5.6's 1720-1880 per program)
PROGRAMS_PER_SM = 4
PROGRAMS_PER_SM_256 = 2  # at K = 256 (k's two [64, 256] tiles: 87 KB)
MAX_REGISTERS = 128
# a program's first chunk, in chunk times, beyond its others (its k and gates are not loaded
# during a chunk before it); fitted on the H100 (v5.7: ~0.1 at 1x128K), rounded up
START_COST = 0.25

# warp w owns rows 16 w .. 16 w + 15: the gram's accumulator, the same tiles as [64, N] (M2)
# and as [4, 16, N] batches of one warp each (M3); the three share their registers
ACC = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16]))
M2 = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1], instr_shape=[16, 8]))
M3 = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1, 1], instr_shape=[1, 16, 8]))
A2 = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=M2, k_width=2))
B2 = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=M2, k_width=2))
A3 = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=M3, k_width=2))
B3 = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=M3, k_width=2))
ROW3 = gl.constexpr(gl.SliceLayout(2, M3))  # [4, 16]: a value per row
COL3 = gl.constexpr(gl.SliceLayout(0, gl.SliceLayout(1, M3)))  # [N]: a value per column
GATE = gl.constexpr(gl.BlockedLayout([1], [32], [4], [0]))  # [64]: the chunk's gates for the prefix sum
# [.., 16] bf16 rows (32 bytes): the 16-byte halves of rows 4 .. 7 of each 8 swapped, so the 8
# rows an ldmatrix / stmatrix touches fall in distinct banks (unswizzled: 2-way conflicts)
PAIR3 = gl.constexpr(gl.SwizzledSharedLayout(8, 4, 2, [2, 1, 0]))
PAIR2 = gl.constexpr(gl.SwizzledSharedLayout(8, 4, 2, [1, 0]))
FLAT = gl.constexpr(gl.SwizzledSharedLayout(1, 1, 1, [0]))
OUT_SMEM = gl.constexpr(gl.SwizzledSharedLayout(8, 1, 8, [1, 0]))  # [64, 64] bf16: 16-byte vectors, rows swizzled
# the same placement as TMA's 128-byte swizzle (16-byte chunk c of row r at c ^ (r % 8)): T_u by TMA
OUT_TMA = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16))
OUT = gl.constexpr(gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0]))  # 16 bytes per thread, a row per 8 threads
QROWS = gl.constexpr(gl.BlockedLayout([1, 32], [16, 2], [4, 1], [1, 0]))  # [64, 64] of q or k: 32 columns of a row per thread


@gluon.jit
def _index3(N: gl.constexpr):
    """Index tensors of the M3 layout: warp (batch) [4, 1, 1], row [1, 16, 1], column [1, 1, N]."""
    w = gl.arange(0, 4, layout=gl.SliceLayout(1, ROW3))
    r = gl.arange(0, 16, layout=gl.SliceLayout(0, ROW3))
    c = gl.arange(0, N, layout=COL3)
    return w[:, None, None], r[None, :, None], c[None, None, :]


@gluon.jit
def _column_blocks(x):
    """The four 16-column blocks of x [4, 16, 64] (M3), each [4, 16, 16] (M3): register picks
    (a thread holds its columns of every block)."""
    y = gl.permute(gl.reshape(x, [4, 16, 2, 2, 16]), (0, 1, 4, 3, 2))  # [.., col, block bit 0, block bit 1]
    first, second = gl.split(y)  # blocks 0, 1 and 2, 3
    b0, b1 = gl.split(first)
    b2, b3 = gl.split(second)
    return (gl.convert_layout(b0, M3, assert_trivial=True), gl.convert_layout(b1, M3, assert_trivial=True),
            gl.convert_layout(b2, M3, assert_trivial=True), gl.convert_layout(b3, M3, assert_trivial=True))


@gluon.jit
def _pick(blocks, w):
    """Per warp w ([4, 1, 1]) the block blocks[w] (a select; zero where w is outside 0 .. 3)."""
    b0, b1, b2, b3 = blocks
    return gl.where(w == 0, b0, gl.where(w == 1, b1, gl.where(w == 2, b2, gl.where(w == 3, b3, 0.0))))


@gluon.jit
def _to2(x):
    """[4, 16, N] (M3) as [64, N] (M2): the same registers."""
    return gl.convert_layout(gl.reshape(x, [64, x.shape[2]]), M2, assert_trivial=True)


@gluon.jit
def _to3(x):
    """[64, N] (M2) as [4, 16, N] (M3): the same registers."""
    return gl.convert_layout(gl.reshape(x, [4, 16, x.shape[1]]), M3, assert_trivial=True)


@gluon.jit
def _store_pair(x, hi_smem, lo_smem):
    hi, lo = _hi_lo(x)
    hi_smem.store(hi)
    lo_smem.store(lo)


@gluon.jit
def _mm3(a, hi_smem, lo_smem):
    """a [4, 16, 16] (M3, fp32) @ (hi + lo) [4, 16, 16] per warp, as the Triton kernel's split
    product: hi hi, lo hi, hi lo, fp32 accumulation."""
    a_hi, a_lo = _hi_lo(a)
    a_hi = gl.convert_layout(a_hi, A3)
    a_lo = gl.convert_layout(a_lo, A3)
    b_hi = hi_smem.load(B3)
    b_lo = lo_smem.load(B3)
    acc = mma_v2(a_hi, b_hi, gl.zeros([4, 16, 16], gl.float32, M3))
    acc = mma_v2(a_lo, b_hi, acc)
    return mma_v2(a_hi, b_lo, acc)


@gluon.jit
def _mm3_own(a, b, hi_smem, lo_smem):
    """a @ b for per-warp [4, 16, 16] tiles (b through this warp's slot of the pair buffers)."""
    _store_pair(b, hi_smem, lo_smem)
    gl.thread_barrier()
    return _mm3(a, hi_smem, lo_smem)


@gluon.jit
def _mm2(a, hi_smem, lo_smem, acc):
    """acc + a [64, 16] (M2, fp32) @ (hi + lo) [16, N] shared by every warp (split product)."""
    a_hi, a_lo = _hi_lo(a)
    a_hi = gl.convert_layout(a_hi, A2)
    a_lo = gl.convert_layout(a_lo, A2)
    b_hi = hi_smem.load(B2)
    b_lo = lo_smem.load(B2)
    acc = mma_v2(a_hi, b_hi, acc)
    acc = mma_v2(a_lo, b_hi, acc)
    return mma_v2(a_hi, b_lo, acc)


@gluon.jit
def _piece(t, t_sub, w, cb: gl.constexpr):
    """Column block cb of the level-16 tile for warp w: its diagonal block t where w = cb,
    the odd warps' T_{w, w-1} where w = cb + 1, else zero."""
    return gl.where(w == cb, t, gl.where((w % 2 == 1) & (w == cb + 1), t_sub, 0.0))


@gluon.jit
def _chunk_row(chunk_ptr, i_c):
    """Row i_c of the chunk table (chunk._plan): b, t0 (int64), n."""
    return (gl.load(chunk_ptr + i_c * 3).to(gl.int64), gl.load(chunk_ptr + i_c * 3 + 1).to(gl.int64),
            gl.load(chunk_ptr + i_c * 3 + 2))


@gluon.jit
def _chunk_inputs(g_ptr, beta_ptr, b, t0, n, i_h, s_gb, s_gt, s_gh, s_bb, s_bt, s_bh, rg):
    """The chunk's g and beta ([64], zero past its n tokens): one line per token each."""
    g = gl.load(g_ptr + b * s_gb + (t0 + rg) * s_gt + i_h * s_gh, mask=rg < n, other=0.0)
    beta = gl.load(beta_ptr + b * s_bb + (t0 + rg) * s_bt + i_h * s_bh, mask=rg < n, other=0.0)
    return g, beta


@gluon.jit
def _row_squares(x_ptr, b, t0, n, head, s_xb, s_xt, s_xh, K: gl.constexpr):
    """|x_t|^2 of the chunk's rows of x [B, T, heads, K] (unit inner stride) at `head` ([64] in
    QROWS' rows; 0 past n). Plain loads, 64 columns at a time (16 registers each)."""
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, QROWS))
    cols = gl.arange(0, 64, layout=gl.SliceLayout(0, QROWS))
    base = x_ptr + b * s_xb + (t0 + rows.to(gl.int64))[:, None] * s_xt + head * s_xh + cols[None, :]
    squares = gl.zeros([64], gl.float32, gl.SliceLayout(1, QROWS))
    for half in gl.static_range(K // 64):
        x = gl.load(base + half * 64, mask=(rows < n)[:, None], other=0.0).to(gl.float32)
        squares += gl.sum(x * x, axis=1)
    return squares


@gluon.jit
def _inverse_kernel(
    k_desc, g_ptr, beta_ptr, t_ptr, gcum_ptr, chunk_ptr, bound_ptr,
    s_gb, s_gt, s_gh, s_bb, s_bt, s_bh, s_tb, s_tt, s_th, s_cb, s_ct, s_ch, s_ub, s_ut, s_uh, t_total, t_desc,
    num_chunks, per_program, q_ptr, s_qb, s_qt, s_qh,
    GROUP: gl.constexpr, K: gl.constexpr, DECAY_BOUND: gl.constexpr, T_TMA: gl.constexpr = False,
    L2NORM: gl.constexpr = False, Q_NORMS: gl.constexpr = False,
):
    """Grid (cdiv(num_chunks, per_program), value heads): program i runs chunk rows
    i * per_program .. (i + 1) * per_program - 1 (rows (b, t0, n) at chunk_ptr) in turn, each
    chunk's k (TMA) and g, beta loaded during the one before (v5.7: a chunk's first loads were
    ~15% of the kernel's stall samples, v5.6 ncu). k_desc: k as [B * T, H * K], tiles [64, K].
    For value head h: T_u (bf16 hi at head 2h, lo at 2h + 1 of t_ptr [B, T, 2 HV, 64]), the
    gates' prefix sums G log2 e as fp32 hi + lo at gcum_ptr [B, T, HV, 2], and with DECAY_BOUND
    the log2 bound on the chunk's map norm at bound_ptr[b, t0, h] (as `chunk._inverse_kernel`).
    Rows past n are not written. T_TMA: a full chunk's T_u leaves by TMA (t_desc: T_u as
    [B * T, 2 HV * 64], [64, 64] tiles, the output pass's), a ragged one in rows.
    L2NORM (gcum [B, T, HV, 4]): beta is taken as beta / (|k|^2 + eps), and gcum's field NORM_K
    gets sqrt(|k|^2 + eps), v's factor in the passes (`chunk_sm90` module doc). With Q_NORMS
    (q_ptr: q [B, T, H, K] with unit inner stride) field NORM_Q gets 1 / sqrt(|q|^2 + eps),
    o's factor, too (by default the output pass sums those from its q tile: v5.9). The norms
    are summed at the top of the chunk, where few registers are live (from the gram's diagonal
    they spilled 40 B more offline): k's from its tile in shared memory, q's from plain loads by
    the first value head of each group, for all of them (H100, v5.8: k's from plain loads too
    took 5-8% more of this kernel; q's loads took the kernel from 0.47 to 0.70 ms at 1x128K)."""
    i_h = gl.program_id(1)
    first = gl.program_id(0) * per_program
    count = gl.minimum(per_program, num_chunks - first)

    # k twice: the next chunk's arrives in the other tile (which held the last chunk's T_u)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2, 64, K], k_desc.layout)  # (bf16 or fp16: the gram is exact)
    bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(bar.index(0), count=1)
    mbarrier.init(bar.index(1), count=1)
    # per-warp second operands (slot w: warp w's); the diagonal blocks, the level-16 tile's
    # first two column blocks and Y, read by every warp. The diagonal blocks are last read
    # before the level-32 merge writes Y: they share Y's first slot (54 KB: four per SM)
    own_hi = gl.allocate_shared_memory(gl.bfloat16, [4, 16, 16], PAIR3)
    own_lo = gl.allocate_shared_memory(gl.bfloat16, [4, 16, 16], PAIR3)
    p_hi = gl.allocate_shared_memory(gl.bfloat16, [2, 64, 16], PAIR2)
    p_lo = gl.allocate_shared_memory(gl.bfloat16, [2, 64, 16], PAIR2)
    y_hi = gl.allocate_shared_memory(gl.bfloat16, [2, 64, 16], PAIR2)
    y_lo = gl.allocate_shared_memory(gl.bfloat16, [2, 64, 16], PAIR2)
    d_hi = y_hi.index(0)
    d_lo = y_lo.index(0)
    beta_smem = gl.allocate_shared_memory(gl.float32, [64], FLAT)
    # T_u's pair [2, 64, 64] over a chunk's k tile once the gram is done: k's tile i holds K / 64
    # blocks of [64, 64], the pair takes its first two (TILE i, i + 1 with TILE = i * K / 64; at
    # K = 256 the pair at 2 i overwrote the other tile's incoming k: v5.12)
    BLOCKS: gl.constexpr = K // 64
    if T_TMA:
        out_all = k_smem._reinterpret(gl.bfloat16, [2 * BLOCKS, 64, 64], OUT_TMA)
    else:
        out_all = k_smem._reinterpret(gl.bfloat16, [2 * BLOCKS, 64, 64], OUT_SMEM)

    w3, r3, c3 = _index3(64)
    row3 = 16 * w3 + r3
    _, rr, cc = _index3(16)
    rg = gl.arange(0, 64, layout=GATE)
    col_k = ((i_h // GROUP) * K).to(gl.int32)

    b, t0, n = _chunk_row(chunk_ptr, first)
    _issue(k_desc, (b * t_total + t0).to(gl.int32), col_k, bar.index(0), k_smem.index(0), True)
    g_in, beta = _chunk_inputs(g_ptr, beta_ptr, b, t0, n, i_h, s_gb, s_gt, s_gh, s_bb, s_bt, s_bh, rg)
    for j in range(count):
        buf = j % 2
        k_cur = k_smem.index(buf)
        # the gates while k is in flight: G = prefix sums of g in fp64 (differences of large sums
        # stay exact under strong decay), in log2 units (every gate one exp2 of a difference);
        # beta by row and by column from shared memory
        if L2NORM:
            rows = gl.arange(0, 64, layout=gl.SliceLayout(1, QROWS))
            norms = gcum_ptr + b * s_cb + (t0 + rows.to(gl.int64)) * s_ct + i_h * s_ch
            # k's from its tile (issued during the last chunk: the wait moves up, it is rarely long)
            mbarrier.wait(bar.index(buf), (j // 2) & 1)
            n2 = _tile_row_squares(k_cur, QROWS, K) + L2NORM_EPS
            gl.store(norms + NORM_K, gl.sqrt_rn(n2), mask=rows < n)
            beta = beta / gl.convert_layout(n2, GATE)  # the normalised keys' beta (module doc)
            if Q_NORMS and i_h % GROUP == 0:  # (one program per key head: the group's value heads get the same)
                r_q = 1.0 / gl.sqrt_rn(_row_squares(q_ptr, b, t0, n, i_h // GROUP, s_qb, s_qt, s_qh, K) + L2NORM_EPS)
                for member in gl.static_range(GROUP):
                    gl.store(norms + member * s_ch + NORM_Q, r_q, mask=rows < n)
        g = g_in.to(gl.float64)
        beta_smem.store(beta)
        G = gl.associative_scan(g, 0, _add) * LOG2E
        c_ptr = gcum_ptr + b * s_cb + (t0 + rg) * s_ct + i_h * s_ch
        G_hi = G.to(gl.float32)
        gl.store(c_ptr, G_hi, mask=rg < n)
        gl.store(c_ptr + 1, (G - G_hi.to(gl.float64)).to(gl.float32), mask=rg < n)
        gl.thread_barrier()
        beta_r = beta_smem.reshape([4, 16]).load(ROW3)
        G_r = gl.convert_layout(gl.reshape(G, [4, 16]), ROW3)
        G_c = gl.convert_layout(G, COL3)
        gate = gl.exp2((G_r[:, :, None] - G_c[None, None, :]).to(gl.float32))

        mbarrier.wait(bar.index(buf), (j // 2) & 1)
        gram = warpgroup_mma(k_cur, k_cur.permute((1, 0)), gl.zeros([64, 64], gl.float32, ACC), use_acc=False,
                             is_async=True)
        gram = _to3(gl.convert_layout(warpgroup_mma_wait(num_outstanding=0, deps=(gram,)), M2, assert_trivial=True))
        # the next chunk's k into the other tile, once the last chunk's T_u has left it (its TMA
        # store read, its rows' reads done: the barrier above), and its g, beta into registers
        more = j + 1 < count
        if T_TMA:
            tma.store_wait(0)
        fence_async_shared()  # (the tile's last writes were the pair stores: generic proxy)
        gl.thread_barrier()
        b_next, t0_next, n_next = _chunk_row(chunk_ptr, first + gl.minimum(j + 1, count - 1))
        _issue(k_desc, (b_next * t_total + t0_next).to(gl.int32), col_k, bar.index(1 - buf), k_smem.index(1 - buf),
               more)
        g_next, beta_next = _chunk_inputs(g_ptr, beta_ptr, b_next, t0_next, gl.where(more, n_next, 0), i_h,
                                          s_gb, s_gt, s_gh, s_bb, s_bt, s_bh, rg)
        if DECAY_BOUND:
            # one token's map is e^{g_t} (I - beta_t k_t k_t^T), of norm e^{g_t} max(1, |1 - beta_t |k_t|^2|)
            # (with L2NORM: beta_t / n_t^2 on the raw k_t, the normalised token's map)
            norm2 = gl.sum(gl.where(row3 == c3, gram, 0.0), axis=2)
            growth = gl.log2(gl.maximum(gl.abs(1.0 - beta_r * norm2), 1.0))
            bound = (gl.sum(g, 0) * LOG2E).to(gl.float32) + gl.sum(gl.sum(growth, 1), 0)
            gl.store(bound_ptr + b * s_ub + t0 * s_ut + i_h * s_uh, bound)
        a = gl.where((row3 > c3) & (row3 < n), gram * gate * beta_r[:, :, None], 0.0)

        # the diagonal 16 x 16 blocks: T_2 = I - E_1, T_2s = T_s - T_s E_s T_s (s = 2, 4, 8)
        blocks = _column_blocks(a)
        lower = _pick(blocks, w3)
        t = gl.where(rr == cc, 1.0, 0.0) - gl.where((rr % 2 == 1) & (cc == rr - 1), lower, 0.0)
        for level in gl.static_range(1, 4):
            e = gl.where(((rr >> level) % 2 == 1) & (cc >> level == (rr >> level) - 1), lower, 0.0)
            et = _mm3_own(e, t, own_hi, own_lo)
            t = t - _mm3_own(t, et, own_hi, own_lo)
        # level 16 (odd warps): T_{w, w-1} = -T_w (A_{w, w-1} T_{w-1}); A_{w, w-1} T_0 and
        # A_{w, w-1} T_2 for every warp (the second operands are shared), warp 3 takes the second
        _store_pair(_to2(t), d_hi, d_lo)
        gl.thread_barrier()
        a_sub = _to2(_pick(blocks, w3 - 1))
        zero = gl.zeros([64, 16], gl.float32, M2)
        x = gl.where(w3 == 3, _to3(_mm2(a_sub, d_hi.slice(32, 16), d_lo.slice(32, 16), zero)),
                     _to3(_mm2(a_sub, d_hi.slice(0, 16), d_lo.slice(0, 16), zero)))
        t_sub = -_mm3_own(t, x, own_hi, own_lo)
        # level 32 (warps 2, 3): their first two column blocks -T_33 (A_31 T_11), with
        # T_11 = rows 0 .. 31 of the level-16 tile, T_33 its blocks (w, 2), (w, 3)
        for cb in gl.static_range(2):
            _store_pair(_to2(_piece(t, t_sub, w3, cb)), p_hi.index(cb), p_lo.index(cb))
        gl.thread_barrier()
        a_0 = _to2(blocks[0])
        a_1 = _to2(blocks[1])
        for cb in gl.static_range(2):
            y = _mm2(a_0, p_hi.index(cb).slice(0, 16), p_lo.index(cb).slice(0, 16),
                     gl.zeros([64, 16], gl.float32, M2))
            y = _mm2(a_1, p_hi.index(cb).slice(16, 16), p_lo.index(cb).slice(16, 16), y)
            _store_pair(y, y_hi.index(cb), y_lo.index(cb))
        gl.thread_barrier()
        t_2 = _to2(_piece(t, t_sub, w3, 2))  # block (w, 2): T_2 for warp 2, T_{3,2} for warp 3
        t_3 = _to2(_piece(t, t_sub, w3, 3))

        # T_u = T diag(beta) by 16-column blocks into k's tile (free since the gram), then out
        # in rows of 16 bytes per thread
        out_hi = out_all.index(BLOCKS * buf)
        out_lo = out_all.index(BLOCKS * buf + 1)
        for cb in gl.static_range(4):
            if cb < 2:
                z = _mm2(t_2, y_hi.index(cb).slice(32, 16), y_lo.index(cb).slice(32, 16),
                         gl.zeros([64, 16], gl.float32, M2))
                z = _mm2(t_3, y_hi.index(cb).slice(48, 16), y_lo.index(cb).slice(48, 16), z)
                piece = gl.where(w3 >= 2, -_to3(z), _piece(t, t_sub, w3, cb))
            else:
                piece = _piece(t, t_sub, w3, cb)
            beta_c = beta_smem.slice(16 * cb, 16).load(COL3)[None, None, :]
            _store_pair(_to2(piece * beta_c), out_hi.slice(16 * cb, 16, dim=1), out_lo.slice(16 * cb, 16, dim=1))
        if T_TMA:
            fence_async_shared()
        gl.thread_barrier()
        if T_TMA and n == 64:  # (a ragged chunk's tile would write the next sequence's rows)
            row = (b * t_total + t0).to(gl.int32)
            tma.async_copy_shared_to_global(t_desc, [row, 2 * i_h * 64], out_hi)
            tma.async_copy_shared_to_global(t_desc, [row, (2 * i_h + 1) * 64], out_lo)
        else:
            ro = gl.arange(0, 64, layout=gl.SliceLayout(1, OUT))
            co = gl.arange(0, 64, layout=gl.SliceLayout(0, OUT))
            t_base = t_ptr + b * s_tb + t0 * s_tt + 2 * i_h * s_th + (ro * s_tt)[:, None] + co[None, :]
            gl.store(t_base, out_hi.load(OUT), mask=(ro < n)[:, None])
            gl.store(t_base + s_th, out_lo.load(OUT), mask=(ro < n)[:, None])
        b = b_next
        t0 = t0_next
        n = n_next
        g_in = g_next
        beta = beta_next
    if T_TMA:
        tma.store_wait(0)  # (the last tile is read before the program's shared memory goes)
    mbarrier.invalidate(bar.index(0))
    mbarrier.invalidate(bar.index(1))


@gluon.jit
def _add(x, y):
    return x + y


@functools.lru_cache(maxsize=256)  # (per call on the host's path; a function of four integers)
def chunks_per_program(num_chunks: int, hv: int, slots: int, limit: int) -> int:
    """Chunks each inverse program runs in turn (a power of two up to `limit`; 1 where `slots`
    is 0): the count whose grid finishes first when `slots` programs (SMs x PROGRAMS_PER_SM) run
    at once, a program of p chunks taking p + START_COST chunk times (its first chunk's loads
    are not hidden). Whole waves matter most: on the H100, 1x8K 16/16 (2048 chunk-heads, 528
    slots) took 32.2 us at 4 chunks per program (one wave) and 38.0 us at 3 (two waves of 3).
    Powers of two: the counts timed (v5.7), the model's ties between others left untimed."""
    if slots <= 0:
        return 1

    def cost(p: int) -> float:
        waves = -(-(-(-num_chunks // p) * hv) // slots)
        return waves * (p + START_COST)

    counts = [1 << i for i in range(max(1, int(limit)).bit_length()) if 1 << i <= max(1, int(limit))]
    return min(counts, key=lambda p: (cost(p), -p))


def inverse(k, g, beta, tinv, gcum, chunks, num_chunks: int, bound, hv: int, group: int, decay_bound: bool,
            k_desc, sites=None, device_index: int = 0, t_desc=None, per_program: int = 1, l2norm: bool = False,
            q=None):
    """Launch over `num_chunks` chunk rows (chunk._plan's `chunks`) and the value heads: tinv
    [B, T, 2 HV, 64] (bf16 pair), gcum [B, T, HV, 2] and, with `decay_bound`, bound [B, T, HV]
    are written. k_desc: `chunk_sm90.descriptor(k, K)`. `sites`: the call layout's compiled
    kernels (`launch.launch`). t_desc: `chunk_sm90.descriptor(tinv, 64)` to store full chunks'
    T_u by TMA, or None. per_program: chunk rows per program (`chunks_per_program`). l2norm:
    the in-kernel L2 norm, folded (gcum then [B, T, HV, 4]: `_inverse_kernel`'s L2NORM); q:
    with it, where this kernel also sums q's norms (Q_NORMS), else None."""
    per_program = max(1, int(per_program))
    q_args = (q, *q.stride()[:3]) if q is not None else (None, 0, 0, 0)
    launch(sites, "inverse", _inverse_kernel, (triton.cdiv(num_chunks, per_program), hv), (
        k_desc, g, beta, tinv, gcum, chunks, bound, *g.stride(), *beta.stride(), *tinv.stride()[:3],
        *gcum.stride()[:3], *bound.stride()[:3], k.shape[1], t_desc, num_chunks, per_program, *q_args), dict(
        GROUP=group, K=k.shape[3], DECAY_BOUND=decay_bound, T_TMA=t_desc is not None, L2NORM=l2norm,
        Q_NORMS=q is not None,
        num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS),
        device_index)
