"""Triton kernels: NVIDIA GPUs, and the CPU through TRITON_INTERPRET=1 (how CI tests them)."""

import triton  # noqa: F401  -- an ImportError here tells the registry the backend is unavailable

from .chunk import chunk_gated_delta_rule_fwd
from .recurrent import fused_recurrent_gated_delta_rule_fwd

IMPLEMENTED = True


def chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm=False, seq_offsets=None):
    return chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state,
                                      cu_seqlens, use_qk_l2norm, seq_offsets=seq_offsets)


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                                     cu_seqlens=None, use_qk_l2norm=False, seq_offsets=None):
    # the kernel reads cu_seqlens on the device: no host copy needed
    return fused_recurrent_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state,
                                                cu_seqlens, use_qk_l2norm)
