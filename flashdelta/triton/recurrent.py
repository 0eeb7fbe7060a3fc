"""Token-by-token gated delta rule in Triton: one program per (sequence, value head, column
block) keeps its [K, BV] fp32 state in registers across the sequence's tokens."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, interpreting, next_power_of_2
from .launch import call_sites, launch


@triton.jit
def delta_step(state, q, k, v, g, beta, scale, L2NORM: tl.constexpr):
    """One token on a [K, BV] fp32 state: decay, delta-rule update, output. q, k [K]; v [BV]."""
    if L2NORM:
        q = q * tl.rsqrt(tl.sum(q * q, 0) + 1e-6)
        k = k * tl.rsqrt(tl.sum(k * k, 0) + 1e-6)
    state = state * tl.exp(g)
    u = beta * (v - tl.sum(state * k[:, None], 0))  # beta (v - S^T k)
    state = state + k[:, None] * u[None, :]
    o = tl.sum(state * q[:, None], 0) * scale
    return state, o


@triton.jit
def sequence_bounds(cu_ptr, i_n, T, VARLEN: tl.constexpr):
    """(batch row, first token, end token) of sequence i_n: row 0 and cu_seqlens[i_n],
    cu_seqlens[i_n + 1] for varlen; else row i_n and tokens 0 .. T."""
    if VARLEN:
        b = 0
        t_start = tl.load(cu_ptr + i_n).to(tl.int64)
        t_end = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    else:
        b = i_n
        t_start = 0
        t_end = T
    return b, t_start, t_end


@triton.jit
def load_token(q_p, k_p, v_p, x_p, y_p, t, valid, s_qt, s_kt, s_vt, s_xt, s_yt, kmask, vmask):
    """Token t's q, k [BK], v [BV] in fp32 and its two per-token scalars x, y (g and beta, or
    the raw gates a and b); zeros where not `valid`. The loops below issue these loads one
    token ahead, so a chain of tokens waits on memory once, not once per token."""
    q = tl.load(q_p + t * s_qt, mask=kmask & valid, other=0.0).to(tl.float32)
    k = tl.load(k_p + t * s_kt, mask=kmask & valid, other=0.0).to(tl.float32)
    v = tl.load(v_p + t * s_vt, mask=vmask & valid, other=0.0).to(tl.float32)
    x = tl.load(x_p + t * s_xt, mask=valid, other=0.0).to(tl.float32)
    y = tl.load(y_p + t * s_yt, mask=valid, other=0.0).to(tl.float32)
    return q, k, v, x, y


@triton.jit
def _token_step(state, token, o_p, scale, vmask, L2NORM: tl.constexpr):
    """One step of loaded token (q, k, v, g, beta); stores its output at o_p."""
    q, k, v, g, beta = token
    state, o = delta_step(state, q, k, v, g, beta, scale, L2NORM)
    tl.store(o_p, o.to(o_p.dtype.element_ty), mask=vmask)
    return state


@triton.jit
def _recurrent_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, h0_ptr, ht_ptr, seq_ptr,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_vb, s_vt, s_vh, s_vd,
    s_gb, s_gt, s_gh, s_bb, s_bt, s_bh, s_ob, s_ot, s_oh,
    scale, T,
    HV: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    VARLEN: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, L2NORM: tl.constexpr,
    WHILE_LOOPS: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    b, t_start, t_end = sequence_bounds(seq_ptr, i_n, T, VARLEN)
    i_hk = i_h // GROUP
    rk = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    kmask = rk < K
    vmask = cv < V
    smask = kmask[:, None] & vmask[None, :]
    soff = (i_n * HV + i_h) * K * V + rk[:, None] * V + cv[None, :]
    q_p = q_ptr + b * s_qb + i_hk * s_qh + rk * s_qd
    k_p = k_ptr + b * s_kb + i_hk * s_kh + rk * s_kd
    v_p = v_ptr + b * s_vb + i_h * s_vh + cv * s_vd
    g_p = g_ptr + b * s_gb + i_h * s_gh
    be_p = beta_ptr + b * s_bb + i_h * s_bh
    o_p = o_ptr + b * s_ob + i_h * s_oh + cv
    cur = load_token(q_p, k_p, v_p, g_p, be_p, t_start, t_start < t_end, s_qt, s_kt, s_vt, s_gt, s_bt, kmask, vmask)
    if HAS_H0:
        state = tl.load(h0_ptr + soff, mask=smask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BK, BV), tl.float32)
    if WHILE_LOOPS:  # the interpreter cannot take loaded loop bounds in range()
        t = t_start
        while t < t_end:
            nxt = load_token(q_p, k_p, v_p, g_p, be_p, t + 1, t + 1 < t_end, s_qt, s_kt, s_vt, s_gt, s_bt, kmask,
                             vmask)
            state = _token_step(state, cur, o_p + t * s_ot, scale, vmask, L2NORM)
            cur = nxt
            t += 1
    else:
        for t in range(t_start, t_end):
            nxt = load_token(q_p, k_p, v_p, g_p, be_p, t + 1, t + 1 < t_end, s_qt, s_kt, s_vt, s_gt, s_bt, kmask,
                             vmask)
            state = _token_step(state, cur, o_p + t * s_ot, scale, vmask, L2NORM)
            cur = nxt
    if STORE_FINAL:
        tl.store(ht_ptr + soff, state, mask=smask)


# fast_launch: a repeated call layout launches its compiled kernel directly (launch.py); False:
# through Triton every time (A/B checks)
TUNING = {"fast_launch": True}


def launch_config(dk: int, dv: int) -> dict:
    """Block sizes and warps of the token-loop kernel (also compiled offline by the tests)."""
    bk = max(16, next_power_of_2(dk))
    bv = max(16, min(next_power_of_2(dv), 32 if bk <= 128 else 16))
    return dict(BK=bk, BV=bv, num_warps=4)


def fused_recurrent_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                                         cu_seqlens=None, use_qk_l2norm=False, out=None, final_state_out=None):
    """Validated inputs in the public layout. Returns (o [B, T, HV, V], final state or None)."""
    bsz, t_len, h, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    num_seqs = bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    o = out if out is not None else torch.empty(bsz, t_len, hv, dv, dtype=q.dtype, device=q.device)
    final = None
    if output_final_state:
        final = final_state_out if final_state_out is not None else torch.empty(
            num_seqs, hv, dk, dv, dtype=torch.float32, device=q.device)
    if num_seqs == 0:
        return o, final
    cfg = launch_config(dk, dv)
    h0 = initial_state.contiguous() if initial_state is not None else None
    grid = (num_seqs, hv, cdiv(dv, cfg["BV"]))
    sites, device_index = call_sites(TUNING["fast_launch"], q.device, (q, k, v, g, beta, o, h0, final, cu_seqlens),
                                     "recurrent", bool(use_qk_l2norm))
    launch(sites, "token loop", _recurrent_kernel, grid, (
        q, k, v, g, beta, o, h0, final, cu_seqlens,
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *beta.stride(), *o.stride()[:3],
        float(scale), t_len), dict(
        HV=hv, GROUP=hv // h, K=dk, V=dv, VARLEN=cu_seqlens is not None,
        HAS_H0=h0 is not None, STORE_FINAL=final is not None, L2NORM=use_qk_l2norm,
        WHILE_LOOPS=interpreting(), **cfg), device_index)
    return o, final
