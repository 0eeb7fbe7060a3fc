"""One prefill call at a benchmark shape, for a profiler to look at:

    ncu --clock-control none -k regex:_recurrence_kernel python benchmarks/profile_prefill.py 1x8K

Options set `flashdelta.triton.chunk.TUNING` knobs, e.g. `--block-v 32 --stages 2`, or any
knob by name: `--set gluon_sm90=False`.
"""

import argparse
import ast

import torch

import flashdelta as fd
from flashdelta.bench import Shape, make_inputs
from flashdelta.triton import chunk as tc

SHAPES = {"1x8K": ([8192], 16, 16), "1x32K": ([32768], 16, 16), "8x4K": ([4096] * 8, 16, 32)}

ap = argparse.ArgumentParser()
ap.add_argument("shape", nargs="?", default="1x8K", choices=sorted(SHAPES))
ap.add_argument("--block-v", type=int)
ap.add_argument("--stages", type=int)
ap.add_argument("--warps", type=int)
ap.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE", help="any TUNING knob (Python literal)")
opts = ap.parse_args()
for item in opts.set:
    knob, value = item.split("=", 1)
    if knob not in tc.TUNING:
        raise SystemExit(f"unknown TUNING knob {knob!r}; known: {sorted(tc.TUNING)}")
    tc.TUNING[knob] = ast.literal_eval(value)
for knob, value in (("block_v", opts.block_v), ("stages", opts.stages), ("warps_recurrence", opts.warps)):
    if value is not None:
        tc.TUNING[knob] = value
lens, h, hv = SHAPES[opts.shape]
args, kw = make_inputs(Shape("prefill", "p", lens, h, hv), "cuda")
for _ in range(2):  # compile, then the profiled call
    fd.chunk_gated_delta_rule(*args, output_final_state=True, backend="triton", **kw)
torch.cuda.synchronize()
