"""The serving decode step in PyTorch: gating, beta sigmoid, token loop on a state pool."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from .common import run_dense
from .recurrent import recurrent_dense


def sigmoid_gating_delta_rule_update(a_log, a, dt_bias, softplus_beta, softplus_threshold, q, k, v, b,
                                     pool, indices, scale, use_qk_l2norm, cu_seqlens, state_v_first,
                                     intermediate_states):
    """Validated inputs; see `flashdelta.fused_sigmoid_gating_delta_rule_update`. Returns o and
    updates `pool` (and `intermediate_states`) in place."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = -a_log.to(dtype).exp() * F.softplus(a.to(dtype) + dt_bias.to(dtype), beta=softplus_beta,
                                           threshold=softplus_threshold)
    beta = b.to(dtype).sigmoid()
    hv = v.shape[2]
    has_slot = (indices >= 0) & (indices < pool.shape[0])
    slots = indices.clamp(0, pool.shape[0] - 1).long()
    h0 = pool[slots].to(dtype)
    if state_v_first:
        h0 = h0.transpose(-1, -2)
    h0 = torch.where(has_slot[:, None, None, None], h0, torch.zeros_like(h0))
    o, h_final, states = run_dense(partial(recurrent_dense, record_states=True), q, k, v, g, beta, scale, h0,
                                   True, cu_seqlens, use_qk_l2norm)
    states = states.reshape(-1, hv, *states.shape[-2:])  # [B * T or total tokens, HV, K, V]
    if state_v_first:
        h_final, states = h_final.transpose(-1, -2), states.transpose(-1, -2)
    if intermediate_states is not None:
        intermediate_states.copy_(states.to(intermediate_states.dtype))
    keep = has_slot.nonzero().flatten()
    pool.index_copy_(0, slots[keep], h_final[keep].to(pool.dtype))
    return o
