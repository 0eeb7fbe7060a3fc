"""Where the chunked path overtakes the recurrent one: times both over T on this machine.

    python benchmarks/dispatch_threshold.py [--device cpu|cuda] [--backend torch|triton] [--dtype bfloat16] [--batch 8]

The crossover grounds `flashdelta.RECURRENT_MAX_TOKENS[backend]` (used by mode="auto").
"""

import argparse
import time

import torch

import flashdelta as fd
from flashdelta.testing import make_case


def median_time(fn, device, reps=5):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--lens", default="1,2,4,8,12,16,24,32,64,256,4096")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"device={args.device} backend={args.backend} B={args.batch} H=HV={args.heads} K=V={args.dim} {args.dtype}")
    print(f"{'T':>6} {'chunk ms':>10} {'recurrent ms':>13} {'faster':>10}")
    for t_len in map(int, args.lens.split(",")):
        case = make_case("random", dtype, args.device, seq_len=t_len, batch=args.batch, heads=args.heads, dk=args.dim)
        kw = dict(output_final_state=True, backend=args.backend)
        tc = median_time(lambda: fd.chunk_gated_delta_rule(*case.args(), **kw), args.device)
        tr = median_time(lambda: fd.fused_recurrent_gated_delta_rule(*case.args(), **kw), args.device)
        print(f"{t_len:>6} {tc * 1e3:>10.3f} {tr * 1e3:>13.3f} {'chunk' if tc < tr else 'recurrent':>10}")


if __name__ == "__main__":
    main()
