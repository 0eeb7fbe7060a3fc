"""The prefill's recurrence passes for Hopper (sm_90) in Gluon: the same chunk step as
`chunk._recurrence_kernel` (output pass, and the map pass with MAP = True), with the tile
loads and tensor-core products scheduled by hand.

Why a second kernel: the Triton passes wait on their TMA loads where they are issued (one
pipeline stage) and the output pass spills at 255 registers, so they run at ~25% of the
tensor-core rate. Here the next chunk's tiles are fetched while the current one computes (k
double-buffered; q, v and T_u as soon as their last reader is done), the products are
asynchronous wgmma, and the shared buffers are placed by hand (104 KB, 112 KB with o's tile
for its TMA store since v5.4: two 4-warp programs per SM). The one thing that made it fast
(NOTES.md v4.7): every shared-memory operand is taken through a loop-variant index (`z`,
always 0). With constant addresses the compiler hoists the ~40 wgmma descriptors out of the
loop, holds them in registers and spills them (255 registers + 376 B, v4.6: no faster than
Triton); loop-variant, they are rebuilt next to each product in
uniform registers (255 + 72 B; output pass -32 to -35% against the Triton pass on the H100).
Since v4.8 the hi + lo splits take two elements per packed conversion (`_hi_lo`) and the
state's products run before o's, so the next state's pair is formed while o's run (255 + 56 B;
map pass -9%, output pass -13 to -18% more).

Scope (`supported`): bf16 or fp16 q, k, v (k, q exact tensor-core operands), K = 128, V a multiple of
64, T_u as a bf16 hi + lo pair, TMA-readable layouts. With fp16 inputs (F16, v5.13) the state's and U~'s
pairs, which meet q or k in a product, are fp16 hi + lo of the tile scaled by a power of two
(`_fp16_scale`: any magnitude fits, ~22 bits; a register tree, redux.sync and one shared exchange
since v5.14, the registers' state kept in U~'s units); H100 1x32K 16/16: 1.71 -> 0.69 ms (FLA 1.38).
At K = 256 (`supported_256`, v5.12) the output, lead and map passes run with state column blocks
of 32 (BV): no spill, one program per SM (156 KB; the map pass 119 KB); the inverse is inverse_sm90's
(or the Triton one: the same layouts), which there also sums q's norms. H100, 1x32K 16 heads:
3.10 -> 1.72 ms against the Triton kernels (FLA 2.52), the map pass bitwise the Triton one's.

The in-kernel L2 norm (L2NORM) is folded, not applied: with n_t = sqrt(|k_t|^2 + eps), the
normalised token's update e^g (I - beta k^ k^T) S + beta k^ v^T (k^ = k / n) is exactly
e^g (I - b' k k^T) S + b' k (n v)^T with b' = beta / n^2, and o_t = S^T q_t / sqrt(|q_t|^2 + eps).
So the products take the raw bf16 q and k (exact operands, no normalised copy rounded to bf16
as the peers make), the inverse takes b' (and computes n_t, inverse_sm90), v's rows are scaled
by n_t (one more [64] load per step) and o's by 1 / |q_t|, which the output pass sums from the
q tile it holds anyway (Q_NORMS: q is read from HBM once; TUNING["gluon_q_norms"]). gcum then
holds four fields per token and head: G's hi and lo, n_t (NORM_K) and, where the inverse sums
q's norms instead, 1 / |q_t| (NORM_Q).
Gluon kernels do not run in the interpreter: CI compiles them for sm_90 (tests check their
resources); their numbers are tested on the GPU against the Triton kernel and the fp64 oracle.

Per chunk step, for the state column block S [K, BV] (fp32, registers; G read in log2 units):
  U = T_u (V - e^G (K S)),  o = scale (e^G (Q S) + (Q K^T o L) U),
  S <- e^{G_C} S + K^T (e^{G_C - G} U),
every product with an fp32 operand as bf16 hi + lo products (as the Triton kernel). The map
pass runs the step without q and o on the columns of D (values, zero start) and of M (start I,
v = 0): S_end = M S_start + D over a partition (chunk.py, `_chain_kernel`); by default on
transposed tiles (`_map_kernel_t`, v5.6), where the step's intermediates stay in registers.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..reference.common import L2NORM_EPS as L2NORM_EPS_
from .common import HI_LO_BF16X2
from .launch import launch

CHUNK_SIZE = 64
BLOCK_V = 64
NORM_K = gl.constexpr(2)  # gcum's fields with the in-kernel L2 norm: sqrt(|k|^2 + eps), then 1 / sqrt(|q|^2 + eps)
NORM_Q = gl.constexpr(3)
L2NORM_EPS = gl.constexpr(L2NORM_EPS_)
NUM_WARPS = 4  # one warpgroup: [64, 64] wgmma tiles, two programs per SM
HALF = (torch.bfloat16, torch.float16)  # the inputs these kernels take (fp16: F16 in `_recurrence_kernel`)
GL_TYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@gluon.jit
def _hi_lo(x, PACKED: gl.constexpr = True):
    """fp32 x as a bf16 pair hi + lo (~16 bits together): hi = bf16(x), lo = bf16(x - hi).
    PACKED: two elements at a time in inline PTX (common.HI_LO_BF16X2): the same roundings in
    3 instructions per element, where ptxas takes ~4 for the plain form. (The gates are
    exp2 of log2-unit sums: gl.exp2 is one ex2.approx.ftz, gl.exp three more instructions.)"""
    if PACKED:
        hi, lo = gl.inline_asm_elementwise(HI_LO_BF16X2, "=r,=r,r,r", [x], dtype=(gl.bfloat16, gl.bfloat16),
                                           is_pure=True, pack=2)
    else:
        hi = x.to(gl.bfloat16)
        lo = (x - hi.to(gl.float32)).to(gl.bfloat16)
    return hi, lo


@gluon.jit
def _hi_lo16(x):
    """fp32 x (scaled into fp16's range: |x| < 2^15) as an fp16 pair hi + lo (~22 bits together).
    (A packed PTX form as `_hi_lo`'s timed 1-3% slower, H100 v5.13.)"""
    hi = x.to(gl.float16)
    return hi, (x - hi.to(gl.float32)).to(gl.float16)


@gluon.jit
def _pow2(e):
    """2^e as fp32, exactly, for an int32 e in [-126, 127]."""
    return ((e + 127) << 23).to(gl.float32, bitcast=True)


@gluon.jit
def _abs_max(a, b):
    return gl.maximum(gl.abs(a), gl.abs(b))


# the warp's max of per-thread maxima in one instruction (sm_80+; integer only before sm_100)
REDUX_MAX_U32 = gl.constexpr("redux.sync.max.u32 $0, $1, 0xffffffff;")


@gluon.jit
def _put_warp_max(x, exchange, M: gl.constexpr, N: gl.constexpr):
    """Each warp's max |x| of an fp32 [M, N] tile in the wgmma accumulator layout (rows 16 w + (0..15)
    of each 64 on warp w; registers: row bits 3 and 6+, column bits 0 and 3+) into `exchange`
    ([8, 4, 4] int32 shared), as bits (non-negative floats order as their bits): the thread's
    elements in a tree of maxima (reduced one register bit at a time, not a chain; FMNMX takes
    |.| as a free modifier), then one redux.sync across the warp on the bits. The caller's barrier,
    then `_scale_of_max` (v5.14; gl.max over the tile took a 16-deep chain, five shuffle rounds and
    two barriers: NOTES.md v5.14)."""
    t = gl.reshape(x, [M // 64, 4, 2, 8, N // 32, 2, 2, 4, 2])
    t = gl.reduce(t, 8, _abs_max)
    t = gl.reduce(t, 6, _abs_max)
    t = gl.reduce(t, 5, _abs_max)
    t = gl.reduce(t, 4, _abs_max)
    t = gl.reduce(t, 2, _abs_max)
    t = gl.reduce(t, 0, _abs_max)  # [4, 8, 4]: (warp, lane // 4, lane % 4), one element per thread
    t = gl.inline_asm_elementwise(REDUX_MAX_U32, "=r,r", [t.to(gl.int32, bitcast=True)], dtype=gl.int32,
                                  is_pure=True, pack=1)
    exchange.store(gl.permute(t, (1, 2, 0)))  # the warps' maxima side by side at [0, 0, :]


@gluon.jit
def _scale_of_max(exchange):
    """The power of two e (int32) that takes the tile's max |x| (the four warps' maxima that
    `_put_warp_max` stored, read after a barrier: one 16-byte load) into [2^14, 2^15), fp16's range
    with room for the pair's rounding: the tile's fp16 pair is that of x 2^e. A zero or tiny tile
    (max below 2^-98) takes e = 112: its pair then holds fewer bits, of a state that small."""
    every_l: gl.constexpr = gl.BlockedLayout([1, 1, 4], [32, 1, 1], [4, 1, 1], [2, 1, 0])  # the four in each thread
    m4 = exchange.slice(0, 1, dim=0).slice(0, 1, dim=1).load(every_l)
    m = gl.max(gl.max(gl.max(m4, axis=2), axis=1), axis=0)
    return gl.minimum(141 - (m >> 23), 112)


@gluon.jit
def _fp16_scale(x, exchange, M: gl.constexpr, N: gl.constexpr):
    """`_scale_of_max` of the tile x, with its own barrier."""
    _put_warp_max(x, exchange, M, N)
    gl.thread_barrier()
    return _scale_of_max(exchange)


@gluon.jit
def _state_pair16(acc, e_u, exchange, K: gl.constexpr, BV: gl.constexpr):
    """F16: the state's pair from the accumulator acc = S 2^e_u (U~'s units, in which the registers
    keep it: no multiply to unscale it, v5.14): the fp16 pair of acc 2^e_r (`_fp16_scale`), and
    its scale for S, e_s = e_u + e_r."""
    e_r = _fp16_scale(acc, exchange, K, BV)
    s_hi, s_lo = _hi_lo16(acc * _pow2(e_r))
    return e_u + e_r, s_hi, s_lo


@gluon.jit
def _u_decay(g_hi, g_lo, last_hi, last_lo):
    """e^{G_C - G} by row: U~ = e^{G_C - G} U."""
    return gl.exp2((last_hi - g_hi) + (last_lo - g_lo))


@gluon.jit
def _decay(last_hi, last_lo, e, F16: gl.constexpr):
    """The state's factor before its update: e^{G_C}, times 2^e with F16 (the registers' state is
    S 2^f, U~'s pair that of U~ 2^e_u: e = e_u - f)."""
    if F16:
        return gl.exp2(last_hi + last_lo + e.to(gl.float32))
    else:
        return gl.exp2(last_hi + last_lo)


@gluon.jit
def _halves_sum(x, layout: gl.constexpr):
    """x [M, 2N] (a wide product's accumulator) as its two column halves' sum [M, N] in
    `layout` (the halves are register picks of the same thread)."""
    a, b = gl.split(gl.permute(gl.reshape(x, [x.shape[0], 2, x.shape[1] // 2]), (0, 2, 1)))
    return gl.convert_layout(a + b, layout, assert_trivial=True)


@gluon.jit
def _issue(desc, row, col, bar, dst, pred):
    mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [row, col], bar, dst, pred=pred)


@gluon.jit
def _issue_pair(desc, row, col_hi, col_lo, bar, dst_hi, dst_lo, pred):
    """T_u's hi and lo tiles (one barrier for both)."""
    mbarrier.expect(bar, 2 * desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [row, col_hi], bar, dst_hi, pred=pred)
    tma.async_copy_global_to_shared(desc, [row, col_lo], bar, dst_lo, pred=pred)


@gluon.jit
def _partition_row(part_ptr, i_p):
    """Row i_p of the partition table (chunk._plan): b, t_start, t_end, seq, slot (int64), is_last."""
    prow = part_ptr + i_p * 6
    return (gl.load(prow).to(gl.int64), gl.load(prow + 1).to(gl.int64), gl.load(prow + 2).to(gl.int64),
            gl.load(prow + 3).to(gl.int64), gl.load(prow + 4).to(gl.int64), gl.load(prow + 5))


@gluon.jit
def _gates(gcum_ptr, b, t0, t_end, i_h, s_cb, s_ct, s_ch, rt, C: gl.constexpr):
    """The chunk at t0's gate prefix sums G (hi, lo by row; 0 past t_end) and its last row's
    (G_C). Past the last chunk (t0 >= t_end) the rows are masked and G_C is row t_end - 1's."""
    n = gl.minimum(t_end - t0, C)
    c_row = gcum_ptr + b * s_cb + t0 * s_ct + i_h * s_ch
    g_hi = gl.load(c_row + rt * s_ct, mask=rt < n, other=0.0)
    g_lo = gl.load(c_row + rt * s_ct + 1, mask=rt < n, other=0.0)
    last_hi = gl.load(c_row + (n - 1) * s_ct)
    last_lo = gl.load(c_row + (n - 1) * s_ct + 1)
    return g_hi, g_lo, last_hi, last_lo


@gluon.jit
def _field(gcum_ptr, b, t0, t_end, i_h, s_cb, s_ct, s_ch, idx, FIELD: gl.constexpr, C: gl.constexpr):
    """Field FIELD of gcum for the chunk at t0's tokens idx (0 past t_end), in idx's layout."""
    n = gl.minimum(t_end - t0, C)
    return gl.load(gcum_ptr + b * s_cb + (t0 + idx) * s_ct + i_h * s_ch + FIELD, mask=idx < n, other=0.0)


@gluon.jit
def _tile_row_squares(tile, layout: gl.constexpr, K: gl.constexpr):
    """|x_t|^2 of the rows of a [64, K] bf16 tile in shared memory ([64] in the rows of
    `layout`, 64 columns at a time): the folded L2 norm's sums, here and in inverse_sm90."""
    squares = gl.zeros([64], gl.float32, gl.SliceLayout(1, layout))
    for half in gl.static_range(K // 64):
        x = tile.slice(half * 64, 64, dim=1).load(layout).to(gl.float32)
        squares += gl.sum(x * x, axis=1)
    return squares


@gluon.jit
def _recurrence_kernel(
    q_desc, k_desc, v_desc, t_desc, gcum_ptr, o_ptr, state_in_ptr, state_out_ptr, map_d_ptr, map_m_ptr, part_ptr,
    warm_ptr, s_cb, s_ct, s_ch, s_ob, s_ot, s_oh, scale, t_total, o_desc,
    HV: gl.constexpr, GROUP: gl.constexpr, K: gl.constexpr, V: gl.constexpr, MAP: gl.constexpr,
    HAS_STATE_IN: gl.constexpr, PARTITIONED: gl.constexpr, STORE_FINAL: gl.constexpr,
    PACKED_SPLIT: gl.constexpr = True, SPLIT_QS: gl.constexpr = True, WARM: gl.constexpr = False,
    MAY_BE_EMPTY: gl.constexpr = False, O_TMA: gl.constexpr = False, WIDE_KS: gl.constexpr = False,
    L2NORM: gl.constexpr = False, Q_NORMS: gl.constexpr = False, BV: gl.constexpr = 64, SINGLE: gl.constexpr = 0,
):
    """Grid (partitions x HV x V / BV), or (maps x HV x (V / BV + K / BV)) when MAP (column
    blocks past V / BV are M's), flattened with the row slowest; BV 64 at K = 128, 32 at K = 256
    (the X and U pairs take rows 0-127 of the state pair's [K, BV] tiles: K >= 128). q/k/v_desc:
    [B * T, heads * dim] views, tiles [64, K], [64, K], [64, BV]; t_desc: T_u as
    [B * T, 2 HV * 64] (hi of head h at 2h, lo at 2h + 1).
    part_ptr rows: (b, t_start, t_end, seq, slot, is_last) as `chunk._plan`. WARM (MAP):
    `chunk._warm_start_kernel`'s table at warm_ptr: where D's run starts, whether M is
    negligible (then 0, and nothing is fetched). MAY_BE_EMPTY: rows may have no chunk (the
    empty leads of chunk._choose_plan_kernel's plan B: the start state is stored as it is).
    O_TMA: o of full chunks leaves through shared memory and a TMA store (o_desc: o as [B * T,
    HV * V], [64, 64] tiles): 16 4-byte stores per thread per chunk held their registers and a
    fence waited on them (NOTES.md v5.4); a ragged last chunk is stored by rows with the mask.
    WIDE_KS: the state's pair is held side by side and K S is one 128-column product K [S_hi |
    S_lo] whose halves are summed in registers: k's tile is read once, not twice (the passes are
    bound by the shared-memory pipe; NOTES.md v5.5). L2NORM: the norms folded (module doc): v's
    rows times gcum's NORM_K, o's times 1 / |q_t|: summed from q's tile with Q_NORMS (while the
    state's and o's products run; the next q is fetched after it: v5.9), else gcum's NORM_Q.
    SINGLE (an experiment, bf16 output pass only; NOTES.md v5.15): products taken as one bf16
    product of the fp32 operand's hi instead of the split: 1 K S and Q S (with SPLIT_QS and
    WIDE_KS off), 2 also A U and K^T U~, 3 also T_u X (every product single, FLA's precision)."""
    C: gl.constexpr = 64
    NVB: gl.constexpr = V // BV
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BV, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, acc_l)
    col_l: gl.constexpr = gl.SliceLayout(0, acc_l)
    # [C, C] tiles (Q K^T and A): acc_l itself where BV = C
    accc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, C, 16])
    rowc_l: gl.constexpr = gl.SliceLayout(1, accc_l)
    colc_l: gl.constexpr = gl.SliceLayout(0, accc_l)
    s_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([K, BV], gl.bfloat16)
    s2_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([K, 2 * BV], gl.bfloat16)
    acc2_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 2 * BV, 16])

    # a 1-D grid, rows slowest (as chunk._program): rows start in table order, longest first
    if MAP:
        NCB: gl.constexpr = NVB + K // BV
    else:
        NCB: gl.constexpr = NVB
    pid = gl.program_id(0)
    i_p = pid // (HV * NCB)
    i_h = (pid // NCB) % HV
    i_v = pid % NCB
    b, t_start, t_end, seq, slot, is_last = _partition_row(part_ptr, i_p)
    i_hk = i_h // GROUP
    t_begin = t_start
    if MAP:  # column blocks past NVB are M's
        is_m = i_v >= NVB
        has_v = i_v < NVB
        c0 = (i_v - NVB * is_m.to(gl.int32)) * BV
        run_m = is_m
        if WARM:
            warm = warm_ptr + (i_p * HV + i_h) * 2
            skip = gl.load(warm + 1)
            run_m = is_m & (skip == 0)
            t_begin = gl.where(is_m, gl.where(skip != 0, t_end, t_start), gl.load(warm).to(gl.int64))
    else:
        has_v = True
        c0 = i_v * BV

    # shared memory: k twice (the next chunk's is fetched during this one), q, v, T_u hi / lo
    # once; the state's bf16 pair, whose rows later hold the pairs of X, U and U~. Single
    # buffers are [1, ...] so that the loop can index them by its opaque zero (module doc).
    # fp16 inputs (F16): q, k, v, o tiles in fp16; the products with q or k take the state's and
    # U~'s pairs in fp16, each tile scaled by a power of two into fp16's range (`_fp16_scale`);
    # the others (T_u X, A U) keep their bf16 pairs
    F16: gl.constexpr = k_desc.dtype == gl.float16
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2, C, K], k_desc.layout)
    if not MAP:
        q_all = gl.allocate_shared_memory(q_desc.dtype, [1, C, K], q_desc.layout)
        bar_q = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(bar_q, count=1)
    v_all = gl.allocate_shared_memory(v_desc.dtype, [1, C, BV], v_desc.layout)
    th_all = gl.allocate_shared_memory(gl.bfloat16, [1, C, C], t_desc.layout)
    tl_all = gl.allocate_shared_memory(gl.bfloat16, [1, C, C], t_desc.layout)
    if WIDE_KS:  # the state's pair side by side, [S_hi | S_lo]: one 128-column operand
        s2_all = gl.allocate_shared_memory(gl.bfloat16, [1, K, 2 * BV], s2_sl)
        if F16:  # (the pairs that meet q or k: the state's, U~'s)
            s2f_all = s2_all._reinterpret(gl.float16, [1, K, 2 * BV], s2_sl)
        else:
            s2f_all = s2_all
    else:
        sh_all = gl.allocate_shared_memory(gl.bfloat16, [1, K, BV], s_sl)
        sl_all = gl.allocate_shared_memory(gl.bfloat16, [1, K, BV], s_sl)
        if F16:
            shf_all = sh_all._reinterpret(gl.float16, [1, K, BV], s_sl)
            slf_all = sl_all._reinterpret(gl.float16, [1, K, BV], s_sl)
        else:
            shf_all = sh_all
            slf_all = sl_all
    if F16:  # the warps' maxima for the scales (`_put_warp_max`), 512 B
        exchange = gl.allocate_shared_memory(gl.int32, [8, 4, 4], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    bar_k = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    bar_v = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bar_t = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    if O_TMA:
        o_all = gl.allocate_shared_memory(o_desc.dtype, [1, C, BV], o_desc.layout)
    mbarrier.init(bar_k.index(0), count=1)
    mbarrier.init(bar_k.index(1), count=1)
    mbarrier.init(bar_v, count=1)
    mbarrier.init(bar_t, count=1)

    rk = gl.arange(0, K, layout=row_l)
    rt = gl.arange(0, C, layout=row_l)
    cb = gl.arange(0, BV, layout=col_l)
    cv = c0 + cb
    rtc = gl.arange(0, C, layout=rowc_l)
    ctc = gl.arange(0, C, layout=colc_l)
    if MAP:
        state = gl.where(run_m & (rk[:, None] == cv[None, :]), 1.0, 0.0)
    elif HAS_STATE_IN:
        if PARTITIONED:
            src = slot
        else:
            src = seq
        state = gl.load(state_in_ptr + (src * HV + i_h) * K * V + rk[:, None] * V + cv[None, :])
    else:
        state = gl.zeros([K, BV], gl.float32, acc_l)

    n_chunks = ((t_end - t_begin + C - 1) // C).to(gl.int32)
    row0 = (b * t_total + t_begin).to(gl.int32)
    col_k = (i_hk * K).to(gl.int32)
    col_v = (i_h * V + c0).to(gl.int32)
    col_th = (2 * i_h * C).to(gl.int32)
    col_tl = col_th + C
    if WARM or MAY_BE_EMPTY:
        first = n_chunks > 0  # (a row of no chunk: nothing may be left in flight)
    else:
        first = True
    _issue(k_desc, row0, col_k, bar_k.index(0), k_smem.index(0), first)
    if not MAP:
        _issue(q_desc, row0, col_k, bar_q, q_all.index(0), first)
    _issue(v_desc, row0, col_v, bar_v, v_all.index(0), has_v & first)  # M's columns start from v = 0
    _issue_pair(t_desc, row0, col_th, col_tl, bar_t, th_all.index(0), tl_all.index(0), first)

    if F16:  # (f: the registers hold S 2^f, in the units of the last U~'s pair)
        f = gl.to_tensor(0)
        e_s = _fp16_scale(state, exchange, K, BV)
        s_hi, s_lo = _hi_lo16(state * _pow2(e_s))
    else:
        e_s = 0
        f = 0
        s_hi, s_lo = _hi_lo(state, PACKED_SPLIT)
    if WIDE_KS:
        s2f_all.index(0).slice(0, BV, dim=1).store(s_hi)
        s2f_all.index(0).slice(BV, BV, dim=1).store(s_lo)
    else:
        shf_all.index(0).store(s_hi)
        if SINGLE == 0:
            slf_all.index(0).store(s_lo)
    fence_async_shared()
    gl.thread_barrier()

    for c in range(n_chunks):
        t0 = t_begin + c * C
        row = row0 + c * C
        more = c + 1 < n_chunks
        buf = c % 2
        zero = gl.zeros([C, BV], gl.float32, acc_l)  # (use_acc=False: never read)
        k_cur = k_smem.index(buf)
        z = c >> 30  # 0, opaque to the compiler: descriptors stay loop-variant (module doc)
        if O_TMA:  # the previous chunk's o has been read out of its buffer (barriers follow before the rewrite)
            tma.store_wait(0)
        v_smem = v_all.index(z)
        th_smem = th_all.index(z)
        tl_smem = tl_all.index(z)
        if WIDE_KS:
            s2_smem = s2_all.index(z)
            sh_smem = s2_smem.slice(0, BV, dim=1)
            sl_smem = s2_smem.slice(BV, BV, dim=1)
            s2f_smem = s2f_all.index(z)
            shf_smem = s2f_smem.slice(0, BV, dim=1)
            slf_smem = s2f_smem.slice(BV, BV, dim=1)
        else:
            sh_smem = sh_all.index(z)
            sl_smem = sl_all.index(z)
            shf_smem = shf_all.index(z)
            slf_smem = slf_all.index(z)
        xh_smem = sh_smem.slice(0, C)
        xl_smem = sl_smem.slice(0, C)
        uh_smem = sh_smem.slice(C, C)
        ul_smem = sl_smem.slice(C, C)
        uth_smem = shf_smem.slice(0, C)  # U~'s pair over X's rows (fp16 with F16)
        utl_smem = slf_smem.slice(0, C)
        # the next chunk's k into the other buffer (its last reader, the previous step, is done)
        _issue(k_desc, row + C, col_k, bar_k.index(1 - buf), k_smem.index(1 - buf), more)
        n = gl.minimum(t_end - t0, C)
        g_hi, g_lo, last_hi, last_lo = _gates(gcum_ptr, b, t0, t_end, i_h, s_cb, s_ct, s_ch, rt, C)

        # K S (and Q S) from the state's pair (bf16; fp16 scaled by 2^e_s with F16), stored by the
        # previous step or the prologue
        mbarrier.wait(bar_k.index(buf), (c // 2) & 1)
        if WIDE_KS:  # K [S_hi | S_lo]: k's tile read once for both halves (NOTES.md v5.5)
            ks = warpgroup_mma(k_cur, s2f_smem, gl.zeros([C, 2 * BV], gl.float32, acc2_l), use_acc=False,
                               is_async=True)
        else:
            ks = warpgroup_mma(k_cur, shf_smem, zero, use_acc=False, is_async=True)
            if SINGLE == 0:
                ks = warpgroup_mma(k_cur, slf_smem, ks, is_async=True)
        if MAP:
            ks = warpgroup_mma_wait(num_outstanding=0, deps=(ks,))
        else:
            q_smem = q_all.index(z)
            mbarrier.wait(bar_q, c & 1)
            qs = warpgroup_mma(q_smem, shf_smem, zero, use_acc=False, is_async=True)
            if SPLIT_QS:  # (off: Q S from the state's hi alone, o within 2.4e-3: NOTES.md v4.9)
                qs = warpgroup_mma(q_smem, slf_smem, qs, is_async=True)
                ks = warpgroup_mma_wait(num_outstanding=2, deps=(ks,))  # Q S runs on during X
            else:  # (one product of Q S in flight: waiting for two would read K S unfinished)
                ks = warpgroup_mma_wait(num_outstanding=1, deps=(ks,))
        if WIDE_KS:
            ks = _halves_sum(ks, acc_l)

        # X = V - e^G (K S) (V = 0 in M's columns), its pair into the state pair's first rows
        mbarrier.wait(bar_v, c & 1, pred=has_v)
        v = v_smem.load(acc_l).to(gl.float32)
        if L2NORM:
            v = v * _field(gcum_ptr, b, t0, t_end, i_h, s_cb, s_ct, s_ch, rt, NORM_K, C)[:, None]
        if MAP:  # M's programs never fill v's buffer: a select, so its contents are not used
            v = gl.where(is_m, 0.0, v)
        if F16:  # (K S and Q S are of the state times 2^e_s)
            g_s = g_hi - e_s.to(gl.float32)
        else:
            g_s = g_hi
        x = v - gl.exp2(g_s)[:, None] * ks
        x_hi, x_lo = _hi_lo(x, PACKED_SPLIT)
        if not MAP:
            qs = warpgroup_mma_wait(num_outstanding=0, deps=(qs,))
        gl.thread_barrier()  # every thread has read v and the state pair's readers are done
        fence_async_shared()
        _issue(v_desc, row + C, col_v, bar_v, v_smem, more & has_v)
        xh_smem.store(x_hi)
        if SINGLE < 3:
            xl_smem.store(x_lo)
        fence_async_shared()
        gl.thread_barrier()

        # U = T_u X (three products of the pairs) and, behind them, Q K^T
        mbarrier.wait(bar_t, c & 1)
        u = warpgroup_mma(th_smem, xh_smem, zero, use_acc=False, is_async=True)
        if SINGLE < 3:
            u = warpgroup_mma(tl_smem, xh_smem, u, is_async=True)
            u = warpgroup_mma(th_smem, xl_smem, u, is_async=True)
        if MAP:
            u = warpgroup_mma_wait(num_outstanding=0, deps=(u,))
        else:
            qk = warpgroup_mma(q_smem, k_cur.permute((1, 0)), gl.zeros([C, C], gl.float32, accc_l), use_acc=False,
                               is_async=True)
            u = warpgroup_mma_wait(num_outstanding=1, deps=(u,))
            # the gates by column, for the decay of Q K^T: a shuffle of the row gates (two
            # [64] loads per column would hold 64 addresses per thread)
            g_hi_c = gl.convert_layout(g_hi, colc_l)
            g_lo_c = gl.convert_layout(g_lo, colc_l)
            g_hi_r = gl.convert_layout(g_hi, rowc_l)
            g_lo_r = gl.convert_layout(g_lo, rowc_l)
        if F16:  # U~'s warp maxima cross the barrier below (its scale takes no barrier of its own;
            # U~ is formed again after it: held across it, it spilled)
            u = gl.where((rt < n)[:, None], u, 0.0)
            _put_warp_max(u * _u_decay(g_hi, g_lo, last_hi, last_lo)[:, None], exchange, C, BV)
        gl.thread_barrier()  # T_u and X are read: fetch the next chunk's T_u
        _issue_pair(t_desc, row + C, col_th, col_tl, bar_t, th_smem, tl_smem, more)
        if not F16:  # rows past the chunk's tokens are zero (TMA reads the next sequence's rows there)
            u = gl.where((rt < n)[:, None], u, 0.0)
        if not MAP:  # U's pair into the state pair's last rows
            u_hi, u_lo = _hi_lo(u, PACKED_SPLIT)
            uh_smem.store(u_hi)
            if SINGLE < 2:
                ul_smem.store(u_lo)
        # U~ = e^{G_C - G} U's pair over X's
        if F16:  # U~ 2^e_u as an fp16 pair: the state's update below is then 2^e_u too
            e_u = _scale_of_max(exchange)
            ut_hi, ut_lo = _hi_lo16(u * (_u_decay(g_hi, g_lo, last_hi, last_lo) * _pow2(e_u))[:, None])
        else:
            u_t = u * _u_decay(g_hi, g_lo, last_hi, last_lo)[:, None]
            e_u = 0
            ut_hi, ut_lo = _hi_lo(u_t, PACKED_SPLIT)
        uth_smem.store(ut_hi)
        if SINGLE < 2:
            utl_smem.store(ut_lo)

        k_t = k_cur.permute((1, 0))
        if MAP:  # S <- e^{G_C} S + K^T U~
            fence_async_shared()
            gl.thread_barrier()
            state = warpgroup_mma(k_t, uth_smem, state * _decay(last_hi, last_lo, e_u - f, F16), is_async=True)
            state = warpgroup_mma(k_t, utl_smem, state, is_async=True)
            state = warpgroup_mma_wait(num_outstanding=0, deps=(state,))
            if F16:
                e_s, s_hi, s_lo = _state_pair16(state, e_u, exchange, K, BV)
                f = e_u
            else:
                s_hi, s_lo = _hi_lo(state, PACKED_SPLIT)
        else:
            # o = scale (e^G (Q S) + (Q K^T o L) U): the pair of A = Q K^T o L in registers
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
            if not Q_NORMS:  # (else q's tile is read once more below)
                gl.thread_barrier()  # q is read: fetch the next chunk's
                _issue(q_desc, row + C, col_k, bar_q, q_smem, more)
            diff = (g_hi_r[:, None] - g_hi_c[None, :]) + (g_lo_r[:, None] - g_lo_c[None, :])
            a = qk * gl.exp2(gl.where(rtc[:, None] >= ctc[None, :], diff, float("-inf")))
            if SINGLE < 2:
                a_hi, a_lo = _hi_lo(a, PACKED_SPLIT)
                a_lo = gl.convert_layout(a_lo, a_l)
            else:
                a_hi = a.to(gl.bfloat16)
            a_hi = gl.convert_layout(a_hi, a_l)
            fence_async_shared()
            gl.thread_barrier()
            # S <- e^{G_C} S + K^T U~ first, then o: the next state pair is formed while o runs
            state = warpgroup_mma(k_t, uth_smem, state * _decay(last_hi, last_lo, e_u - f, F16), is_async=True)
            if SINGLE < 2:
                state = warpgroup_mma(k_t, utl_smem, state, is_async=True)
            o = warpgroup_mma(a_hi, uh_smem, qs * gl.exp2(g_s)[:, None], is_async=True)
            if SINGLE < 2:
                o = warpgroup_mma(a_lo, uh_smem, o, is_async=True)
                o = warpgroup_mma(a_hi, ul_smem, o, is_async=True)
            if L2NORM:
                if Q_NORMS:  # 1 / |q_t| from q's tile while the products run (NOTES.md v5.9)
                    r_q = 1.0 / gl.sqrt_rn(_tile_row_squares(q_smem, acc_l, K) + L2NORM_EPS)
            if SINGLE < 2:
                state = warpgroup_mma_wait(num_outstanding=3, deps=(state,))
            else:
                state = warpgroup_mma_wait(num_outstanding=1, deps=(state,))
            if F16:
                e_s, s_hi, s_lo = _state_pair16(state, e_u, exchange, K, BV)
                f = e_u
            else:
                s_hi, s_lo = _hi_lo(state, PACKED_SPLIT)
            # (A's registers are operands until the products are done: kept alive through the wait)
            if SINGLE < 2:
                o, a_hi, a_lo = warpgroup_mma_wait(num_outstanding=0, deps=(o, a_hi, a_lo))
            else:
                o, a_hi = warpgroup_mma_wait(num_outstanding=0, deps=(o, a_hi))
            if L2NORM:
                if not Q_NORMS:
                    r_q = _field(gcum_ptr, b, t0, t_end, i_h, s_cb, s_ct, s_ch, rt, NORM_Q, C)
                o = o * r_q[:, None]
            o_out = (o * scale).to(o_ptr.dtype.element_ty)
            o_base = o_ptr + b * s_ob + t0 * s_ot + i_h * s_oh + c0
            if O_TMA:  # full chunks by TMA (a ragged last chunk's would write the next sequence's rows)
                if n == C:
                    o_all.index(z).store(o_out)  # (stored below, after the fence)
                else:
                    gl.store(o_base + (rt * s_ot)[:, None] + cb[None, :], o_out, mask=(rt < n)[:, None])
            else:
                gl.store(o_base + (rt * s_ot)[:, None] + cb[None, :], o_out, mask=(rt < n)[:, None])
        gl.thread_barrier()  # the state pair's rows are read: the next state's pair replaces them
        if not MAP:
            if Q_NORMS:  # (q's tile is read: fetch the next chunk's)
                _issue(q_desc, row + C, col_k, bar_q, q_smem, more)
        shf_smem.store(s_hi)
        if SINGLE == 0:
            slf_smem.store(s_lo)
        fence_async_shared()
        gl.thread_barrier()
        if O_TMA:
            if n == C:
                tma.async_copy_shared_to_global(o_desc, [row, col_v], o_all.index(z))

    if O_TMA:
        tma.store_wait(0)  # (the last o tile is read before the program's shared memory goes)
    mbarrier.invalidate(bar_k.index(0))
    mbarrier.invalidate(bar_k.index(1))
    mbarrier.invalidate(bar_v)
    mbarrier.invalidate(bar_t)
    if F16:
        state = state * _pow2(-f)
    if MAP:
        if is_m:
            gl.store(map_m_ptr + (slot * HV + i_h) * K * K + rk[:, None] * K + cv[None, :], state)
        else:
            gl.store(map_d_ptr + (slot * HV + i_h) * K * V + rk[:, None] * V + cv[None, :], state)
    else:
        mbarrier.invalidate(bar_q)
        if STORE_FINAL:
            if is_last != 0:
                gl.store(state_out_ptr + (seq * HV + i_h) * K * V + rk[:, None] * V + cv[None, :], state)


@gluon.jit
def _output_kernel_t(
    q_desc, k_desc, v_desc, t_desc, gcum_ptr, o_ptr, state_in_ptr, state_out_ptr, part_ptr,
    s_cb, s_ct, s_ch, s_ob, s_ot, s_oh, scale, t_total,
    HV: gl.constexpr, GROUP: gl.constexpr, K: gl.constexpr, V: gl.constexpr,
    HAS_STATE_IN: gl.constexpr, PARTITIONED: gl.constexpr, STORE_FINAL: gl.constexpr,
    PACKED_SPLIT: gl.constexpr = True, SPLIT_QS: gl.constexpr = True, MAY_BE_EMPTY: gl.constexpr = False,
):
    """The output pass on transposed tiles (`TUNING["gluon_transposed"]`): the state is held as
    S^T [BV, K], and the products whose operand is one of the step's intermediates (X, U, U~)
    take its pair as the register operand, the chunk's tile from shared memory as the other:
      (K S)^T = S^T K^T,  U^T = X^T T_u^T,  S'^T = e^{G_C} S^T + U~^T K,  o^T = e^G (S^T Q^T) + U^T A^T.
    Why: in `_recurrence_kernel` both operands of every product but o's come from shared memory
    (64-column tiles) and the pairs of S, X, U and U~ are stored there each step; the profile
    (NOTES.md v5.2) reads the shared-memory data pipe at ~71% of its peak, the tensor pipe at 43%.
    Here the pairs of X, U and U~ stay in registers; S's pair and A's are stored (A's over q's
    tile once q is read). The same products of the same pairs (lo x lo dropped) as
    `_recurrence_kernel`; arguments as its output pass."""
    C: gl.constexpr = 64
    BV: gl.constexpr = 64
    NVB: gl.constexpr = V // BV
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, acc_l)
    col_l: gl.constexpr = gl.SliceLayout(0, acc_l)
    pair_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([C, C], gl.bfloat16)
    s_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BV, K], gl.bfloat16)
    # o^T [BV, C] stored through a layout whose threads hold 8 consecutive columns of o (16 B)
    out_l: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, 4], [0, 1])

    pid = gl.program_id(0)
    i_p = pid // (HV * NVB)
    i_h = (pid // NVB) % HV
    i_v = pid % NVB
    b, t_start, t_end, seq, slot, is_last = _partition_row(part_ptr, i_p)
    i_hk = i_h // GROUP
    c0 = i_v * BV

    k_smem = gl.allocate_shared_memory(gl.bfloat16, [2, C, K], k_desc.layout)
    q_all = gl.allocate_shared_memory(gl.bfloat16, [1, C, K], q_desc.layout)
    v_all = gl.allocate_shared_memory(gl.bfloat16, [1, C, BV], v_desc.layout)
    th_all = gl.allocate_shared_memory(gl.bfloat16, [1, C, C], t_desc.layout)
    tl_all = gl.allocate_shared_memory(gl.bfloat16, [1, C, C], t_desc.layout)
    sh_all = gl.allocate_shared_memory(gl.bfloat16, [1, BV, K], s_sl)
    sl_all = gl.allocate_shared_memory(gl.bfloat16, [1, BV, K], s_sl)
    # the gates by column (tokens are columns here) are re-read from shared memory where used:
    # held, they are 16 registers each from X to o (spill 224 -> 16 B, NOTES.md v5.6)
    gh_smem = gl.allocate_shared_memory(gl.float32, [C], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    gls_smem = gl.allocate_shared_memory(gl.float32, [C], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    bar_k = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    bar_q = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bar_v = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bar_t = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar_k.index(0), count=1)
    mbarrier.init(bar_k.index(1), count=1)
    mbarrier.init(bar_q, count=1)
    mbarrier.init(bar_v, count=1)
    mbarrier.init(bar_t, count=1)

    rv = gl.arange(0, BV, layout=row_l)  # the state's columns: rows of the transposed tiles
    rt = gl.arange(0, C, layout=row_l)  # tokens as rows (A = Q K^T)
    ct = gl.arange(0, C, layout=col_l)  # tokens as columns
    ck = gl.arange(0, K, layout=col_l)  # key dimensions as columns (S^T)
    cv = c0 + rv
    if HAS_STATE_IN:
        if PARTITIONED:
            src = slot
        else:
            src = seq
        state = gl.load(state_in_ptr + (src * HV + i_h) * K * V + ck[None, :] * V + cv[:, None])
    else:
        state = gl.zeros([BV, K], gl.float32, acc_l)

    n_chunks = ((t_end - t_start + C - 1) // C).to(gl.int32)
    row0 = (b * t_total + t_start).to(gl.int32)
    col_k = (i_hk * K).to(gl.int32)
    col_v = (i_h * V + c0).to(gl.int32)
    col_th = (2 * i_h * C).to(gl.int32)
    col_tl = col_th + C
    if MAY_BE_EMPTY:
        first = n_chunks > 0  # (a row of no chunk: nothing may be left in flight)
    else:
        first = True
    _issue(k_desc, row0, col_k, bar_k.index(0), k_smem.index(0), first)
    _issue(q_desc, row0, col_k, bar_q, q_all.index(0), first)
    _issue(v_desc, row0, col_v, bar_v, v_all.index(0), first)
    _issue_pair(t_desc, row0, col_th, col_tl, bar_t, th_all.index(0), tl_all.index(0), first)
    s_hi, s_lo = _hi_lo(state, PACKED_SPLIT)
    sh_all.index(0).store(s_hi)
    sl_all.index(0).store(s_lo)
    fence_async_shared()
    gl.thread_barrier()

    for c in range(n_chunks):
        t0 = t_start + c * C
        row = row0 + c * C
        more = c + 1 < n_chunks
        buf = c % 2
        zero = gl.zeros([BV, C], gl.float32, acc_l)  # (use_acc=False: never read)
        k_cur = k_smem.index(buf)
        z = c >> 30  # 0, opaque to the compiler: descriptors stay loop-variant (module doc)
        q_smem = q_all.index(z)
        v_smem = v_all.index(z)
        th_smem = th_all.index(z)
        tl_smem = tl_all.index(z)
        sh_smem = sh_all.index(z)
        sl_smem = sl_all.index(z)
        a_pair = q_smem._reinterpret(gl.bfloat16, [2, C, C], pair_sl)  # A's pair, once q is read
        _issue(k_desc, row + C, col_k, bar_k.index(1 - buf), k_smem.index(1 - buf), more)
        n = gl.minimum(t_end - t0, C)
        g_hi, g_lo, last_hi, last_lo = _gates(gcum_ptr, b, t0, t_end, i_h, s_cb, s_ct, s_ch, rt, C)

        # (K S)^T from the state's pair (stored by the previous step or the prologue)
        k_t = k_cur.permute((1, 0))
        mbarrier.wait(bar_k.index(buf), (c // 2) & 1)
        ks = warpgroup_mma(sh_smem, k_t, zero, use_acc=False, is_async=True)
        ks = warpgroup_mma(sl_smem, k_t, ks, is_async=True)
        ks = warpgroup_mma_wait(num_outstanding=0, deps=(ks,))
        gh_smem.store(g_hi)  # (their last readers, the previous step's o, are past a barrier)
        gls_smem.store(g_lo)
        gl.thread_barrier()
        g_hi_c = gh_smem.load(col_l)

        # X^T = V^T - (K S)^T e^G, its pair in registers
        mbarrier.wait(bar_v, c & 1)
        v = v_smem.permute((1, 0)).load(acc_l).to(gl.float32)
        x = v - ks * gl.exp2(g_hi_c)[None, :]
        x_hi, x_lo = _hi_lo(x, PACKED_SPLIT)
        x_hi = gl.convert_layout(x_hi, a_l)
        x_lo = gl.convert_layout(x_lo, a_l)
        gl.thread_barrier()  # every thread has read v: fetch the next chunk's
        fence_async_shared()
        _issue(v_desc, row + C, col_v, bar_v, v_smem, more)

        # U^T = X^T T_u^T (the same three products of the pairs)
        mbarrier.wait(bar_t, c & 1)
        th_t = th_smem.permute((1, 0))
        tl_t = tl_smem.permute((1, 0))
        u = warpgroup_mma(x_hi, th_t, zero, use_acc=False, is_async=True)
        u = warpgroup_mma(x_hi, tl_t, u, is_async=True)
        u = warpgroup_mma(x_lo, th_t, u, is_async=True)
        u, x_hi, x_lo = warpgroup_mma_wait(num_outstanding=0, deps=(u, x_hi, x_lo))
        gl.thread_barrier()  # T_u is read: fetch the next chunk's
        _issue_pair(t_desc, row + C, col_th, col_tl, bar_t, th_smem, tl_smem, more)
        # columns past the chunk's tokens are zero (TMA reads the next sequence's rows there)
        u = gl.where((ct < n)[None, :], u, 0.0)
        g_hi_c = gh_smem.load(col_l)
        g_lo_c = gls_smem.load(col_l)
        u_t = u * gl.exp2((last_hi - g_hi_c) + (last_lo - g_lo_c))[None, :]
        ut_hi, ut_lo = _hi_lo(u_t, PACKED_SPLIT)
        ut_hi = gl.convert_layout(ut_hi, a_l)
        ut_lo = gl.convert_layout(ut_lo, a_l)

        # (Q S)^T from the old state's pair, then S'^T = e^{G_C} S^T + U~^T K
        mbarrier.wait(bar_q, c & 1)
        q_t = q_smem.permute((1, 0))
        qs = warpgroup_mma(sh_smem, q_t, zero, use_acc=False, is_async=True)
        if SPLIT_QS:
            qs = warpgroup_mma(sl_smem, q_t, qs, is_async=True)
        state = warpgroup_mma(ut_hi, k_cur, state * gl.exp2(last_hi + last_lo), is_async=True)
        state = warpgroup_mma(ut_lo, k_cur, state, is_async=True)
        u_hi, u_lo = _hi_lo(u, PACKED_SPLIT)
        qs, state, ut_hi, ut_lo = warpgroup_mma_wait(num_outstanding=0, deps=(qs, state, ut_hi, ut_lo))
        # the next state's pair over the old one (its readers are done)
        s_hi, s_lo = _hi_lo(state, PACKED_SPLIT)
        gl.thread_barrier()
        sh_smem.store(s_hi)
        sl_smem.store(s_lo)

        # A = Q K^T o L with its gates, its pair over q's tile (o^T's second operand)
        qk = warpgroup_mma(q_smem, k_t, gl.zeros([C, C], gl.float32, acc_l), use_acc=False, is_async=True)
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
        g_hi_c = gh_smem.load(col_l)
        g_lo_c = gls_smem.load(col_l)
        diff = (g_hi[:, None] - g_hi_c[None, :]) + (g_lo[:, None] - g_lo_c[None, :])
        a = qk * gl.exp2(gl.where(rt[:, None] >= ct[None, :], diff, float("-inf")))
        a_hi, a_lo = _hi_lo(a, PACKED_SPLIT)
        gl.thread_barrier()  # q is read by every warp
        a_pair.index(0).store(a_hi)
        a_pair.index(1).store(a_lo)
        fence_async_shared()
        gl.thread_barrier()  # (and the state's pair is in place for the next step)
        u_hi = gl.convert_layout(u_hi, a_l)
        u_lo = gl.convert_layout(u_lo, a_l)
        ah_t = a_pair.index(0).permute((1, 0))
        al_t = a_pair.index(1).permute((1, 0))
        g_hi_c = gh_smem.load(col_l)
        o = warpgroup_mma(u_hi, ah_t, qs * gl.exp2(g_hi_c)[None, :], is_async=True)
        o = warpgroup_mma(u_hi, al_t, o, is_async=True)
        o = warpgroup_mma(u_lo, ah_t, o, is_async=True)
        o, u_hi, u_lo = warpgroup_mma_wait(num_outstanding=0, deps=(o, u_hi, u_lo))
        gl.thread_barrier()  # A's pair is read: q's tile takes the next chunk's q
        _issue(q_desc, row + C, col_k, bar_q, q_smem, more)
        o_out = gl.convert_layout((o * scale).to(o_ptr.dtype.element_ty), out_l)
        ro = gl.arange(0, BV, layout=gl.SliceLayout(1, out_l))
        co = gl.arange(0, C, layout=gl.SliceLayout(0, out_l))
        o_base = o_ptr + b * s_ob + t0 * s_ot + i_h * s_oh + c0
        gl.store(o_base + ro[:, None] + (co * s_ot)[None, :], o_out, mask=(co < n)[None, :])

    mbarrier.invalidate(bar_k.index(0))
    mbarrier.invalidate(bar_k.index(1))
    mbarrier.invalidate(bar_q)
    mbarrier.invalidate(bar_v)
    mbarrier.invalidate(bar_t)
    if STORE_FINAL:
        if is_last != 0:
            gl.store(state_out_ptr + (seq * HV + i_h) * K * V + ck[None, :] * V + cv[:, None], state)


@gluon.jit
def _map_kernel_t(
    k_desc, v_desc, t_desc, gcum_ptr, map_d_ptr, map_m_ptr, part_ptr, warm_ptr, s_cb, s_ct, s_ch, t_total,
    HV: gl.constexpr, GROUP: gl.constexpr, K: gl.constexpr, V: gl.constexpr,
    PACKED_SPLIT: gl.constexpr = True, WARM: gl.constexpr = False, L2NORM: gl.constexpr = False,
    SINGLE: gl.constexpr = 0,
):
    """The map pass on transposed tiles (`TUNING["gluon_map_transposed"]`), as `_output_kernel_t`
    for the output pass: the columns of D (values, zero start) and of M (start I, v = 0) held
    as S^T [BV, K], and per chunk
      (K S)^T = S^T K^T,  X^T = V^T - (K S)^T e^G,  U^T = X^T T_u^T,  S'^T = e^{G_C} S^T + U~^T K.
    Why: `_recurrence_kernel`'s map step stores the pairs of X, U~ and S and waits on a fence and
    a barrier after each (three rounds per step, the step a latency chain: NOTES.md v5.5); here
    X's and U~'s pairs are register operands and only S's pair is stored: one round, and 30%
    less shared-memory traffic (ncu). T_u is double-buffered as k (107 KB, two per SM still fit):
    the next chunk's is fetched a whole step ahead. The same products of the same pairs in the
    same order: bitwise `_recurrence_kernel`'s maps. Grid and arguments as `_recurrence_kernel`
    with MAP (L2NORM: v's tokens times gcum's NORM_K).
    SINGLE (an experiment, as `_recurrence_kernel`'s: NOTES.md v5.16) takes the hi of an fp32
    operand alone: 1 K S, 2 also U~^T K, 3 also X^T T_u^T (every product single; T_u's lo tile is
    still loaded)."""
    C: gl.constexpr = 64
    BV: gl.constexpr = 64
    NVB: gl.constexpr = V // BV
    NCB: gl.constexpr = NVB + K // BV
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, acc_l)
    col_l: gl.constexpr = gl.SliceLayout(0, acc_l)
    s_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BV, K], gl.bfloat16)

    pid = gl.program_id(0)
    i_p = pid // (HV * NCB)
    i_h = (pid // NCB) % HV
    i_v = pid % NCB
    b, t_start, t_end, seq, slot, is_last = _partition_row(part_ptr, i_p)
    i_hk = i_h // GROUP
    is_m = i_v >= NVB  # column blocks past NVB are M's
    has_v = i_v < NVB
    c0 = (i_v - NVB * is_m.to(gl.int32)) * BV
    run_m = is_m
    t_begin = t_start
    if WARM:
        warm = warm_ptr + (i_p * HV + i_h) * 2
        skip = gl.load(warm + 1)
        run_m = is_m & (skip == 0)
        t_begin = gl.where(is_m, gl.where(skip != 0, t_end, t_start), gl.load(warm).to(gl.int64))

    k_smem = gl.allocate_shared_memory(gl.bfloat16, [2, C, K], k_desc.layout)
    v_all = gl.allocate_shared_memory(gl.bfloat16, [1, C, BV], v_desc.layout)
    th_all = gl.allocate_shared_memory(gl.bfloat16, [2, C, C], t_desc.layout)
    tl_all = gl.allocate_shared_memory(gl.bfloat16, [2, C, C], t_desc.layout)
    sh_all = gl.allocate_shared_memory(gl.bfloat16, [1, BV, K], s_sl)
    sl_all = gl.allocate_shared_memory(gl.bfloat16, [1, BV, K], s_sl)
    bar_k = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    bar_v = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bar_t = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(bar_k.index(0), count=1)
    mbarrier.init(bar_k.index(1), count=1)
    mbarrier.init(bar_v, count=1)
    mbarrier.init(bar_t.index(0), count=1)
    mbarrier.init(bar_t.index(1), count=1)

    rv = gl.arange(0, BV, layout=row_l)  # the state's columns: rows of the transposed tiles
    rt = gl.arange(0, C, layout=row_l)  # tokens (the gates' loads, by row)
    ct = gl.arange(0, C, layout=col_l)  # tokens as columns
    ck = gl.arange(0, K, layout=col_l)  # key dimensions as columns (S^T)
    cv = c0 + rv
    state = gl.where(run_m & (cv[:, None] == ck[None, :]), 1.0, 0.0)  # M's columns start from I, D's from 0

    n_chunks = ((t_end - t_begin + C - 1) // C).to(gl.int32)
    row0 = (b * t_total + t_begin).to(gl.int32)
    col_k = (i_hk * K).to(gl.int32)
    col_v = (i_h * V + c0).to(gl.int32)
    col_th = (2 * i_h * C).to(gl.int32)
    col_tl = col_th + C
    if WARM:
        first = n_chunks > 0  # (a row of no chunk: nothing may be left in flight)
    else:
        first = True
    _issue(k_desc, row0, col_k, bar_k.index(0), k_smem.index(0), first)
    _issue(v_desc, row0, col_v, bar_v, v_all.index(0), has_v & first)  # M's columns start from v = 0
    _issue_pair(t_desc, row0, col_th, col_tl, bar_t.index(0), th_all.index(0), tl_all.index(0), first)
    s_hi, s_lo = _hi_lo(state, PACKED_SPLIT)
    sh_all.index(0).store(s_hi)
    sl_all.index(0).store(s_lo)
    fence_async_shared()
    gl.thread_barrier()

    for c in range(n_chunks):
        t0 = t_begin + c * C
        row = row0 + c * C
        more = c + 1 < n_chunks
        buf = c % 2
        zero = gl.zeros([BV, C], gl.float32, acc_l)  # (use_acc=False: never read)
        k_cur = k_smem.index(buf)
        z = c >> 30  # 0, opaque to the compiler: descriptors stay loop-variant (module doc)
        v_smem = v_all.index(z)
        th_smem = th_all.index(buf)
        tl_smem = tl_all.index(buf)
        sh_smem = sh_all.index(z)
        sl_smem = sl_all.index(z)
        # the next chunk's k and T_u into the other buffers (their last readers, the previous step's, are done)
        _issue(k_desc, row + C, col_k, bar_k.index(1 - buf), k_smem.index(1 - buf), more)
        _issue_pair(t_desc, row + C, col_th, col_tl, bar_t.index(1 - buf), th_all.index(1 - buf),
                    tl_all.index(1 - buf), more)
        n = gl.minimum(t_end - t0, C)
        g_hi, g_lo, last_hi, last_lo = _gates(gcum_ptr, b, t0, t_end, i_h, s_cb, s_ct, s_ch, rt, C)

        # (K S)^T from the state's pair (stored by the previous step or the prologue)
        mbarrier.wait(bar_k.index(buf), (c // 2) & 1)
        k_t = k_cur.permute((1, 0))
        ks = warpgroup_mma(sh_smem, k_t, zero, use_acc=False, is_async=True)
        if SINGLE < 1:
            ks = warpgroup_mma(sl_smem, k_t, ks, is_async=True)
        g_hi_c = gl.convert_layout(g_hi, col_l)
        g_lo_c = gl.convert_layout(g_lo, col_l)
        ks = warpgroup_mma_wait(num_outstanding=0, deps=(ks,))

        # X^T = V^T - (K S)^T e^G (V = 0 in M's columns), its pair in registers
        mbarrier.wait(bar_v, c & 1, pred=has_v)
        v = v_smem.permute((1, 0)).load(acc_l).to(gl.float32)
        if L2NORM:
            v = v * _field(gcum_ptr, b, t0, t_end, i_h, s_cb, s_ct, s_ch, ct, NORM_K, C)[None, :]
        v = gl.where(is_m, 0.0, v)  # M's programs never fill v's buffer: a select, its contents unused
        x = v - ks * gl.exp2(g_hi_c)[None, :]
        x_hi, x_lo = _hi_lo(x, PACKED_SPLIT)
        x_hi = gl.convert_layout(x_hi, a_l)
        x_lo = gl.convert_layout(x_lo, a_l)
        gl.thread_barrier()  # every thread has read v (and is past K S: the pair may be rewritten)
        _issue(v_desc, row + C, col_v, bar_v, v_smem, more & has_v)

        # U^T = X^T T_u^T (three products of the pairs)
        mbarrier.wait(bar_t.index(buf), (c // 2) & 1)
        u = warpgroup_mma(x_hi, th_smem.permute((1, 0)), zero, use_acc=False, is_async=True)
        if SINGLE < 3:
            u = warpgroup_mma(x_hi, tl_smem.permute((1, 0)), u, is_async=True)
            u = warpgroup_mma(x_lo, th_smem.permute((1, 0)), u, is_async=True)
        u, x_hi, x_lo = warpgroup_mma_wait(num_outstanding=0, deps=(u, x_hi, x_lo))
        # columns past the chunk's tokens are zero (TMA reads the next sequence's rows there)
        u = gl.where((ct < n)[None, :], u, 0.0)
        u_t = u * gl.exp2((last_hi - g_hi_c) + (last_lo - g_lo_c))[None, :]
        ut_hi, ut_lo = _hi_lo(u_t, PACKED_SPLIT)
        ut_hi = gl.convert_layout(ut_hi, a_l)
        ut_lo = gl.convert_layout(ut_lo, a_l)

        # S'^T = e^{G_C} S^T + U~^T K, its pair over the old one (whose reader, K S, is done)
        state = warpgroup_mma(ut_hi, k_cur, state * gl.exp2(last_hi + last_lo), is_async=True)
        if SINGLE < 2:
            state = warpgroup_mma(ut_lo, k_cur, state, is_async=True)
        state, ut_hi, ut_lo = warpgroup_mma_wait(num_outstanding=0, deps=(state, ut_hi, ut_lo))
        if SINGLE < 1:
            s_hi, s_lo = _hi_lo(state, PACKED_SPLIT)
            sh_smem.store(s_hi)
            sl_smem.store(s_lo)
        else:  # (the prologue's lo tile is never read)
            sh_smem.store(state.to(gl.bfloat16))
        fence_async_shared()
        gl.thread_barrier()  # (the pair is in place, and k's buffer is read: the next step refills it)

    mbarrier.invalidate(bar_k.index(0))
    mbarrier.invalidate(bar_k.index(1))
    mbarrier.invalidate(bar_v)
    mbarrier.invalidate(bar_t.index(0))
    mbarrier.invalidate(bar_t.index(1))
    if is_m:
        gl.store(map_m_ptr + (slot * HV + i_h) * K * K + ck[None, :] * K + cv[:, None], state)
    else:
        gl.store(map_d_ptr + (slot * HV + i_h) * K * V + ck[None, :] * V + cv[:, None], state)


# Two programs per SM (4 warps, 104 KB of shared memory, 255 registers): the partition rule
# fills two slots per SM, as for the Triton output pass.
PROGRAMS_PER_SM = 2


def may_run(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether these kernels cover these inputs (before the layout checks of `supported`), with
    or without the in-kernel L2 norm (folded: module doc)."""
    return (q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0) and q.dtype in HALF
            and q.shape[3] == 128 and v.shape[3] % BLOCK_V == 0)


# The output and map passes at K = 256 (`supported_256`): state column
# blocks of 32 (the state's [256, 32] fp32 tile is 64 registers); one program per SM (output
# pass 156 KB of shared memory, map pass 119 KB), which the partition rule is told
BLOCK_V_256 = 32
PROGRAMS_PER_SM_256 = 1


def may_run_256(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the K = 256 launches cover these inputs (bf16 or fp16; before the layout checks of `supported_256`)."""
    return (q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0) and q.dtype in HALF
            and q.shape[3] == 256 and v.shape[3] % BLOCK_V_256 == 0)


def supported_256(q: torch.Tensor, v: torch.Tensor, rec: dict) -> bool:
    """Whether `output_pass` and `map_pass` (block_v = rec["BV"]) cover the launch `rec` at
    K = 256: bf16 or fp16 on sm_90, T_u as a bf16 pair (from either inverse: the same layouts),
    TMA-readable tiles."""
    return (may_run_256(q, v) and rec["BK"] == 256 and rec["BV"] == BLOCK_V_256
            and (rec["K_EXACT"] or q.dtype == torch.float16) and rec["T_SPLIT"] and rec["TMA"] and rec["TMA_T"])


def supported(q: torch.Tensor, v: torch.Tensor, rec: dict) -> bool:
    """Whether these kernels cover the launch `rec` (chunk.launch_config's recurrence dict, TMA
    already decided) on q's device."""
    # (k is the raw, exact bf16 or fp16 operand with the in-kernel L2 norm too: it is folded)
    return (may_run(q, v) and (rec["K_EXACT"] or q.dtype == torch.float16) and rec["T_SPLIT"] and rec["TMA"]
            and rec["TMA_T"] and rec["BK"] == 128 and rec["BV"] == BLOCK_V)


@functools.lru_cache(maxsize=None)
def _tile_layout(cols: int, dtype: torch.dtype = torch.bfloat16):
    """The shared layout of a bf16 or fp16 [64, cols] tile, as the kernel's products read it
    (building it costs ~10 us of host time: once per width and type)."""
    return gl.NVMMASharedLayout.get_default_for([CHUNK_SIZE, cols], GL_TYPES[dtype])


def descriptor(x: torch.Tensor, cols: int) -> TensorDescriptor:
    """[B, T, heads, D] x (layout checked by chunk._tma_readable) as [B * T, heads * D],
    [64, cols] tiles in the shared layout the kernel's products read."""
    bsz, t_len, heads, d = x.shape
    return TensorDescriptor(x, [bsz * t_len, heads * d], [x.stride(1), 1], [CHUNK_SIZE, cols],
                            _tile_layout(cols, x.dtype))


def descriptors(q, k, v, tinv, block_v: int = BLOCK_V) -> tuple:
    """The four tile descriptors both passes read (q, k, v, T_u's pair), built once per call;
    v's tiles [64, block_v]."""
    dk = q.shape[3]
    return descriptor(q, dk), descriptor(k, dk), descriptor(v, block_v), descriptor(tinv, CHUNK_SIZE)


def map_pass(q, k, v, gcum, tinv, map_d, map_m, maps, num_maps: int, hv: int, group: int,
             packed_split: bool = True, descs=None, warm=None, sites=None, device_index: int = 0,
             transposed: bool = False, l2norm: bool = False, block_v: int = BLOCK_V, single: int = 0):
    """The affine state map (M, D) of each partition in `maps` but the last of a sequence:
    map_d [maps, HV, K, V], map_m [maps, HV, K, K] are written. `descs`: `descriptors(q, k,
    v, tinv)` when the caller has them. `warm`: chunk._warm_start_kernel's table, or None
    (every map in full). `sites`: the call layout's compiled kernels (`launch.launch`).
    `transposed`: `_map_kernel_t` (the same maps, bitwise) instead of `_recurrence_kernel`.
    `l2norm`: the in-kernel L2 norm, folded (gcum's four fields, module doc). `block_v`: the
    state's column block (`_recurrence_kernel` only; `descs` with v's tiles that wide). `single`:
    `_map_kernel_t`'s SINGLE (an experiment: bf16 and transposed only)."""
    dk, dv = q.shape[3], v.shape[3]
    if single and (q.dtype != torch.bfloat16 or not transposed):
        raise ValueError("single products are built for the bf16 transposed map pass only")
    if transposed:
        launch(sites, "map pass", _map_kernel_t, (num_maps * hv * (dv // BLOCK_V + dk // BLOCK_V),), (
            *(descs or descriptors(q, k, v, tinv))[1:], gcum, map_d, map_m, maps, warm, *gcum.stride()[:3],
            q.shape[1]), dict(HV=hv, GROUP=group, K=dk, V=dv, PACKED_SPLIT=packed_split, WARM=warm is not None,
                              L2NORM=l2norm, SINGLE=single, num_warps=NUM_WARPS), device_index)
        return
    launch(sites, "map pass", _recurrence_kernel, (num_maps * hv * (dv // block_v + dk // block_v),), (
        *(descs or descriptors(q, k, v, tinv, block_v)), gcum, None, None, None, map_d, map_m, maps, warm,
        *gcum.stride()[:3], 0, 0, 0, 1.0, q.shape[1], None), dict(
        HV=hv, GROUP=group, K=dk, V=dv, MAP=True, HAS_STATE_IN=False, PARTITIONED=True, STORE_FINAL=False,
        PACKED_SPLIT=packed_split, WARM=warm is not None, L2NORM=l2norm, BV=block_v, num_warps=NUM_WARPS),
        device_index)


def output_pass(q, k, v, gcum, tinv, o, state_in, final, parts, num_parts: int, partitioned: bool, scale: float,
                hv: int, group: int, packed_split: bool = True, descs=None, split_qs: bool = True,
                may_be_empty: bool = False, sites=None, device_index: int = 0, site: str = "output pass",
                transposed: bool = False, o_desc=None, wide_ks: bool = True, l2norm: bool = False,
                q_norms: bool = False, block_v: int = BLOCK_V, single: int = 0):
    """Launch over `num_parts` partitions (rows of `parts`); o and final are written. `block_v`:
    the state's column block (BLOCK_V_256 at K = 256; `descs` and `o_desc` with v's and o's tiles
    that wide). `descs`:
    `descriptors(q, k, v, tinv)` when the caller has them. `may_be_empty`: rows of no chunk
    may come (they store their start state as the final one). `sites`, `site`: the call
    layout's compiled kernels and this launch's name in them (`launch.launch`). `transposed`:
    `_output_kernel_t` instead of `_recurrence_kernel`. `o_desc`: `descriptor(o, BLOCK_V)` to
    store o's full chunks by TMA (`_recurrence_kernel`'s O_TMA), or None. `l2norm`: the in-kernel
    L2 norm, folded (module doc; `_recurrence_kernel` only: the transposed pass, an option that
    is off, does not take it); with `q_norms` this pass sums 1 / |q_t| itself (Q_NORMS), else
    it reads gcum's NORM_Q, which the inverse then writes. `single`: `_recurrence_kernel`'s SINGLE
    (an experiment: bf16, not transposed; it turns the split Q S and the wide K S off)."""
    dk, dv = q.shape[3], v.shape[3]
    if single:
        if q.dtype != torch.bfloat16 or transposed:
            raise ValueError("single products are built for the bf16 output pass only")
        split_qs, wide_ks = False, False
    if transposed and not l2norm:
        launch(sites, site, _output_kernel_t, (num_parts * hv * (dv // BLOCK_V),), (
            *(descs or descriptors(q, k, v, tinv)), gcum, o, state_in, final, parts, *gcum.stride()[:3],
            *o.stride()[:3], scale, q.shape[1]), dict(
            HV=hv, GROUP=group, K=dk, V=dv, HAS_STATE_IN=state_in is not None, PARTITIONED=partitioned,
            STORE_FINAL=final is not None, PACKED_SPLIT=packed_split, SPLIT_QS=split_qs, MAY_BE_EMPTY=may_be_empty,
            num_warps=NUM_WARPS), device_index)
        return
    launch(sites, site, _recurrence_kernel, (num_parts * hv * (dv // block_v),), (
        *(descs or descriptors(q, k, v, tinv, block_v)), gcum, o, state_in, final, None, None, parts, None,
        *gcum.stride()[:3], *o.stride()[:3], scale, q.shape[1], o_desc), dict(
        HV=hv, GROUP=group, K=dk, V=dv, MAP=False, HAS_STATE_IN=state_in is not None, PARTITIONED=partitioned,
        STORE_FINAL=final is not None, PACKED_SPLIT=packed_split, SPLIT_QS=split_qs, MAY_BE_EMPTY=may_be_empty,
        O_TMA=o_desc is not None, WIDE_KS=wide_ks, L2NORM=l2norm, Q_NORMS=l2norm and q_norms, BV=block_v,
        SINGLE=single, num_warps=NUM_WARPS), device_index)
