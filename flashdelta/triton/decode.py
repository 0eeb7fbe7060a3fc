"""Serving decode step in Triton: gating, beta sigmoid, q/k L2 norm and the delta-rule update
fused, on a state pool updated in place by slot index, several tokens per sequence.

One program per (sequence, value head, column block): it reads the sequence's state from
`pool[indices[n]]` once, steps through the sequence's tokens with the state in registers,
and writes it back once (a negative or out-of-range index: zero start, no write back).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import cdiv, interpreting, next_power_of_2, sm_count
from .launch import call_sites, launch
from .recurrent import delta_step, load_token, sequence_bounds


@triton.jit
def _softplus(x, beta, threshold):
    """torch.nn.functional.softplus(x, beta, threshold)."""
    bx = beta * x
    return tl.where(bx <= threshold, tl.log(1.0 + tl.exp(tl.minimum(bx, threshold))) / beta, x)


@triton.jit
def _decode_step(state, token, o_p, neg_a, dt_bias, softplus_beta, softplus_threshold, scale, vmask,
                 L2NORM: tl.constexpr):
    """Gates from the raw a, b, then one delta-rule step; stores the token's output at o_p."""
    q, k, v, a, b = token
    g = neg_a * _softplus(a + dt_bias, softplus_beta, softplus_threshold)  # -exp(A_log) softplus(a + dt_bias)
    beta = tl.sigmoid(b)
    state, o = delta_step(state, q, k, v, g, beta, scale, L2NORM)
    tl.store(o_p, o.to(o_p.dtype.element_ty), mask=vmask)
    return state


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, a_log_ptr, dt_bias_ptr, o_ptr, pool_ptr, idx_ptr, inter_ptr, cu_ptr,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd,
    s_ab, s_at, s_ah, s_bb, s_bt, s_bh, s_ob, s_ot, s_oh,
    s_ps, s_ph, s_pk, s_pv, s_it, s_ih, s_ik, s_iv,
    scale, softplus_beta, softplus_threshold, T, num_slots,
    GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    VARLEN: tl.constexpr, L2NORM: tl.constexpr, STORE_INTER: tl.constexpr, WHILE_LOOPS: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    b, t_start, t_end = sequence_bounds(cu_ptr, i_n, T, VARLEN)
    tok0 = t_start if VARLEN else i_n * T  # global index of the first token (intermediate states)
    i_hk = i_h // GROUP
    rk = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    kmask = rk < K
    vmask = cv < V
    smask = kmask[:, None] & vmask[None, :]
    slot = tl.load(idx_ptr + i_n).to(tl.int64)
    has_slot = (slot >= 0) & (slot < num_slots)  # else: zero start, no write back (never out of bounds)
    soff = rk[:, None] * s_pk + cv[None, :] * s_pv
    p_state = pool_ptr + tl.where(has_slot, slot, 0) * s_ps + i_h * s_ph + soff
    neg_a = -tl.exp(tl.load(a_log_ptr + i_h).to(tl.float32))
    dt_bias = tl.load(dt_bias_ptr + i_h).to(tl.float32)

    q_p = q_ptr + b * s_qb + i_hk * s_qh + rk * s_qd
    k_p = k_ptr + b * s_kb + i_hk * s_kh + rk * s_kd
    v_p = v_ptr + b * s_vb + i_h * s_vh + cv * s_vd
    a_p = a_ptr + b * s_ab + i_h * s_ah
    b_p = b_ptr + b * s_bb + i_h * s_bh
    o_p = o_ptr + b * s_ob + i_h * s_oh + cv
    i_p = inter_ptr + (tok0 - t_start) * s_it + i_h * s_ih + rk[:, None] * s_ik + cv[None, :] * s_iv
    # the first token's loads go out before the state's; the loop loads one token ahead
    cur = load_token(q_p, k_p, v_p, a_p, b_p, t_start, t_start < t_end, s_qt, s_kt, s_vt, s_at, s_bt, kmask, vmask)
    state = tl.load(p_state, mask=smask & has_slot, other=0.0).to(tl.float32)
    if WHILE_LOOPS:  # the interpreter cannot take loaded loop bounds in range()
        t = t_start
        while t < t_end:
            nxt = load_token(q_p, k_p, v_p, a_p, b_p, t + 1, t + 1 < t_end, s_qt, s_kt, s_vt, s_at, s_bt, kmask,
                             vmask)
            state = _decode_step(state, cur, o_p + t * s_ot, neg_a, dt_bias, softplus_beta, softplus_threshold,
                                 scale, vmask, L2NORM)
            if STORE_INTER:
                tl.store(i_p + t * s_it, state.to(inter_ptr.dtype.element_ty), mask=smask)
            cur = nxt
            t += 1
    else:
        for t in range(t_start, t_end):
            nxt = load_token(q_p, k_p, v_p, a_p, b_p, t + 1, t + 1 < t_end, s_qt, s_kt, s_vt, s_at, s_bt, kmask,
                             vmask)
            state = _decode_step(state, cur, o_p + t * s_ot, neg_a, dt_bias, softplus_beta, softplus_threshold,
                                 scale, vmask, L2NORM)
            if STORE_INTER:
                tl.store(i_p + t * s_it, state.to(inter_ptr.dtype.element_ty), mask=smask)
            cur = nxt
    tl.store(p_state, state.to(pool_ptr.dtype.element_ty), mask=smask & has_slot)


# Launch choices, measured on the GPU (benchmarks/decode_variants.py, NOTES.md); None: the
# rule in `launch_config`.
# fast_launch: a repeated call layout launches its compiled kernel directly (launch.py); False:
# through Triton every time (A/B checks)
TUNING = {"block_v": None, "num_warps": None, "maxnreg": None, "fast_launch": True}


def launch_config(dk: int, dv: int, num_seqs: int = 0, hv: int = 0, sms: int = 0) -> dict:
    """Memory-bound: each program streams a [K, BV] slab of its state in and out once.
    K = V = 128: BV = 64 with 4 warps (H100, graph: 8% faster than 8 warps at batch 256, the
    same at batch 1; smaller BV is slower from batch 16 on); BV = 32 where the BV 64 grid
    (num_seqs x hv x V / 64 programs) would leave SMs idle: batch 1 kernel 5.8 -> 5.3 us
    (ncu), batch 16 the same either way (NOTES.md). A fresh dict per call (cached rule)."""
    small = 0 < num_seqs * hv * cdiv(dv, 64) <= sms
    return dict(_launch_config(dk, dv, small, TUNING["block_v"], TUNING["num_warps"], TUNING["maxnreg"],
                               interpreting()))


@functools.lru_cache(maxsize=64)  # the host path of a decode step is part of its latency
def _launch_config(dk, dv, small, block_v, num_warps, maxnreg, interpret) -> dict:
    bk = max(16, next_power_of_2(dk))
    bv = block_v or (32 if small or bk > 128 else 64)
    bv = max(8, min(bv, next_power_of_2(dv)))
    cfg = dict(BK=bk, BV=bv, num_warps=num_warps or 4)
    if maxnreg and not interpret:  # a register cap: a CUDA launch option only
        cfg["maxnreg"] = maxnreg
    return cfg


def sigmoid_gating_delta_rule_update(a_log, a, dt_bias, softplus_beta, softplus_threshold, q, k, v, b,
                                     pool, indices, scale, use_qk_l2norm, cu_seqlens, state_v_first,
                                     intermediate_states, out=None):
    """Validated inputs; see `flashdelta.fused_sigmoid_gating_delta_rule_update`. Returns o."""
    bsz, t_len, h, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    num_seqs = bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    o = out if out is not None else torch.empty(bsz, t_len, hv, dv, dtype=q.dtype, device=q.device)
    if num_seqs == 0 or t_len == 0:
        return o
    sms = sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
        if q.is_cuda else 0
    cfg = launch_config(dk, dv, num_seqs, hv, sms)
    # pool [slots, HV, K, V], or [slots, HV, V, K] when state_v_first: element (k, v) by strides
    s_ps, s_ph = pool.stride(0), pool.stride(1)
    s_pk, s_pv = (pool.stride(3), pool.stride(2)) if state_v_first else (pool.stride(2), pool.stride(3))
    if intermediate_states is not None:
        inter = intermediate_states
        s_it, s_ih = inter.stride(0), inter.stride(1)
        s_ik, s_iv = (inter.stride(3), inter.stride(2)) if state_v_first else (inter.stride(2), inter.stride(3))
    else:
        inter, s_it, s_ih, s_ik, s_iv = pool, 0, 0, 0, 0  # never written: STORE_INTER is off
    grid = (num_seqs, hv, cdiv(dv, cfg["BV"]))
    sites, device_index = call_sites(TUNING["fast_launch"], q.device, (q, k, v, a, b, a_log, dt_bias, o, pool, indices,
                                                                      intermediate_states, cu_seqlens),
                                     "decode", bool(use_qk_l2norm), bool(state_v_first), tuple(cfg.items()))
    launch(sites, "decode", _decode_kernel, grid, (
        q, k, v, a, b, a_log, dt_bias, o, pool, indices, inter, cu_seqlens,
        *q.stride(), *k.stride(), *v.stride(), *a.stride(), *b.stride(), *o.stride()[:3],
        s_ps, s_ph, s_pk, s_pv, s_it, s_ih, s_ik, s_iv,
        float(scale), float(softplus_beta), float(softplus_threshold), t_len, pool.shape[0]), dict(
        GROUP=hv // h, K=dk, V=dv, VARLEN=cu_seqlens is not None, L2NORM=use_qk_l2norm,
        STORE_INTER=intermediate_states is not None, WHILE_LOOPS=interpreting(), **cfg), device_index)
    return o
