"""The public ops: validate once, then dispatch to a backend and a path.

Layout (FLA's): q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; HV = r * H
(value head h reads q/k head h // r). States are [N, HV, K, V] float32 (float64 when
the inputs are float64), N = B, or the number of sequences when `cu_seqlens` is given
(then B = 1). o has q's dtype and v's head count and width: [B, T, HV, V].
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from numbers import Real

import torch

from . import backends

MODE_ENV = "FLASHDELTA_MODE"
MODES = ("auto", "chunk", "recurrent")

# `mode="auto"` runs the recurrent path when a sequence has at most this many tokens (mean
# length for varlen). Measured with benchmarks/dispatch_threshold.py (NOTES.md): on the CPU
# (2 cores, H=4, K=V=64) recurrent wins up to T=4-6, chunked from T=8 on. Triton on an H100
# (B=1, H=16, K=V=128): the token loop is 2.7x faster still at T=128.
RECURRENT_MAX_TOKENS = {"torch": 6, "triton": 128}

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Problem:
    """Sizes of a validated call."""

    batch: int  # B
    seq_len: int  # T (total tokens when varlen)
    num_heads: int  # H
    num_value_heads: int  # HV
    head_dim_k: int  # K
    head_dim_v: int  # V
    num_seqs: int  # N
    scale: float


def _check_tensor(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")


def validate(q, k, v, g, beta, scale=None, initial_state=None, cu_seqlens=None) -> Problem:
    """Check every argument before any computation; raise ValueError/TypeError naming it."""
    _check_tensor("q", q, 4, "[B, T, H, K]")
    _check_tensor("k", k, 4, "[B, T, H, K]")
    _check_tensor("v", v, 4, "[B, T, HV, V]")
    _check_tensor("g", g, 3, "[B, T, HV]")
    _check_tensor("beta", beta, 3, "[B, T, HV]")
    b, t_len, h, dk = q.shape
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have q's shape [B, T, H, K] = {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape[:2]) != (b, t_len):
        raise ValueError(f"v must be [B, T, HV, V] with B, T = {b}, {t_len} (from q), got {tuple(v.shape)}")
    hv, dv = v.shape[2], v.shape[3]
    if h == 0 or hv == 0 or hv % h != 0:
        raise ValueError(f"v's head count HV = {hv} must be a positive multiple of q/k's H = {h}")
    if dk == 0 or dv == 0:
        raise ValueError(f"head dims must be positive, got K = {dk} (q, k) and V = {dv} (v)")
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (b, t_len, hv):
            raise ValueError(f"{name} must be [B, T, HV] = {(b, t_len, hv)}, got {tuple(x.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    device = q.device
    named = [("k", k), ("v", v), ("g", g), ("beta", beta), ("initial_state", initial_state), ("cu_seqlens", cu_seqlens)]
    for name, x in named:
        if isinstance(x, torch.Tensor) and x.device != device:
            raise ValueError(f"{name} is on {x.device} but q is on {device}: all tensors must share one device")

    if scale is None:
        scale = dk**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"scale must be a positive real number or None, got {type(scale).__name__}")
    elif not (math.isfinite(float(scale)) and float(scale) > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")

    num_seqs = b
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"cu_seqlens must be a 1-D integer torch.Tensor, got {type(cu_seqlens).__name__}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with N + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
            raise TypeError(f"cu_seqlens must have an integer dtype (int32 or int64), got {cu_seqlens.dtype}")
        if b != 1:
            raise ValueError(f"with cu_seqlens, q must be [1, total_tokens, H, K] (B = 1), got B = {b}")
        offsets = cu_seqlens.tolist()  # one host read: the checks below need the values
        if offsets[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
        if any(b2 < a2 for a2, b2 in zip(offsets, offsets[1:])):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {offsets}")
        if offsets[-1] != t_len:
            raise ValueError(f"cu_seqlens must end at T = {t_len} (q's total tokens), got {offsets[-1]}")
        num_seqs = len(offsets) - 1

    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise TypeError(f"initial_state must be a torch.Tensor [N, HV, K, V], got {type(initial_state).__name__}")
        expected = (num_seqs, hv, dk, dv)
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must be [N, HV, K, V] = {expected}, got {tuple(initial_state.shape)}")
        allowed = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
        if initial_state.dtype not in allowed:
            raise TypeError(f"initial_state must be float32 (float64 allowed with float64 inputs), "
                            f"got {initial_state.dtype}")
    return Problem(b, t_len, h, hv, dk, dv, num_seqs, float(scale))


def _resolve_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        env = os.environ.get(MODE_ENV)
        if env:
            if env not in MODES:
                raise ValueError(f"{MODE_ENV} must be one of {MODES}, got {env!r}")
            mode = env
    return mode


def _run(path, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
         use_qk_l2norm_in_kernel, backend, mode="auto"):
    problem = validate(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    impl = backends.select(backend, q.device)
    if path == "auto":
        path = _resolve_mode(mode)
        if path == "auto":
            # Dense batches: T per sequence; varlen: the mean length of the packed sequences.
            tokens_per_seq = problem.seq_len / max(problem.num_seqs, 1) if cu_seqlens is not None else problem.seq_len
            path = "recurrent" if tokens_per_seq <= RECURRENT_MAX_TOKENS[impl.name] else "chunk"
    fn = impl.chunk if path == "chunk" else impl.recurrent
    return fn(q, k, v, g, beta, problem.scale, initial_state, bool(output_final_state), cu_seqlens,
              bool(use_qk_l2norm_in_kernel))


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm_in_kernel=False, backend=None):
    """Chunked (prefill) gated delta rule.

    Args:
        q, k: [B, T, H, K]; v: [B, T, HV, V] with HV a multiple of H; all one float dtype.
        g: [B, T, HV] log-space decay per token (<= 0); beta: [B, T, HV].
        scale: query scale, default K ** -0.5.
        initial_state: [N, HV, K, V] float32, or None for zeros. Never modified.
        output_final_state: return the state after the last token.
        cu_seqlens: [N + 1] integer offsets of N packed sequences (then B = 1).
        use_qk_l2norm_in_kernel: L2-normalise q and k over K first (eps 1e-6, as FLA).
        backend: None (triton on CUDA when usable, else torch), "torch" or "triton".
    Returns:
        o [B, T, HV, V] in q's dtype, and the final state [N, HV, K, V] float32 (or None).
    """
    return _run("chunk", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                use_qk_l2norm_in_kernel, backend)


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                     cu_seqlens=None, use_qk_l2norm_in_kernel=False, backend=None):
    """Token-by-token gated delta rule (decode, short inputs). Same arguments and returns as
    `chunk_gated_delta_rule`."""
    return _run("recurrent", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                use_qk_l2norm_in_kernel, backend)


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, use_qk_l2norm_in_kernel=False, backend=None, mode="auto"):
    """Dispatching gated delta rule: the recurrent path when sequences are short (at most
    `RECURRENT_MAX_TOKENS[backend]` tokens on average), the chunked path otherwise.

    `mode="chunk"` or `"recurrent"` forces a path; with `mode="auto"` the environment
    variable FLASHDELTA_MODE (auto|chunk|recurrent) may force one for A/B checks.
    Same arguments and returns as `chunk_gated_delta_rule` otherwise.
    """
    return _run("auto", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                use_qk_l2norm_in_kernel, backend, mode)
