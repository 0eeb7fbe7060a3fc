"""Tune and explain the Triton prefill on a GPU: launch/precision variants and partition sizes.

    python benchmarks/prefill_variants.py [--partitions]

For each variant of `flashdelta.triton.chunk.TUNING` it prints the time at a few shapes
(bf16, K = V = 128, final state returned) and the relative L2 error against the fp64 token
loop on adversarial inputs, so each precision choice has its cost in time next to it.
`--partitions` also sweeps `partition_chunks` with the default variant. NOTES.md keeps the
readings.
"""

import argparse
import itertools

import torch
import triton

from flashdelta.bench import Shape, make_inputs
from flashdelta.testing import make_case, oracle, rel_l2
from flashdelta.triton import chunk as tc

VARIANTS = [
    # precision, warps_recurrence, block_v, warps_inverse
    ("split", 4, 64, 2),
    ("split", 8, 64, 2),
    ("split", 4, 32, 2),
    ("split", 8, 128, 2),
    ("split", 4, 64, 4),
    ("bf16", 8, 64, 2),
]
SHAPES = [("1x8K 16/16", [8192], 16, 16), ("1x32K 16/16", [32768], 16, 16), ("8x4K 16/32", [4096] * 8, 16, 32)]
ERROR_KINDS = ["random", "near_identical_keys", "strong_decay", "large_initial_state"]


def run(args, kw, pc=None):
    q, k, v, g, beta = args
    return tc.chunk_gated_delta_rule_fwd(q, k, v, g, beta, 128**-0.5, kw.get("initial_state"), True,
                                         kw.get("cu_seqlens"), kw.get("use_qk_l2norm_in_kernel", False),
                                         partition_chunks=pc)


def bench(args, kw, pc=None):
    return triton.testing.do_bench(lambda: run(args, kw, pc), warmup=10, rep=60, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--partitions", action="store_true")
    opts = ap.parse_args()
    inputs = {name: make_inputs(Shape("prefill", name, lens, h, hv, gate="strong"), "cuda")
              for name, lens, h, hv in SHAPES}
    cases = [make_case(kind, torch.bfloat16, "cuda", seed=11, seq_len=2048, heads=2, value_heads=4, dk=128)
             for kind in ERROR_KINDS]
    refs = [oracle(c) for c in cases]
    head = f"{'variant':24}" + "".join(f"{n:>13}" for n, *_ in SHAPES) + "".join(
        f"{k[:9] + ' o/s':>20}" for k in ERROR_KINDS)
    print(head)
    for prec, wr, bv, wi in VARIANTS:
        tc.TUNING.update(precision=prec, warps_recurrence=wr, block_v=bv, warps_inverse=wi)
        times = [bench(*inputs[name]) for name, *_ in SHAPES]
        errs = []
        for case, (o_ref, s_ref) in zip(cases, refs):
            o, s = run(case.args(), case.kwargs)
            errs.append(f"{rel_l2(o, o_ref):.1e}/{rel_l2(s, s_ref):.1e}")
        label = f"{prec} w{wr} bv{bv} wi{wi}"
        print(f"{label:24}" + "".join(f"{t:13.3f}" for t in times) + "".join(f"{e:>20}" for e in errs), flush=True)
    if opts.partitions:
        tc.TUNING.update(dict(zip(("precision", "warps_recurrence", "block_v", "warps_inverse"), VARIANTS[0])))
        choices = [None, 10**9, 8, 16, 32, 64, 128]
        print("\npartition_chunks (None = auto, one = one partition per sequence), ms")
        print(f"{'shape':16}" + "".join(f"{str(c if c != 10**9 else 'one'):>9}" for c in choices))
        extra = [("1x128K 16/16", [131072], 16, 16), ("1x128K 32/32", [131072], 32, 32),
                 ("1x32K 16/32", [32768], 16, 32)]
        for name, lens, h, hv in itertools.chain(SHAPES, extra):
            args, kw = inputs.get(name) or make_inputs(Shape("prefill", name, lens, h, hv), "cuda")
            print(f"{name:16}" + "".join(f"{bench(args, kw, pc):9.3f}" for pc in choices), flush=True)


if __name__ == "__main__":
    main()
