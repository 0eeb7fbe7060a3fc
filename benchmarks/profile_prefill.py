"""One prefill call at a benchmark shape, for a profiler to look at:

    ncu --clock-control none -k regex:_recurrence_kernel python benchmarks/profile_prefill.py 1x8K
"""

import sys

import torch

import flashdelta as fd
from flashdelta.bench import Shape, make_inputs

SHAPES = {"1x8K": ([8192], 16, 16), "1x32K": ([32768], 16, 16), "8x4K": ([4096] * 8, 16, 32)}

lens, h, hv = SHAPES[sys.argv[1] if len(sys.argv) > 1 else "1x8K"]
args, kw = make_inputs(Shape("prefill", "p", lens, h, hv), "cuda")
for _ in range(2):  # compile, then the profiled call
    fd.chunk_gated_delta_rule(*args, output_final_state=True, backend="triton", **kw)
torch.cuda.synchronize()
