"""Tune and explain the Triton prefill on a GPU: time per phase and per partition size.

    python benchmarks/prefill_variants.py [--quick]

Prints, for each shape: the time of the whole op at several `partition_chunks` (chunks per
sequence partition; 'one' = one partition per sequence) and the auto choice, and the time
of the inverse kernel alone. Feeds MIN_PARTITION_CHUNKS / auto_partition_chunks (NOTES.md).
"""

import argparse
import sys

import torch
import triton

from flashdelta.bench import Shape, make_inputs
from flashdelta.triton import chunk as tc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    shapes = [("1x8K 16/16", [8192], 16, 16), ("1x32K 16/16", [32768], 16, 16), ("1x128K 16/16", [131072], 16, 16),
              ("1x128K 32/32", [131072], 32, 32), ("1x32K 16/32", [32768], 16, 32), ("8x4K 16/32", [4096] * 8, 16, 32)]
    if args.quick:
        shapes = shapes[:2]
    choices = [None, 10**9, 4, 8, 16, 32, 64]
    print(f"{'shape':14} {'gate':6} " + " ".join(f"{str(c if c != 10**9 else 'one'):>8}" for c in choices)
          + f" {'inverse':>8}  (ms; None = auto)")
    for name, lens, h, hv in shapes:
        for gate in ("strong", "weak"):
            shape = Shape("prefill", name, lens, h, hv, gate=gate)
            (q, k, v, g, beta), kw = make_inputs(shape, "cuda")
            times = []
            for pc in choices:
                fn = lambda: tc.chunk_gated_delta_rule_fwd(q, k, v, g, beta, 128**-0.5, None, True,  # noqa: E731
                                                           kw.get("cu_seqlens"), partition_chunks=pc)
                times.append(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
            b, t = q.shape[:2]
            plan = tc._plan(tuple((i, 0, t) for i in range(b)), 1, q.device)
            tinv = torch.empty(b, t, hv, 64, dtype=torch.float32, device="cuda")
            inv = lambda: tc._inverse_kernel[(plan["num_chunks"], hv)](  # noqa: E731
                k, g, beta, tinv, plan["chunks"], *k.stride(), *g.stride(), *beta.stride(), *tinv.stride()[:3],
                GROUP=hv // h, K=128, BK=128, L2NORM=False, K_EXACT=True, DOT=tl_bf16(), num_warps=4)
            t_inv = triton.testing.do_bench(inv, warmup=10, rep=50, return_mode="median")
            print(f"{name:14} {gate:6} " + " ".join(f"{x:8.3f}" for x in times) + f" {t_inv:8.3f}", flush=True)
            del q, k, v, g, beta, tinv
            torch.cuda.empty_cache()
    sys.stdout.flush()


def tl_bf16():
    import triton.language as tl

    return tl.bfloat16


if __name__ == "__main__":
    main()
