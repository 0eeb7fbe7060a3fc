"""The tensor-core work of our exact prefill, and the time it needs at a given matmul rate.

    python benchmarks/tensor_floor.py [--tflops 750] [--sms 132]

The bench's "floor" counts the model's own FLOPs (one bf16 product each, no partitioning).
Our kernels do more by design: every product with an fp32 operand is a bf16 hi + lo split
(2 or 3 products, what keeps o at the bf16 floor: NOTES.md v4 precision study), and an
exact partitioned run computes each map partition's affine state map (M, D: the recurrence
on K + V columns) besides the outputs. This counts those products from the kernels' own
plan (`chunk.auto_partitions`, the SM count given) and prints the time they need at the
matmul rate given (the bench's measured ceiling): the floor of this algorithm, under which
no scheduling can go. Unit: one 64 x 64 x 64 product (262144 multiply-adds).
"""

import argparse

import torch

from flashdelta.bench import gpu_shapes
from flashdelta.triton import chunk as tc

UNIT_MACS = 64 * 64 * 64
# per chunk and 64-column block of the state (chunk_sm90._recurrence_kernel's wgmmas):
# K S 2 x 2, Q S 2 x 2, T_u X 3, Q K^T 2, K^T U~ 2 x 2, A U 3
OUTPUT_UNITS = 20
MAP_UNITS = 11  # K S 4, T_u X 3, K^T U~ 4 (no q)
# per chunk and head (chunk._inverse_kernel): K K^T 2, the diagonal blocks' K K^T 0.5, their
# doubling 1.125, the 16 -> 32 merge 0.19, the 32 -> 64 merge 0.75
INVERSE_UNITS = 4.56


def units(seq_lens: list[int], hv: int, dk: int = 128, dv: int = 128) -> dict:
    """Tensor-core units per pass for one call, with the partition plan the kernels take."""
    counts = [-(-n // tc.CHUNK_SIZE) for n in seq_lens]
    nvb, nkb = dv // 64, dk // 64
    size, lead = tc.auto_partitions(counts, hv, nvb, nkb, torch.device("cuda", 0), 2, tc.TUNING["lead_partition"])
    map_chunks = 0
    for n in counts:
        parts = [min(size, n - s) for s in range(0, n, size)]
        maps = parts[:-1]  # the last partition of a sequence needs no map
        if lead and len(parts) > 1:
            maps = maps[1:]  # the first starts from h0 (the lead pass)
        map_chunks += sum(maps)
    total = sum(counts)
    return {"inverse": total * hv * INVERSE_UNITS, "map": map_chunks * hv * (nvb + nkb) * MAP_UNITS,
            "output": total * hv * nvb * OUTPUT_UNITS, "partition": size, "lead": lead,
            "single": total * hv * nvb * 10}  # one bf16 product each (no split), no maps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tflops", type=float, default=750.0, help="bf16 matmul rate (the bench's measured ceiling)")
    ap.add_argument("--sms", type=int, default=132)
    opts = ap.parse_args()
    tc.sm_count = lambda index: opts.sms  # the plan as on that GPU, without one
    ms_per_unit = 2 * UNIT_MACS / (opts.tflops * 1e12) * 1e3
    print(f"tensor-core floor of the exact prefill at {opts.tflops:.0f} TFLOP/s, {opts.sms} SMs (ms)")
    print(f"{'shape':16}{'plan':>14}{'inverse':>9}{'map':>8}{'output':>8}{'total':>8}{'unsplit, no maps':>18}")
    for shape in [s for s in gpu_shapes("prefill", False) if s.gate == "strong"]:
        u = units(list(shape.seq_lens), shape.value_heads, shape.dk, shape.dv)
        plan = f"{u['partition']} ch{' +lead' if u['lead'] else ''}"
        parts = [u[k] * ms_per_unit for k in ("inverse", "map", "output")]
        print(f"{shape.name + f' {shape.heads}/{shape.value_heads}':16}{plan:>14}" + "".join(f"{p:9.3f}" for p in parts)
              + f"{sum(parts):8.3f}{u['single'] * ms_per_unit:18.3f}")


if __name__ == "__main__":
    main()
