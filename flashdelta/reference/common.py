"""Helpers shared by the PyTorch reference paths."""

from __future__ import annotations

import torch

L2NORM_EPS = 1e-6  # FLA's epsilon, so `use_qk_l2norm_in_kernel` matches it bit-for-bit in spirit


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, computed in x's dtype (callers upcast first)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64 (the oracle), else float32 (accumulation for bf16/fp16/fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def expand_heads(x: torch.Tensor, num_value_heads: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, T, HV, D]: value head h reads q/k head h // (HV // H)."""
    h = x.shape[2]
    return x if h == num_value_heads else x.repeat_interleave(num_value_heads // h, dim=2)


def pack_varlen(cu_seqlens: list[int], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Turn [1, total, ...] tensors into zero-padded [N, max_len, ...] batches.

    Zero padding at the end of a sequence is exact for the delta rule: a token with
    beta = 0, k = 0, v = 0 and g = 0 leaves the state unchanged.
    """
    n = len(cu_seqlens) - 1
    lens = [cu_seqlens[i + 1] - cu_seqlens[i] for i in range(n)]
    max_len = max(lens) if lens else 0
    out = []
    for t in tensors:
        padded = t.new_zeros((n, max_len) + tuple(t.shape[2:]))
        for i in range(n):
            padded[i, : lens[i]] = t[0, cu_seqlens[i] : cu_seqlens[i + 1]]
        out.append(padded)
    return tuple(out)


def unpack_varlen(cu_seqlens: list[int], padded: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_varlen` for one [N, max_len, ...] tensor -> [1, total, ...]."""
    n = len(cu_seqlens) - 1
    parts = [padded[i, : cu_seqlens[i + 1] - cu_seqlens[i]] for i in range(n)]
    return torch.cat(parts, dim=0).unsqueeze(0) if parts else padded.new_zeros((1, 0) + tuple(padded.shape[2:]))


def run_dense(core, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm,
              seq_offsets=None, **kwargs):
    """Upcast, normalise, pack varlen into a padded batch, run `core`, unpack and cast back.

    `core(q, k, v, g, beta, scale, h0, **kwargs) -> (o, h_final, *per_token)` works on dense
    [N, T, ...] tensors in the compute dtype; h0 may be None (zero state). Extra per-token
    outputs ([N, T, ...]) are unpacked like o and returned after the state. `seq_offsets`:
    cu_seqlens already on the host (else it is read here).
    """
    dtype = compute_dtype(q, k, v, g, beta, initial_state)
    out_dtype = q.dtype
    q, k, v, g, beta = (t.to(dtype) for t in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    cu = None
    if cu_seqlens is not None:
        cu = list(seq_offsets) if seq_offsets is not None else [int(x) for x in cu_seqlens.tolist()]
        q, k, v, g, beta = pack_varlen(cu, q, k, v, g, beta)
    h0 = None if initial_state is None else initial_state.to(dtype)
    o, h_final, *per_token = core(q, k, v, g, beta, scale, h0, **kwargs)
    if cu is not None:
        o = unpack_varlen(cu, o)
        per_token = [unpack_varlen(cu, x) for x in per_token]
    return (o.to(out_dtype), (h_final if output_final_state else None), *per_token)
