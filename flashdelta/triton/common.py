"""Pieces shared by the Triton kernels: matmul precision helpers and launch facts."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_dtype(input_dtype: torch.dtype):
    """The dtype the tensor-core operands take.

    bf16 inputs: bf16 operands (q, k, v are exact in it; fp32 operands go in as a hi + lo pair).
    fp16/fp32 inputs: fp32 operands with 3xTF32 (about fp32 accuracy).
    Under TRITON_INTERPRET the interpreter cannot multiply bf16 (triton issue #11584: it
    multiplies the raw bits), so fp32 is used there: same code, a split whose low part is 0.
    """
    if input_dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16
    return tl.float32


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def mm(a, b, DOT: tl.constexpr):
    """a @ b for operands already in DOT (fp32 goes through 3xTF32, ~fp32 accuracy)."""
    if DOT == tl.float32:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b)


@triton.jit
def mm_split_a(a, b, DOT: tl.constexpr):
    """a (fp32) @ b (exact in DOT): a = hi + lo in DOT, two products (~16 mantissa bits of a)."""
    if DOT == tl.float32:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        a_hi = a.to(DOT)
        a_lo = (a - a_hi.to(tl.float32)).to(DOT)
        return tl.dot(a_lo, b, tl.dot(a_hi, b))


@triton.jit
def mm_split_b(a, b, DOT: tl.constexpr):
    """a (exact in DOT) @ b (fp32): b = hi + lo, two products."""
    if DOT == tl.float32:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        b_hi = b.to(DOT)
        b_lo = (b - b_hi.to(tl.float32)).to(DOT)
        return tl.dot(a, b_lo, tl.dot(a, b_hi))


@triton.jit
def mm_split_ab(a, b, DOT: tl.constexpr):
    """a (fp32) @ b (fp32): hi/lo on both sides, three products (lo @ lo dropped)."""
    if DOT == tl.float32:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        a_hi = a.to(DOT)
        a_lo = (a - a_hi.to(tl.float32)).to(DOT)
        b_hi = b.to(DOT)
        b_lo = (b - b_hi.to(tl.float32)).to(DOT)
        acc = tl.dot(a_hi, b_hi)
        acc = tl.dot(a_lo, b_hi, acc)
        return tl.dot(a_hi, b_lo, acc)
