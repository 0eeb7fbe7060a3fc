"""Compile the peers' kernels once at small shapes, before a timed `flashdelta bench` run.

    python benchmarks/warm_peers.py

FlashQLA JIT-compiles its TileLang kernels (~80 s per head configuration on a fresh
machine) into its disk cache (~/.tilelang/cache); Triton caches FLA's and our kernels in
~/.triton/cache. A later process on the same machine then times kernels, not compilers.
Head configurations: those of the prefill suite (16/16, 32/32, 16/32, and varlen 16/32).
"""

import sys
import time

import torch

from flashdelta.bench import Shape, _mixed_lengths, make_inputs, our_impls, peer_impls


def main():
    device = torch.device("cuda")
    impls, missing = peer_impls(device)
    impls += our_impls(device)
    for line in missing:
        print(line, file=sys.stderr)
    shapes = [Shape("prefill", "warm", [2048], h, hv) for h, hv in ((16, 16), (32, 32), (16, 32))]
    shapes.append(Shape("prefill", "warm varlen", _mixed_lengths(4096, 4), 16, 32, varlen=True))
    for shape in shapes:
        args, kw = make_inputs(shape, device)
        for impl in impls:
            if impl.prefill is None:
                continue
            start = time.perf_counter()
            impl.prefill(args, kw)
            torch.cuda.synchronize()
            print(f"{shape.label}: {impl.name} first call {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
