"""Backend registry: which implementation runs a validated call.

A backend offers `chunk(...)` and `recurrent(...)` with the reference paths'
signature (q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
use_qk_l2norm, seq_offsets=None) -> (o, final_state | None); `seq_offsets` is cu_seqlens
already read on the host (validation's copy), so a path that needs the values does not
read the device tensor again.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class Backend:
    name: str
    chunk: Callable
    recurrent: Callable
    decode: Callable  # the serving step on a state pool (fused_sigmoid_gating_delta_rule_update)


def _torch_backend() -> Backend:
    from .reference import chunk_gated_delta_rule, recurrent_gated_delta_rule
    from .reference.decode import sigmoid_gating_delta_rule_update

    return Backend("torch", chunk_gated_delta_rule, recurrent_gated_delta_rule, sigmoid_gating_delta_rule_update)


@functools.lru_cache(maxsize=None)
def _triton_import_problem() -> str | None:
    try:
        mod = importlib.import_module("flashdelta.triton")
    except ImportError as e:  # triton not installed
        return f"triton is not importable ({e})"
    if not getattr(mod, "IMPLEMENTED", False):
        return "the Triton kernels are not implemented yet in this version of flashdelta"
    return None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton backend can run on `device`, else why not (one line)."""
    problem = _triton_import_problem()
    if problem is not None:
        return problem
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not (interpret and device.type == "cpu"):
        return f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
    return None


@functools.lru_cache(maxsize=None)  # built once: select() runs on every decode step
def _triton_backend() -> Backend:
    from . import triton as tk
    from .triton.decode import sigmoid_gating_delta_rule_update

    return Backend("triton", tk.chunk_gated_delta_rule, tk.fused_recurrent_gated_delta_rule,
                   sigmoid_gating_delta_rule_update)


def select(backend: str | None, device: torch.device) -> Backend:
    """Resolve `backend` for tensors on `device`; never falls back silently."""
    if backend is None:
        if device.type == "cuda" and triton_unavailable_reason(device) is None:
            return _triton_backend()
        return _torch_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return _torch_backend()
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend='triton' is not available: {reason}")
    return _triton_backend()
