"""The prefill's output pass for Hopper (sm_90) in Gluon: the same chunk step as
`chunk._recurrence_kernel` (MAP = False), with the tile loads and tensor-core products
scheduled by hand.

Why a second kernel: the Triton output pass (NOTES.md, v4.3-v4.5) waits on five TMA loads in
a row per chunk step (one pipeline stage: the next chunk's tiles are not fetched early) and
spills at 255 registers, so it runs at ~25% of the tensor-core rate. Here the next chunk's
tiles are fetched while the current one computes (k double-buffered; q, v and T_u as soon as
their last reader is done), the products are asynchronous wgmma, and every shared buffer is
placed by hand (172 KB: one 8-warp program per SM, its two warpgroups splitting each tile's
columns).

Measured (H100, NOTES.md v4.6): bitwise equal to the Triton pass and no faster (+4 to +10%):
it no longer waits on loads, but still spills at 255 registers (loop-invariant wgmma
descriptors and addresses) and waits on that. Off by default (TUNING["sm90_output_pass"]).

Scope (`supported`): bf16 q, k, v without the in-kernel L2 norm (k, q exact tensor-core
operands), K = 128, V a multiple of 64, T_u as a bf16 hi + lo pair, TMA-readable layouts.
Gluon kernels do not run in the interpreter: CI compiles this one for sm_90 (tests check its
resources); its numbers are tested on the GPU against the Triton kernel and the fp64 oracle.

Per chunk step, for the state column block S [K, BV] (fp32, registers):
  U = T_u (V - e^G (K S)),  o = scale (e^G (Q S) + (Q K^T o L) U),
  S <- e^{G_C} S + K^T (e^{G_C - G} U),
every product with an fp32 operand as bf16 hi + lo products (as the Triton kernel).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

CHUNK_SIZE = 64
BLOCK_V = 64
NUM_WARPS = 8  # two warpgroups, each with 32 of a tile's 64 columns


@gluon.jit
def _hi_lo(x):
    """fp32 x as a bf16 pair hi + lo (~16 bits together)."""
    hi = x.to(gl.bfloat16)
    return hi, (x - hi.to(gl.float32)).to(gl.bfloat16)


@gluon.jit
def _issue(desc, row, col, bar, dst, pred):
    mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [row, col], bar, dst, pred=pred)


@gluon.jit
def _output_pass_kernel(
    q_desc, k_desc, v_desc, t_desc, gcum_ptr, o_ptr, state_in_ptr, state_out_ptr, part_ptr,
    s_cb, s_ct, s_ch, s_ob, s_ot, s_oh, scale, t_total,
    HV: gl.constexpr, GROUP: gl.constexpr, K: gl.constexpr, V: gl.constexpr,
    HAS_STATE_IN: gl.constexpr, PARTITIONED: gl.constexpr, STORE_FINAL: gl.constexpr,
):
    """Grid (partitions, HV, V / 64), 8 warps: the two warpgroups split every tile's 64 columns
    (32 each), so each thread holds half of what one warpgroup would (no spills), and they
    share the chunk's tiles. q/k/v_desc: [B * T, heads * dim] views, tiles [64, K], [64, K],
    [64, 64]; t_desc: T_u as [B * T, 2 HV * 64] (hi of head h at 2h, lo at 2h + 1).
    part_ptr rows: (b, t_start, t_end, seq, slot, is_last) as `chunk._plan`."""
    C: gl.constexpr = 64
    BV: gl.constexpr = 64
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, 32, 16])
    row_l: gl.constexpr = gl.SliceLayout(1, acc_l)
    col_l: gl.constexpr = gl.SliceLayout(0, acc_l)
    s_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([K, BV], gl.bfloat16)
    p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([C, C], gl.bfloat16)

    i_p = gl.program_id(0)
    i_h = gl.program_id(1)
    i_v = gl.program_id(2)
    prow = part_ptr + i_p * 6
    b = gl.load(prow).to(gl.int64)
    t_start = gl.load(prow + 1).to(gl.int64)
    t_end = gl.load(prow + 2).to(gl.int64)
    seq = gl.load(prow + 3).to(gl.int64)
    slot = gl.load(prow + 4).to(gl.int64)
    is_last = gl.load(prow + 5)
    i_hk = i_h // GROUP
    c0 = i_v * BV

    # shared memory: k twice (the next chunk's is fetched during this one), q, v, T_u hi / lo
    # once (the next chunk's fetched as soon as their last reader is done); the bf16 pairs of
    # S, X, U, U~ and A = Q K^T o L, the operands of the split products
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [2, C, K], k_desc.layout)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [C, K], q_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [C, BV], v_desc.layout)
    th_smem = gl.allocate_shared_memory(gl.bfloat16, [C, C], t_desc.layout)
    tl_smem = gl.allocate_shared_memory(gl.bfloat16, [C, C], t_desc.layout)
    s_smem = gl.allocate_shared_memory(gl.bfloat16, [2, K, BV], s_sl)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [2, C, BV], p_sl)
    u_smem = gl.allocate_shared_memory(gl.bfloat16, [2, C, BV], p_sl)
    ut_smem = gl.allocate_shared_memory(gl.bfloat16, [2, C, BV], p_sl)
    a_smem = gl.allocate_shared_memory(gl.bfloat16, [2, C, C], p_sl)
    bar_k = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    bar_q = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bar_v = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bar_t = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar_k.index(0), count=1)
    mbarrier.init(bar_k.index(1), count=1)
    mbarrier.init(bar_q, count=1)
    mbarrier.init(bar_v, count=1)
    mbarrier.init(bar_t, count=1)

    rk = gl.arange(0, K, layout=row_l)
    rt = gl.arange(0, C, layout=row_l)
    ct = gl.arange(0, C, layout=col_l)
    if HAS_STATE_IN:
        if PARTITIONED:
            src = slot
        else:
            src = seq
        state = gl.load(state_in_ptr + (src * HV + i_h) * K * V + rk[:, None] * V + (c0 + ct)[None, :])
    else:
        state = gl.zeros([K, BV], gl.float32, acc_l)

    n_chunks = ((t_end - t_start + C - 1) // C).to(gl.int32)
    row0 = (b * t_total + t_start).to(gl.int32)
    col_k = (i_hk * K).to(gl.int32)
    col_v = (i_h * V + c0).to(gl.int32)
    col_th = (2 * i_h * C).to(gl.int32)
    col_tl = col_th + C
    _issue(k_desc, row0, col_k, bar_k.index(0), k_smem.index(0), True)
    _issue(q_desc, row0, col_k, bar_q, q_smem, True)
    _issue(v_desc, row0, col_v, bar_v, v_smem, True)
    mbarrier.expect(bar_t, 2 * t_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(t_desc, [row0, col_th], bar_t, th_smem)
    tma.async_copy_global_to_shared(t_desc, [row0, col_tl], bar_t, tl_smem)

    for c in range(n_chunks):
        t0 = t_start + c * C
        row = row0 + c * C
        more = c + 1 < n_chunks
        buf = c % 2
        k_cur = k_smem.index(buf)
        zero = gl.zeros([C, BV], gl.float32, acc_l)  # (use_acc=False: never read)
        # the next chunk's k into the other buffer (its last reader, the previous step, is done)
        _issue(k_desc, row + C, col_k, bar_k.index(1 - buf), k_smem.index(1 - buf), more)
        n = gl.minimum(t_end - t0, C)
        c_row = gcum_ptr + b * s_cb + t0 * s_ct + i_h * s_ch
        g_hi = gl.load(c_row + rt * s_ct, mask=rt < n, other=0.0)
        g_lo = gl.load(c_row + rt * s_ct + 1, mask=rt < n, other=0.0)
        last_hi = gl.load(c_row + (n - 1) * s_ct)
        last_lo = gl.load(c_row + (n - 1) * s_ct + 1)

        # K S and Q S from the state's bf16 pair (k, q exact in bf16: two products each)
        s_hi, s_lo = _hi_lo(state)
        s_smem.index(0).store(s_hi)
        s_smem.index(1).store(s_lo)
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.wait(bar_k.index(buf), (c // 2) & 1)
        mbarrier.wait(bar_q, c & 1)
        ks = warpgroup_mma(k_cur, s_smem.index(0), zero, use_acc=False, is_async=True)
        ks = warpgroup_mma(k_cur, s_smem.index(1), ks, is_async=True)
        qs = warpgroup_mma(q_smem, s_smem.index(0), zero, use_acc=False, is_async=True)
        qs = warpgroup_mma(q_smem, s_smem.index(1), qs, is_async=True)
        ks = warpgroup_mma_wait(num_outstanding=2, deps=(ks,))

        # X = V - e^G (K S) (Q S still in flight); the next v is fetched once all have read v
        mbarrier.wait(bar_v, c & 1)
        v = v_smem.load(acc_l).to(gl.float32)
        x = v - gl.exp(g_hi)[:, None] * ks
        x_hi, x_lo = _hi_lo(x)
        x_smem.index(0).store(x_hi)
        x_smem.index(1).store(x_lo)
        fence_async_shared()
        gl.thread_barrier()
        _issue(v_desc, row + C, col_v, bar_v, v_smem, more)

        # U = T_u X (three products of the pairs), then Q K^T
        mbarrier.wait(bar_t, c & 1)
        u = warpgroup_mma(th_smem, x_smem.index(0), zero, use_acc=False, is_async=True)
        u = warpgroup_mma(tl_smem, x_smem.index(0), u, is_async=True)
        u = warpgroup_mma(th_smem, x_smem.index(1), u, is_async=True)
        qk = warpgroup_mma(q_smem, k_cur.permute((1, 0)), zero, use_acc=False, is_async=True)
        qs, u = warpgroup_mma_wait(num_outstanding=1, deps=(qs, u))
        gl.thread_barrier()  # T_u is read: fetch the next chunk's
        mbarrier.expect(bar_t, 2 * t_desc.block_type.nbytes, pred=more)
        tma.async_copy_global_to_shared(t_desc, [row + C, col_th], bar_t, th_smem, pred=more)
        tma.async_copy_global_to_shared(t_desc, [row + C, col_tl], bar_t, tl_smem, pred=more)
        # rows past the chunk's tokens are zero (TMA reads the next sequence's rows there)
        u = gl.where((rt < n)[:, None], u, 0.0)
        u_hi, u_lo = _hi_lo(u)
        u_smem.index(0).store(u_hi)
        u_smem.index(1).store(u_lo)
        u_t = u * gl.exp((last_hi - g_hi) + (last_lo - g_lo))[:, None]  # e^{G_C - G} U
        ut_hi, ut_lo = _hi_lo(u_t)
        ut_smem.index(0).store(ut_hi)
        ut_smem.index(1).store(ut_lo)

        # A = Q K^T o L, its decay from the hi + lo prefix sums (exact where they cancel)
        g_hi_c = gl.load(c_row + ct * s_ct, mask=ct < n, other=0.0)
        g_lo_c = gl.load(c_row + ct * s_ct + 1, mask=ct < n, other=0.0)
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
        diff = (g_hi[:, None] - g_hi_c[None, :]) + (g_lo[:, None] - g_lo_c[None, :])
        a = qk * gl.exp(gl.where(rt[:, None] >= ct[None, :], diff, float("-inf")))
        a_hi, a_lo = _hi_lo(a)
        a_smem.index(0).store(a_hi)
        a_smem.index(1).store(a_lo)
        fence_async_shared()
        gl.thread_barrier()
        _issue(q_desc, row + C, col_k, bar_q, q_smem, more)  # q is read: fetch the next chunk's

        # o = scale (e^G (Q S) + A U);  S <- e^{G_C} S + K^T U~
        o = warpgroup_mma(a_smem.index(0), u_smem.index(0), qs * gl.exp(g_hi)[:, None], is_async=True)
        o = warpgroup_mma(a_smem.index(1), u_smem.index(0), o, is_async=True)
        o = warpgroup_mma(a_smem.index(0), u_smem.index(1), o, is_async=True)
        k_t = k_cur.permute((1, 0))
        state = warpgroup_mma(k_t, ut_smem.index(0), state * gl.exp(last_hi + last_lo), is_async=True)
        state = warpgroup_mma(k_t, ut_smem.index(1), state, is_async=True)
        o = warpgroup_mma_wait(num_outstanding=2, deps=(o,))
        o_base = o_ptr + b * s_ob + t0 * s_ot + i_h * s_oh + c0
        gl.store(o_base + (rt * s_ot)[:, None] + ct[None, :], (o * scale).to(o_ptr.dtype.element_ty),
                 mask=(rt < n)[:, None])
        state = warpgroup_mma_wait(num_outstanding=0, deps=(state,))
        gl.thread_barrier()  # every operand of this step is read: the next step overwrites them

    mbarrier.invalidate(bar_k.index(0))
    mbarrier.invalidate(bar_k.index(1))
    mbarrier.invalidate(bar_q)
    mbarrier.invalidate(bar_v)
    mbarrier.invalidate(bar_t)
    if STORE_FINAL:
        if is_last != 0:
            gl.store(state_out_ptr + (seq * HV + i_h) * K * V + rk[:, None] * V + (c0 + ct)[None, :], state)


# One program per SM (8 warps, 168 KB of shared memory): the partition rule fills SMs, not
# two slots each as for the Triton output pass.
PROGRAMS_PER_SM = 1


def may_run(q: torch.Tensor, v: torch.Tensor, use_qk_l2norm: bool) -> bool:
    """Whether this kernel covers these inputs (before the layout checks of `supported`)."""
    return (q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0) and q.dtype == torch.bfloat16
            and not use_qk_l2norm and q.shape[3] == 128 and v.shape[3] % BLOCK_V == 0)


def supported(q: torch.Tensor, v: torch.Tensor, rec: dict) -> bool:
    """Whether this kernel covers the launch `rec` (chunk.launch_config's recurrence dict, TMA
    already decided) on q's device."""
    return (may_run(q, v, rec["L2NORM"]) and rec["K_EXACT"] and rec["T_SPLIT"] and rec["TMA"] and rec["TMA_T"]
            and rec["BK"] == 128 and rec["BV"] == BLOCK_V)


def descriptor(x: torch.Tensor, cols: int) -> TensorDescriptor:
    """[B, T, heads, D] x (layout checked by chunk._tma_view) as [B * T, heads * D], [64, cols]
    tiles in the shared layout the kernel's products read."""
    bsz, t_len, heads, d = x.shape
    layout = gl.NVMMASharedLayout.get_default_for([CHUNK_SIZE, cols], gl.bfloat16)
    return TensorDescriptor(x, [bsz * t_len, heads * d], [x.stride(1), 1], [CHUNK_SIZE, cols], layout)


def output_pass(q, k, v, gcum, tinv, o, state_in, final, parts, num_parts: int, partitioned: bool, scale: float,
                hv: int, group: int):
    """Launch over `num_parts` partitions (rows of `parts`); o and final are written."""
    dk, dv = q.shape[3], v.shape[3]
    _output_pass_kernel[(num_parts, hv, dv // BLOCK_V)](
        descriptor(q, dk), descriptor(k, dk), descriptor(v, BLOCK_V), descriptor(tinv, CHUNK_SIZE), gcum, o,
        state_in, final, parts, *gcum.stride()[:3], *o.stride()[:3], scale, q.shape[1],
        HV=hv, GROUP=group, K=dk, V=dv, HAS_STATE_IN=state_in is not None, PARTITIONED=partitioned,
        STORE_FINAL=final is not None, num_warps=NUM_WARPS,
    )
