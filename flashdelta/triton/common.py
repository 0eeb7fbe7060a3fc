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
    fp16 inputs: bf16 operands too. An fp16 number is exactly a bf16 hi + lo pair (11 significant
    bits, and bf16's exponent range holds fp16's), so q and k go in split like an fp32 operand:
    3 bf16 products where bf16 inputs take 2, against 3xTF32's 3 half-rate ones (NOTES.md v5.11).
    fp32 inputs: fp32 operands with 3xTF32 (about fp32 accuracy).
    Under TRITON_INTERPRET the interpreter cannot multiply bf16 (triton issue #11584: it
    multiplies the raw bits), so fp32 is used there: same code, a split whose low part is 0.
    """
    if input_dtype in (torch.bfloat16, torch.float16) and not interpreting():
        return tl.bfloat16
    return tl.float32


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def mm(a, b, DOT: tl.constexpr):
    """a @ b for operands already in DOT (fp32 goes through 3xTF32, ~fp32 accuracy)."""
    if DOT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    else:
        return tl.dot(a, b)


# PREC, the precision of products with an fp32 operand (bf16 inputs on the GPU):
#   0 "split": fp32 operands as bf16 hi + lo pairs (2 products, 3 when both are fp32), ~16 bits
#   1 "tf32":  one TF32 product (~11 bits per operand)
#   2 "bf16":  one bf16 product, operands rounded to bf16 (~8 bits; FLA's choice)
PRECISIONS = {"split": 0, "tf32": 1, "bf16": 2}


# Inline PTX on the GPU (the interpreter cannot run it; there the plain forms below run).
PTX = tl.constexpr(not interpreting())

# fp32 pair (x0, x1) -> bf16 pairs hi = bf16(x), lo = bf16(x - hi): one packed conversion per
# pair and hi back to fp32 by a shift or a mask, the same roundings as the plain form in 3
# instructions per element, where ptxas takes ~4-5 for the plain one (each element alone).
HI_LO_BF16X2 = tl.constexpr("""{
    .reg .b32 e0, e1, r0, r1;
    cvt.rn.bf16x2.f32 $0, $3, $2;
    shl.b32 e0, $0, 16;
    and.b32 e1, $0, 0xffff0000;
    sub.f32 r0, $2, e0;
    sub.f32 r1, $3, e1;
    cvt.rn.bf16x2.f32 $1, r1, r0;
    }""")


@triton.jit
def hi_lo(x, DOT: tl.constexpr):
    """fp32 x as hi + lo in DOT (bf16: ~16 bits together; fp32: x and 0)."""
    if PTX and DOT == tl.bfloat16:
        return tl.inline_asm_elementwise(HI_LO_BF16X2, "=r,=r,r,r", [x.to(tl.float32)],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
    else:
        hi = x.to(DOT)
        return hi, (x - hi.to(tl.float32)).to(DOT)


@triton.jit
def mm_split_b(a, b, DOT: tl.constexpr, PREC: tl.constexpr = 0, acc=None):
    """a (exact in DOT) @ b (fp32), added to `acc` (fp32) when given: the products accumulate
    into acc's registers, so no second tile of the result's size is live."""
    if DOT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    elif PREC == 0:
        b_hi, b_lo = hi_lo(b, DOT)
        return tl.dot(a, b_lo, tl.dot(a, b_hi, acc))
    elif PREC == 1:
        return tl.dot(a.to(tl.float32), b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b.to(DOT), acc)


@triton.jit
def mm_split_ab(a, b, DOT: tl.constexpr, PREC: tl.constexpr = 0, acc=None):
    """a (fp32) @ b (fp32), added to `acc` when given; the split form drops lo @ lo (3 products)."""
    if DOT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    elif PREC == 0:
        a_hi, a_lo = hi_lo(a, DOT)
        b_hi, b_lo = hi_lo(b, DOT)
        acc = tl.dot(a_hi, b_hi, acc)
        acc = tl.dot(a_lo, b_hi, acc)
        return tl.dot(a_hi, b_lo, acc)
    elif PREC == 1:
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a.to(DOT), b.to(DOT), acc)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host (triton.cdiv is a jit function: microseconds per Python call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), on the host (as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
