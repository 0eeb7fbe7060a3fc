"""Chunked gated delta rule in PyTorch (the math of shared/design/gdn-math.md).

All intra-chunk work (gate cumsums, the two C x C score matrices, the triangular
solve for W and U') is vectorised over batch, heads and chunks; only the state
recurrence loops over chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import expand_heads, run_dense

CHUNK_SIZE = 64


def _to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[N, T, HV, ...] (T a multiple of chunk_size) -> [N, HV, T/C, C, ...]."""
    n, t_len, hv = x.shape[:3]
    rest = tuple(x.shape[3:])
    x = x.reshape((n, t_len // chunk_size, chunk_size, hv) + rest)
    return x.movedim(3, 1)


def chunk_dense(q, k, v, g, beta, scale, h0, chunk_size: int = CHUNK_SIZE):
    """Dense batch, inputs already in the compute dtype.

    q, k [N, T, H, K]; v [N, T, HV, V]; g, beta [N, T, HV]; h0 [N, HV, K, V] or None.
    Returns o [N, T, HV, V] and the final state [N, HV, K, V].
    """
    n, t_len, _, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    q, k = expand_heads(q, hv), expand_heads(k, hv)
    pad = (-t_len) % chunk_size
    if pad:
        # Padded tokens have beta = k = v = g = 0: they leave the state unchanged.
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    q, k, v = (_to_chunks(x, chunk_size) for x in (q, k, v))  # [N, HV, NC, C, D]
    g, beta = (_to_chunks(x, chunk_size) for x in (g, beta))  # [N, HV, NC, C]
    num_chunks = q.shape[2]

    # G_i within the chunk, and its differences, in float64: under strong decay |G| ~ 1e3 and
    # G_C - G_j, G_i - G_j are small differences of large numbers (fp32 loses recent tokens).
    gate64 = g.double().cumsum(-1)
    gate = gate64.to(g.dtype)
    idx = torch.arange(chunk_size, device=q.device)
    causal = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    # exp(G_i - G_j) only where j <= i, so every exponent is <= 0 (never exp(-G)).
    diff = (gate64[..., :, None] - gate64[..., None, :]).to(g.dtype)
    decay = diff.masked_fill(~causal, float("-inf")).exp()

    a_kk = (k @ k.transpose(-1, -2)) * decay * beta[..., :, None]
    a_kk = a_kk.masked_fill(~strict, 0.0)
    a_qk = (q @ k.transpose(-1, -2)) * decay  # already zero above the diagonal

    # (I + A) [W | U'] = [diag(beta e^G) K | diag(beta) V], by forward substitution.
    rhs = torch.cat([k * (beta * gate.exp())[..., None], v * beta[..., None]], dim=-1)
    sol = torch.linalg.solve_triangular(a_kk, rhs, upper=False, unitriangular=True)
    w, u_prime = sol[..., :dk], sol[..., dk:]

    gate_last = gate[..., -1]  # G_C per chunk
    k_tilde = k * (gate64[..., -1:] - gate64).to(g.dtype).exp()[..., None]  # exp(G_C - G_j) <= 1
    q_gated = q * gate.exp()[..., None]

    state = q.new_zeros(n, hv, dk, dv) if h0 is None else h0
    o = q.new_empty(n, hv, num_chunks, chunk_size, dv)
    for c in range(num_chunks):
        u = u_prime[:, :, c] - w[:, :, c] @ state
        o[:, :, c] = scale * (q_gated[:, :, c] @ state + a_qk[:, :, c] @ u)
        state = gate_last[:, :, c].exp()[..., None, None] * state + k_tilde[:, :, c].transpose(-1, -2) @ u
    o = o.reshape(n, hv, num_chunks * chunk_size, dv)[:, :, :t_len].transpose(1, 2)
    return o, state


def chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm=False, seq_offsets=None, chunk_size: int = CHUNK_SIZE):
    """Validated inputs in the public layout; see `flashdelta.chunk_gated_delta_rule`."""
    return run_dense(chunk_dense, q, k, v, g, beta, scale, initial_state, output_final_state,
                     cu_seqlens, use_qk_l2norm, seq_offsets, chunk_size=chunk_size)
