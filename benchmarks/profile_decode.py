"""One serving decode step at a benchmark shape, for a profiler to look at:

    ncu --clock-control none -k regex:_decode_kernel python benchmarks/profile_decode.py --batch 256 --tokens 1

H = 16, HV = 32, K = V = 128, fp32 (or --pool-dtype bfloat16) pool of 1024 slots, as the
decode suite of `flashdelta bench`.
"""

import argparse

import torch

from flashdelta.bench import Shape, _decode_step, make_decode_inputs

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=256)
ap.add_argument("--tokens", type=int, default=1)
ap.add_argument("--pool-dtype", default="float32", choices=["float32", "bfloat16"])
opts = ap.parse_args()
shape = Shape("decode", "profile", [opts.tokens] * opts.batch, 16, 32, pool_dtype=opts.pool_dtype)
device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: under TRITON_INTERPRET=1
inputs = make_decode_inputs(shape, device)
step = _decode_step("triton")
for _ in range(2):  # compile, then the profiled call
    step(inputs)
if device == "cuda":
    torch.cuda.synchronize()
