"""Token-by-token gated delta rule in PyTorch: the definition, and (in float64) the test oracle."""

from __future__ import annotations

import torch

from .common import expand_heads, run_dense


def recurrent_dense(q, k, v, g, beta, scale, h0, record_states: bool = False):
    """One step per token, dense batch, in the inputs' dtype.

    q, k [N, T, H, K]; v [N, T, HV, V]; g, beta [N, T, HV]; h0 [N, HV, K, V] or None.
    Returns o [N, T, HV, V] and the final state [N, HV, K, V]; with `record_states`, also the
    state after every token [N, T, HV, K, V].
    """
    n, t_len, _, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    q, k = expand_heads(q, hv), expand_heads(k, hv)
    state = q.new_zeros(n, hv, dk, dv) if h0 is None else h0
    o = q.new_empty(n, t_len, hv, dv)
    states = q.new_empty(n, t_len, hv, dk, dv) if record_states else None
    for t in range(t_len):
        state = state * g[:, t].exp()[..., None, None]
        k_t = k[:, t]
        # u_t = beta_t (v_t - S^T k_t); S += k_t u_t^T
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("nhkv,nhk->nhv", state, k_t))
        state = state + k_t[..., :, None] * u[..., None, :]
        o[:, t] = scale * torch.einsum("nhkv,nhk->nhv", state, q[:, t])
        if record_states:
            states[:, t] = state
    return (o, state, states) if record_states else (o, state)


def recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                               cu_seqlens=None, use_qk_l2norm=False, seq_offsets=None):
    """Validated inputs in the public layout; see `flashdelta.fused_recurrent_gated_delta_rule`."""
    return run_dense(recurrent_dense, q, k, v, g, beta, scale, initial_state, output_final_state,
                     cu_seqlens, use_qk_l2norm, seq_offsets)
