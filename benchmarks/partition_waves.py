"""Does the partition count fill whole waves of the GPU? A sweep of partition counts per shape.

    python benchmarks/partition_waves.py [--shapes 1x8K,1x4K] [--counts 4,8,16]

For each shape (bf16, K = V = 128, strong decay, final state returned) and each partition
count P it prints the map-pass and output-pass programs, how many of each kernel an SM holds
(from the compiled kernel's registers, shared memory and warps), the waves that makes, and
the time per kernel (torch profiler) and in total (do_bench). The question: does the auto
choice (`auto_partition_chunks`) leave a partial last wave? NOTES.md keeps the readings.
"""

import argparse
import math

import torch
import triton

from flashdelta.bench import Shape, make_inputs
from flashdelta.triton import chunk as tc
from flashdelta.triton.common import sm_count

SHAPES = [("1x4K 16/16", [4096], 16, 16, [1, 2, 4, 8]),
          ("1x8K 16/16", [8192], 16, 16, [1, 2, 3, 4, 6, 8, 16]),
          ("1x32K 16/16", [32768], 16, 16, [2, 4, 8, 9, 12, 16]),
          ("1x128K 16/16", [131072], 16, 16, [4, 8, 9, 12, 16, 24]),
          ("1x32K 16/32", [32768], 16, 32, [2, 4, 5, 8]),
          ("1x128K 32/32", [131072], 32, 32, [2, 4, 5, 8])]

LAUNCHED = []  # the compiled kernels of the last call, in launch order


def _record(jit_fn):
    run = jit_fn.run

    def wrapper(*args, **kwargs):
        kernel = run(*args, **kwargs)
        LAUNCHED.append((jit_fn.__name__, kernel, kwargs["grid"]))
        return kernel
    jit_fn.run = wrapper


def per_sm(kernel) -> int:
    """Programs of this compiled kernel one SM holds (Hopper: 64K registers, 227 KB shared)."""
    warps = kernel.metadata.num_warps
    regs = math.ceil(kernel.n_regs * 32 / 256) * 256  # registers are given out per warp in 256s
    by_regs = 65536 // (regs * warps) if kernel.n_regs else 32
    by_smem = (233472 // (kernel.metadata.shared + 1024)) if kernel.metadata.shared else 32
    return max(1, min(by_regs, by_smem, 2048 // (32 * warps)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None, help="only shapes whose label contains one of these comma-separated words")
    ap.add_argument("--counts", default=None, help="comma-separated partition counts (default: each shape's own)")
    opts = ap.parse_args()
    shapes = [s for s in SHAPES if opts.shapes is None or any(w in s[0] for w in opts.shapes.split(","))]
    if opts.counts:
        shapes = [(*s[:4], [int(c) for c in opts.counts.split(",")]) for s in shapes]
    for jit_fn in (tc._inverse_kernel, tc._recurrence_kernel, tc._chain_kernel):
        _record(jit_fn)
    sms = sm_count(torch.cuda.current_device())
    print(f"{sms} SMs; auto = auto_partition_chunks")
    print(f"{'shape':14}{'P':>5}{'chunks/P':>9}  {'kernel: programs / per SM / waves / ms':60}{'total ms':>9}")
    for name, lens, h, hv, counts in shapes:
        args, kw = make_inputs(Shape("prefill", name, lens, h, hv, gate="strong"), "cuda")
        q, k, v, g, beta = args
        n_chunks = triton.cdiv(lens[0], 64)
        choices = [None] + [math.ceil(n_chunks / p) for p in counts]

        def call(pc):
            return tc.chunk_gated_delta_rule_fwd(q, k, v, g, beta, 128**-0.5, None, True, None, False,
                                                 partition_chunks=pc)
        for pc in choices:
            call(pc)
            torch.cuda.synchronize()
            LAUNCHED.clear()
            call(pc)
            launches = list(LAUNCHED)
            reps = 10
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    call(pc)
                torch.cuda.synchronize()
            events = sorted((e for e in prof.events() if e.name.startswith("_") and e.device_time_total > 0),
                            key=lambda e: e.time_range.start)
            per_call = len(events) // reps
            ms = [sum(e.device_time_total for e in events[i::per_call]) / reps / 1e3 for i in range(per_call)]
            total = triton.testing.do_bench(lambda: call(pc), warmup=10, rep=60, return_mode="median")
            parts = []
            for (kname, kernel, grid), t in zip(launches, ms):
                programs = math.prod(grid)
                slots = per_sm(kernel) * sms
                short = kname.strip("_").replace("_kernel", "")[:5]
                parts.append(f"{short} {programs}/{per_sm(kernel)}/{programs / slots:.2f}/{t:.3f}")
            n_parts = math.ceil(n_chunks / (pc or tc.auto_partition_chunks([n_chunks], hv, 2, q.device)))
            label = "auto" if pc is None else str(n_parts)
            print(f"{name:14}{label:>5}{pc or '':>9}  {'  '.join(parts):60}{total:9.3f}", flush=True)
        # registers and shared memory of this shape's kernels (the same for every P)
        for kname, kernel, _ in launches:
            print(f"{'':14}{kname}: {kernel.n_regs} registers, {kernel.n_spills} spilled, "
                  f"{kernel.metadata.shared} B shared, {kernel.metadata.num_warps} warps", flush=True)


if __name__ == "__main__":
    main()
