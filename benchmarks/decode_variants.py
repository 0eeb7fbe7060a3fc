"""Tune the serving decode kernel on a GPU: column block and warps per batch size.

    python benchmarks/decode_variants.py

For each (BV, warps) of `flashdelta.triton.decode.TUNING` it prints the CUDA-graph time of
one decode step at the `flashdelta bench` decode shapes (H = 16, HV = 32, K = V = 128, pool
of 1024 slots) and the largest relative L2 error of o and of the written states against the
torch path on the same inputs, so a faster variant that is wrong shows it. NOTES.md keeps
the readings.
"""

import argparse

import torch

from flashdelta.bench import Shape, _decode_step, make_decode_inputs, time_fn
from flashdelta.testing import rel_l2
from flashdelta.triton import decode as td

# (BV, warps, register cap or None)
VARIANTS = [(64, 8, None), (64, 4, None), (32, 4, None), (32, 2, None), (16, 4, None), (16, 2, None), (16, 1, None),
            (8, 1, None), (8, 2, None), (64, 4, 128), (64, 4, 96), (32, 4, 128), (32, 4, 96)]
SHAPES = [
    ("B=1 T=1", 1, 1, "float32"),
    ("B=16 T=1", 16, 1, "float32"),
    ("B=64 T=1", 64, 1, "float32"),
    ("B=256 T=1", 256, 1, "float32"),
    ("B=256 bf16", 256, 1, "bfloat16"),
    ("B=64 T=4", 64, 4, "float32"),
]


def check(inputs, pool0, step, ref):
    """Largest rel. L2 error of o and the pool's named slots after one step from pool0."""
    inputs["pool"].copy_(pool0)
    o, _ = step(inputs)
    states = inputs["pool"][inputs["idx"]].float()
    return max(rel_l2(o.float(), ref[0].float()), rel_l2(states, ref[1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=None, help="comma-separated indices of VARIANTS")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1 (two small shapes)")
    opts = ap.parse_args()
    device = torch.device(opts.device)
    shapes = SHAPES if device.type == "cuda" else [("B=2 T=1", 2, 1, "float32"), ("B=2 T=3", 2, 3, "bfloat16")]
    chosen = [VARIANTS[int(i)] for i in opts.variants.split(",")] if opts.variants else VARIANTS
    inputs, refs, pools = {}, {}, {}
    for name, batch, tokens, pool_dtype in shapes:
        shape = Shape("decode", name, [tokens] * batch, 16, 32, graph=True, pool_dtype=pool_dtype)
        d = make_decode_inputs(shape, device)
        pool0 = d["pool"].clone()
        o, _ = _decode_step("torch")(d)
        refs[name] = (o.clone(), d["pool"][d["idx"]].float().clone())
        inputs[name], pools[name] = d, pool0
    print(f"{'BV warps reg':14}" + "".join(f"{n:>13}" for n, *_ in shapes) + f"{'max err':>10}   (graph, us)")
    step = _decode_step("triton")
    for bv, warps, regs in chosen:
        td.TUNING.update(block_v=bv, num_warps=warps, maxnreg=regs)
        err = max(check(inputs[n], pools[n], step, refs[n]) for n, *_ in shapes)
        times = [1e3 * time_fn(lambda d=inputs[n]: step(d), device, graph=True) for n, *_ in shapes]
        print(f"{bv:>3} {warps:>5} {regs or '-':>4}  " + "".join(f"{t:13.1f}" for t in times) + f"{err:10.1e}", flush=True)
    td.TUNING.update(block_v=None, num_warps=None, maxnreg=None)
    if device.type == "cuda":  # what the timing method costs by itself, and what one step launches
        x = torch.zeros(1, device=device)
        print(f"graph of one 1-element kernel: {1e3 * time_fn(lambda: x.add_(1), device, graph=True):.1f} us")
        d = inputs[shapes[0][0]]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step(d)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_time_total > 0]
        print(f"kernels of one {shapes[0][0]} step: {names}")


if __name__ == "__main__":
    main()
