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
# (B=1, H=16, K=V=128, with fast launches): the token loop wins through T=256 in bf16 and fp32
# (0.21 vs 0.23 ms, 0.18 vs 0.28), the chunked path from 512 in bf16 (0.22 vs 0.31 ms; fp32
# from 1024).
RECURRENT_MAX_TOKENS = {"torch": 6, "triton": 256}
# fp32 inputs on Triton take the chunked products as 3xTF32 (past K = 128 on the Triton passes), so
# the token loop wins longer (H100, H = 16, NOTES.md "Auto-dispatch threshold, Triton"): through
# T = 256 at K = 64; at K = 128 through 1024 (B = 1: 0.644 vs 0.646 ms; B = 8 through 2048 too);
# at K = 256 at every length measured (to 8192 at B = 1, 4096 at B = 8), where the chunked path
# takes 3-4x the loop's time. Rows (largest K, tokens): the first row whose K is >= the call's.
RECURRENT_MAX_TOKENS_FP32 = {"triton": ((64, 256), (128, 1024), (math.inf, math.inf))}

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
    seq_offsets: tuple | None = None  # cu_seqlens as read on the host by validation (one sync)


def _check_tensor(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")


def validate(q, k, v, g, beta, scale=None, initial_state=None, cu_seqlens=None, state_v_first=False,
             gate_names=("g", "beta")) -> Problem:
    """Check every argument before any computation; raise ValueError/TypeError naming it.
    `gate_names`: what the caller calls g and beta (the decode entry point takes a and b)."""
    g_name, beta_name = gate_names
    _check_tensor("q", q, 4, "[B, T, H, K]")
    _check_tensor("k", k, 4, "[B, T, H, K]")
    _check_tensor("v", v, 4, "[B, T, HV, V]")
    _check_tensor(g_name, g, 3, "[B, T, HV]")
    _check_tensor(beta_name, beta, 3, "[B, T, HV]")
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
    for name, x in ((g_name, g), (beta_name, beta)):
        if tuple(x.shape) != (b, t_len, hv):
            raise ValueError(f"{name} must be [B, T, HV] = {(b, t_len, hv)}, got {tuple(x.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    device = q.device
    named = [("k", k), ("v", v), (g_name, g), (beta_name, beta), ("initial_state", initial_state),
             ("cu_seqlens", cu_seqlens)]
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
    offsets = None
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
        expected, layout = ((num_seqs, hv, dv, dk), "[N, HV, V, K]") if state_v_first else (
            (num_seqs, hv, dk, dv), "[N, HV, K, V]")
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must be {layout} = {expected}, got {tuple(initial_state.shape)}")
        allowed = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
        if initial_state.dtype not in allowed:
            raise TypeError(f"initial_state must be float32 (float64 allowed with float64 inputs), "
                            f"got {initial_state.dtype}")
    return Problem(b, t_len, h, hv, dk, dv, num_seqs, float(scale), None if offsets is None else tuple(offsets))


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


def recurrent_max_tokens(backend: str, dtype: torch.dtype, head_dim: int) -> float:
    """The most tokens per sequence (mean with cu_seqlens) that `mode="auto"` runs on the recurrent
    path of `backend` for inputs of `dtype` and key head dim `head_dim`."""
    if dtype == torch.float32 and backend in RECURRENT_MAX_TOKENS_FP32:
        return next(limit for dim, limit in RECURRENT_MAX_TOKENS_FP32[backend] if head_dim <= dim)
    return RECURRENT_MAX_TOKENS[backend]


def _run(path, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
         use_qk_l2norm_in_kernel, backend, mode="auto", state_v_first=False):
    problem = validate(q, k, v, g, beta, scale, initial_state, cu_seqlens, state_v_first)
    impl = backends.select(backend, q.device)
    if path == "auto":
        path = _resolve_mode(mode)
        if path == "auto":
            # Dense batches: T per sequence; varlen: the mean length of the packed sequences.
            tokens_per_seq = problem.seq_len / max(problem.num_seqs, 1) if cu_seqlens is not None else problem.seq_len
            path = "recurrent" if tokens_per_seq <= recurrent_max_tokens(impl.name, q.dtype, q.shape[-1]) else "chunk"
    fn = impl.chunk if path == "chunk" else impl.recurrent
    if state_v_first and initial_state is not None:
        initial_state = initial_state.transpose(-1, -2)  # a view; the paths read [K, V] by strides
    o, final = fn(q, k, v, g, beta, problem.scale, initial_state, bool(output_final_state), cu_seqlens,
                  bool(use_qk_l2norm_in_kernel), seq_offsets=problem.seq_offsets)
    if state_v_first and final is not None:
        final = final.transpose(-1, -2).contiguous()
    return o, final


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm_in_kernel=False, backend=None, state_v_first=False):
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
        state_v_first: states are [N, HV, V, K] (SGLang's layout) instead of [N, HV, K, V].
    Returns:
        o [B, T, HV, V] in q's dtype, and the final state [N, HV, K, V] float32 (or None).
    """
    return _run("chunk", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                use_qk_l2norm_in_kernel, backend, state_v_first=state_v_first)


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                     cu_seqlens=None, use_qk_l2norm_in_kernel=False, backend=None,
                                     state_v_first=False):
    """Token-by-token gated delta rule (decode, short inputs). Same arguments and returns as
    `chunk_gated_delta_rule`."""
    return _run("recurrent", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                use_qk_l2norm_in_kernel, backend, state_v_first=state_v_first)


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, use_qk_l2norm_in_kernel=False, backend=None, mode="auto",
                     state_v_first=False):
    """Dispatching gated delta rule: the recurrent path when sequences are short (at most
    `recurrent_max_tokens(backend, q.dtype, K)` tokens on average: `RECURRENT_MAX_TOKENS[backend]`,
    or `RECURRENT_MAX_TOKENS_FP32` for fp32 inputs on Triton), the chunked path otherwise.

    `mode="chunk"` or `"recurrent"` forces a path; with `mode="auto"` the environment
    variable FLASHDELTA_MODE (auto|chunk|recurrent) may force one for A/B checks.
    Same arguments and returns as `chunk_gated_delta_rule` otherwise.
    """
    return _run("auto", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                use_qk_l2norm_in_kernel, backend, mode, state_v_first)


def fused_sigmoid_gating_delta_rule_update(A_log, a, dt_bias, softplus_beta, softplus_threshold, q, k, v, b,
                                           initial_state_source, initial_state_indices, scale=None,
                                           use_qk_l2norm_in_kernel=False, cu_seqlens=None, backend=None,
                                           state_v_first=False, intermediate_states=None, check_indices=True):
    """One decode step for serving (vLLM's and SGLang's argument names), updating a state pool in place.

    Computes g = -exp(A_log) * softplus(a + dt_bias) (torch's softplus with `softplus_beta`
    and `softplus_threshold`), beta = sigmoid(b), optionally L2-normalises q and k, and runs
    the gated delta rule over each sequence's tokens, all in one kernel.

    Args:
        A_log, dt_bias: [HV].
        a, b: [B, T, HV] (or [1, total, HV] with cu_seqlens).
        q, k: [B, T, H, K]; v: [B, T, HV, V]. T > 1 is several (speculative) tokens per
            sequence; or B = 1 and `cu_seqlens` [N + 1] packs sequences of any lengths.
        initial_state_source: the pool, [slots, HV, K, V] ([slots, HV, V, K] with
            `state_v_first`), float32 or bfloat16. Sequence n reads
            pool[initial_state_indices[n]] and the step writes its final state back there.
            Slots not named are not touched.
        initial_state_indices: [N] integer. A negative index means no state: the sequence
            starts from zero and nothing is written back (padding rows of CUDA-graph batches).
        intermediate_states: optional output [B * T (or total), HV, K, V] (pool layout and
            dtype): the state after each token, by global token index. To roll back a
            speculative step where sequence n accepted its first j >= 1 tokens, copy
            intermediate_states[start_n + j - 1] into pool[initial_state_indices[n]]
            (start_n = n * T, or cu_seqlens[n]); j = 0 needs the state from before the step,
            which the pool no longer holds: keep a copy, or run with the slot's index
            negative and commit the accepted state yourself.
        check_indices: check on the host (one device sync) that indices are < slots and that
            non-negative ones are distinct. Skipped while a CUDA graph is being captured;
            the kernels never write out of bounds either way (an index >= slots is treated
            as negative).
    Returns:
        o: [B, T, HV, V] in q's dtype.
    """
    problem = validate(q, k, v, a, b, scale, None, cu_seqlens, gate_names=("a", "b"))
    hv, dk, dv = problem.num_value_heads, problem.head_dim_k, problem.head_dim_v
    for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
        _check_tensor(name, x, 1, "[HV]")
        if x.shape[0] != hv:
            raise ValueError(f"{name} must be [HV] = [{hv}], got {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    for name, x in (("softplus_beta", softplus_beta), ("softplus_threshold", softplus_threshold)):
        if isinstance(x, bool) or not isinstance(x, Real):
            raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    if not float(softplus_beta) > 0:
        raise ValueError(f"softplus_beta must be positive, got {softplus_beta}")
    pool = initial_state_source
    if not isinstance(pool, torch.Tensor):
        raise TypeError(f"initial_state_source must be a torch.Tensor pool, got {type(pool).__name__}")
    layout = "[slots, HV, V, K]" if state_v_first else "[slots, HV, K, V]"
    expected = (hv, dv, dk) if state_v_first else (hv, dk, dv)
    if pool.dim() != 4 or tuple(pool.shape[1:]) != expected:
        raise ValueError(f"initial_state_source must be {layout} with HV, dims = {expected}, got {tuple(pool.shape)}")
    allowed = (torch.float32, torch.bfloat16) + ((torch.float64,) if q.dtype == torch.float64 else ())
    if pool.dtype not in allowed:
        raise TypeError(f"initial_state_source must be float32 or bfloat16, got {pool.dtype}")
    if pool.device != q.device:
        raise ValueError(f"initial_state_source is on {pool.device} but q is on {q.device}")
    idx = initial_state_indices
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"initial_state_indices must be a 1-D integer torch.Tensor, got {type(idx).__name__}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"initial_state_indices must have an integer dtype, got {idx.dtype}")
    if idx.dim() != 1 or idx.shape[0] != problem.num_seqs:
        raise ValueError(f"initial_state_indices must be [N] = [{problem.num_seqs}] (one per sequence), "
                         f"got {tuple(idx.shape)}")
    if idx.device != q.device:
        raise ValueError(f"initial_state_indices is on {idx.device} but q is on {q.device}")
    if intermediate_states is not None:
        if not isinstance(intermediate_states, torch.Tensor):
            raise TypeError("intermediate_states must be a torch.Tensor or None")
        total = problem.batch * problem.seq_len
        want = (total,) + expected
        if tuple(intermediate_states.shape) != want:
            raise ValueError(f"intermediate_states must be [tokens, {layout[7:]} = {want}, "
                             f"got {tuple(intermediate_states.shape)}")
        if intermediate_states.dtype != pool.dtype or intermediate_states.device != pool.device:
            raise TypeError("intermediate_states must have initial_state_source's dtype and device")
    capturing = q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if check_indices and not capturing:
        values = idx.tolist()
        if any(x >= pool.shape[0] for x in values):
            raise ValueError(f"initial_state_indices must be < slots = {pool.shape[0]}, got max {max(values)}")
        named = [x for x in values if x >= 0]
        if len(set(named)) != len(named):
            raise ValueError("initial_state_indices must not repeat a slot (two sequences would write one state)")
    impl = backends.select(backend, q.device)
    return impl.decode(A_log, a, dt_bias, float(softplus_beta), float(softplus_threshold), q, k, v, b, pool, idx,
                       problem.scale, bool(use_qk_l2norm_in_kernel), cu_seqlens, bool(state_v_first),
                       intermediate_states)
